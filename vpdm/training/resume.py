"""Resumable training: the state of a ``vpdm train`` run after an epoch, and continuing from it exactly.

``vpdm train`` writes :data:`STATE_NAME` into its run folder every ``train.checkpoint_every`` epochs
(atomically: a kill mid-write leaves the previous state). It holds everything the next epoch depends on:
the weights and buffers, the optimizer, the global torch (and CUDA, numpy) random
states, the training loader's shuffling generator, and the history. ``vpdm train --resume`` rebuilds
the model as a fresh run would (same seed, same prototypes, same frozen condition), loads that state
and runs the remaining epochs, so the result is the uninterrupted run's, bit for bit (on the same
device and thread count). A state is used only with the settings and the training features it was
made with (a checksum of the features): anything else is refused by name. The state is removed once
the run's model is in place.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vpdm.config.migration import drop_retired
from vpdm.config.schema import VPDMConfig
from vpdm.config.values import flatten_dict, to_dict
from vpdm.errors import CheckpointError, ConfigError
from vpdm.io import atomic_torch_save

__all__ = ["STATE_NAME", "capture", "check_state", "features_checksum", "read_state", "restore", "write_state"]

STATE_NAME = "train-state.pt"
FORMAT = "vpdm.train-state"
VERSION = 1
# Settings that change where or how fast a run computes, not what it computes (the same device and
# thread count give the same bits; another may differ by float rounding).
FREE_SETTINGS: tuple[str, ...] = (
    "train.device",
    "train.threads",
    "train.checkpoint_every",
    "data.cache_dir",
    "data.extract_batch_size",
    "data.test_spec",
)


def features_checksum(features: torch.Tensor) -> str:
    """sha256 of the training features' shape and bytes: a state continues only the training it began."""
    digest = hashlib.sha256(str(tuple(features.shape)).encode())
    flat = features.detach().cpu().contiguous().reshape(-1)
    step = 1 << 24
    for start in range(0, flat.numel(), step):
        digest.update(flat[start : start + step].numpy().tobytes())
    return digest.hexdigest()


def _rng() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def capture(
    *,
    epoch: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    history: list[dict[str, float]],
    config: VPDMConfig,
    checksum: str,
) -> dict[str, Any]:
    """The state after ``epoch`` epochs (plain containers and tensors: ``torch.load(weights_only=True)`` reads it)."""
    inner = model.module if hasattr(model, "module") else model
    return {
        "format": FORMAT,
        "version": VERSION,
        "epoch": int(epoch),
        "config": to_dict(config),
        "features": checksum,
        "history": [dict(h) for h in history],
        "model": {k: v.detach().cpu().clone() for k, v in inner.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "rng": _rng(),
    }


def write_state(path: str | Path, state: dict[str, Any]) -> Path:
    """Atomically: a run killed while writing keeps the previous state."""
    return atomic_torch_save(state, path, what="training state")


def read_state(path: str | Path) -> dict[str, Any]:
    """A state written by :func:`write_state`; :class:`CheckpointError` naming the file otherwise."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(
            f"nothing to resume: {str(path)!r} does not exist (a run writes it after its first "
            "epoch; start without --resume)"
        ) from None
    except Exception as exc:  # noqa: BLE001 (damaged files raise many types): say so rather than continue
        raise CheckpointError(
            f"{str(path)!r} is not a readable training state ({type(exc).__name__}); start again with --overwrite"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("version") != VERSION:
        raise CheckpointError(f"{str(path)!r} is not a vpdm training state of version {VERSION}")
    return state


def check_state(state: dict[str, Any], config: VPDMConfig, path: str | Path, checksum: str | None = None) -> None:
    """Refuse to continue a state with other settings (named) or, given ``checksum``, other training features."""
    # a state written before a setting was retired names it at its remaining value (another value is refused)
    saved, now = flatten_dict(drop_retired(state["config"])), flatten_dict(to_dict(config))
    differ = [k for k in sorted(set(saved) | set(now)) if k not in FREE_SETTINGS and saved.get(k) != now.get(k)]
    if differ:
        shown = ", ".join(f"{k} ({saved.get(k)!r} in the state, now {now.get(k)!r})" for k in differ[:5])
        more = f" and {len(differ) - 5} more" if len(differ) > 5 else ""
        raise ConfigError(
            f"cannot resume {str(path)!r} with other settings: {shown}{more}; resume with the same "
            "command, or start again with --overwrite"
        )
    if checksum is not None and state["features"] != checksum:
        raise ConfigError(
            f"cannot resume {str(path)!r}: the training images are not the ones it was trained on "
            "(their features differ); resume with the same data, or start again with --overwrite"
        )


def restore(
    state: dict[str, Any], *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator
) -> tuple[int, list[dict[str, float]]]:
    """Load ``state`` into a freshly built model, its optimizer, the loader's generator and the random states;
    returns (epochs done, their history)."""
    inner = model.module if hasattr(model, "module") else model
    inner.load_state_dict(state["model"], strict=True)
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    _set_rng(state["rng"])
    return int(state["epoch"]), list(state["history"])
