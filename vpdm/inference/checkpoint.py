"""Checkpoints: config + weights in a plain dict that ``torch.load(weights_only=True)`` accepts.

No pickled Python objects are stored, so loading a checkpoint cannot run code; a file that was
not written by vpdm (or was tampered with into something else) is refused with a clear error.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch

from vpdm.config.schema import VPDMConfig, saved_config
from vpdm.config.values import to_dict
from vpdm.errors import CheckpointError, VPDMError
from vpdm.io import atomic_torch_save
from vpdm.model.vpdm_model import VPDM
from vpdm.state_dicts import state_dict_differences

FORMAT = "vpdm.inference.checkpoint"
VERSION = 1


def save_checkpoint(
    path: str | Path,
    model: VPDM,
    config: VPDMConfig,
    *,
    categories: list[str],
    extra: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    epoch: int | None = None,
) -> Path:
    path = Path(path)
    payload = checkpoint_payload(model, config, categories=categories, extra=extra, optimizer=optimizer, epoch=epoch)
    atomic_torch_save(payload, path, what="checkpoint")
    return path


def checkpoint_payload(
    model: VPDM,
    config: VPDMConfig,
    *,
    categories: list[str],
    extra: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    epoch: int | None = None,
    calibration: Any = None,
) -> dict[str, Any]:
    """What :func:`save_checkpoint` writes: plain containers and tensors only (``weights_only`` loads it).

    ``calibration`` (a :class:`vpdm.decision.postprocess.Calibration`) adds the decision thresholds; a checkpoint
    without them still loads (:func:`checkpoint_calibration` returns None).
    """
    payload: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "config": to_dict(config),
        "channels": int(model.channels),
        "feature_size": int(model.feature_size),
        "categories": list(categories),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "epoch": epoch,
        "extra": extra or {},
    }
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    if calibration is not None:
        payload["calibration"] = calibration.to_payload()
    return payload


# The model's buffers a calibration may change (the term statistics, their training fit, the map weights): what a
# calibrated checkpoint's state takes from the model it calibrated.
CALIBRATED_BUFFERS: tuple[str, ...] = ("term_mean", "term_std", "train_term_mean", "train_term_std", "map_weight")


def with_calibrated_buffers(payload: dict[str, Any], model: VPDM) -> dict[str, Any]:
    """``payload`` (a new dict) whose state has ``model``'s :data:`CALIBRATED_BUFFERS`, the rest unchanged."""
    calibrated = {name: model.get_buffer(name).detach().cpu().clone() for name in CALIBRATED_BUFFERS}
    return {**payload, "state_dict": {**payload["state_dict"], **calibrated}}


def checkpoint_calibration(payload: dict[str, Any], path: str | Path = "checkpoint") -> Any:
    """The :class:`vpdm.decision.postprocess.Calibration` stored in a checkpoint's payload, or None (older
    checkpoints, or trained with ``train.calibration_fraction=0``: ``vpdm calibrate`` adds one)."""
    from vpdm.decision.postprocess import Calibration

    data = payload.get("calibration")
    if data is None:
        return None
    return Calibration.from_payload(data, where=repr(str(path)))


def _not_loadable(path: Path) -> str:
    """Why ``path`` could not be loaded, in our words (torch's advice to disable the safe loader is never passed on)."""
    try:
        size = path.stat().st_size
    except OSError:
        size = -1
    if size == 0:
        return "the file is empty"
    if not zipfile.is_zipfile(path):
        return (
            "it is not a PyTorch checkpoint archive (vpdm writes a zip archive with torch.save; this file is not one)"
        )
    return (
        "it is a PyTorch archive that holds Python objects a vpdm checkpoint never contains (only tensors, numbers, "
        "strings, lists and dicts), or it is damaged; it was not loaded, because loading such objects can run code"
    )


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and check the raw payload (safe: weights_only=True, nothing but tensors and containers)."""
    path = Path(path)
    if path.is_dir():
        hint = f"; did you mean {str(path / 'model.pt')!r}?" if (path / "model.pt").is_file() else ""
        raise CheckpointError(
            f"checkpoint {str(path)!r} is a folder, not a file: expected a model.pt written by 'vpdm train'{hint}"
        )
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist (expected a model.pt written by 'vpdm train')")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:  # unreadable (permissions, I/O): the OS's words
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {exc.strerror or exc}") from None
    except Exception:  # UnpicklingError, RuntimeError, EOFError, KeyError, ...: none of it is a vpdm checkpoint
        raise CheckpointError(f"{str(path)!r} is not a vpdm checkpoint: {_not_loadable(path)}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a vpdm checkpoint (no '{FORMAT}' format marker)")
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"{str(path)!r} has checkpoint version {payload.get('version')!r}; this vpdm reads version {VERSION}"
        )
    for key in ("config", "channels", "feature_size", "state_dict", "categories"):
        if key not in payload:
            raise CheckpointError(f"{str(path)!r} is a damaged vpdm checkpoint: missing {key!r}")
    if not isinstance(payload["state_dict"], dict):
        raise CheckpointError(f"{str(path)!r} is a damaged vpdm checkpoint: 'state_dict' is not a mapping of tensors")
    return payload


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[VPDM, VPDMConfig, dict[str, Any]]:
    """Rebuild the model from a checkpoint. Returns ``(model in eval mode, config, payload)``."""
    payload = read_checkpoint(path)
    try:
        config = saved_config(payload["config"])
        # "stage_channels" of checkpoints written while scoring.per_stage existed is not needed (retired)
        model = VPDM(int(payload["channels"]), int(payload["feature_size"]), config.model)
    except (VPDMError, RuntimeError, TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"{str(path)!r} holds settings this vpdm cannot build a model from: {str(exc).splitlines()[0][:300]}"
        ) from None
    state = dict(payload["state_dict"])
    model.take_sizes(state)  # what follows the data: term statistics per class, prototypes per class
    model.complete_state(state)  # buffers a checkpoint written before them lacks
    payload["state_dict"] = state
    differences = state_dict_differences(model.state_dict(), payload["state_dict"])
    if differences:
        raise CheckpointError(f"{str(path)!r} does not match the model its settings describe: {'; '.join(differences)}")
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except (RuntimeError, TypeError) as exc:  # same names and shapes, yet refused (e.g. a dtype torch cannot copy)
        raise CheckpointError(
            f"{str(path)!r} does not match this vpdm's model: {str(exc).splitlines()[-1][:300]}"
        ) from None
    return model.to(map_location).eval(), config, payload
