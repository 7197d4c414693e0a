"""Checkpoints: config + weights in a plain dict that ``torch.load(weights_only=True)`` accepts.

No pickled Python objects are stored, so loading a checkpoint cannot run code; a file that was
not written by vpdm (or was tampered with into something else) is refused with a clear error.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from vpdm.config import VPDMConfig, to_dict
from vpdm.errors import CheckpointError, VPDMError
from vpdm.io import atomic_torch_save
from vpdm.model import VPDM

FORMAT = "vpdm.checkpoint"
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
) -> dict[str, Any]:
    """What :func:`save_checkpoint` writes: plain containers and tensors only (``weights_only`` loads it)."""
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
    return payload


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and check the raw payload (safe: weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (expected a model.pt written by 'vpdm train')")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path} is not a vpdm checkpoint: it could not be loaded safely with weights_only=True ({first[:200]})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a vpdm checkpoint (no '{FORMAT}' format marker)")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {payload.get('version')!r}; this vpdm reads version {VERSION}")
    for key in ("config", "channels", "feature_size", "state_dict", "categories"):
        if key not in payload:
            raise CheckpointError(f"{path} is a damaged vpdm checkpoint: missing {key!r}")
    return payload


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[VPDM, VPDMConfig, dict[str, Any]]:
    """Rebuild the model from a checkpoint. Returns ``(model in eval mode, config, payload)``."""
    payload = read_checkpoint(path)
    try:
        config = VPDMConfig.from_dict(payload["config"])
        model = VPDM(int(payload["channels"]), int(payload["feature_size"]), config.model)
        model.load_state_dict(payload["state_dict"], strict=True)
    except (VPDMError, RuntimeError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{path} does not match this vpdm's model: {str(exc).splitlines()[0][:300]}") from None
    return model.to(map_location).eval(), config, payload
