"""Everything a command needs, checked before the first image goes through the backbone.

Each ``vpdm`` command calls one function here first (:func:`check_train`, :func:`check_evaluate`,
:func:`check_predict`): the data splits it will read are listed and checked (paths, masks, mask
sizes), the device exists, every output path can be written, and ``train.threads`` is applied. A
typo or a bad path then fails in seconds, not after feature extraction, training or scoring, when
the work would be lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from vpdm.config import VPDMConfig
from vpdm.data import Sample, list_samples
from vpdm.errors import OutputError
from vpdm.io import writable_dir, writable_file


@dataclass
class Plan:
    """What the checks found: the listed samples of each split, and the device (train only)."""

    samples: dict[str, list[Sample]] = field(default_factory=dict)
    device: torch.device | None = None


def apply_threads(config: VPDMConfig) -> None:
    """``train.threads`` for this process (0: torch's default), so every phase uses it, not only training."""
    if config.train.threads:
        torch.set_num_threads(config.train.threads)


def split_spec(config: VPDMConfig, split: str) -> str:
    return config.data.spec if split == "train" else (config.data.test_spec or config.data.spec)


def list_splits(config: VPDMConfig, splits: tuple[str, ...]) -> dict[str, list[Sample]]:
    """List and check each split (cheap: names and image headers); DataError naming the bad path."""
    return {split: list_samples(split_spec(config, split), split, config.data.missing_masks) for split in splits}


def check_train(config: VPDMConfig, output: Path, *, overwrite: bool, evaluate: bool) -> Plan:
    """``vpdm train``: device, an existing model.pt, the training split and, with --evaluate, the test split.

    The output folder is already created, probed and locked by the caller.
    """
    from vpdm.engine import select_device

    apply_threads(config)
    device = select_device(config.train.device)
    model_path = output / "model.pt"
    if model_path.exists() and not overwrite:
        raise OutputError(f"{str(model_path)!r} already exists; choose another --output or pass --overwrite to replace it")
    return Plan(list_splits(config, ("train", "test") if evaluate else ("train",)), device)


def check_evaluate(config: VPDMConfig, *, metrics: Path, plots: Path | None) -> Plan:
    """``vpdm evaluate``: the test split, the metrics file and the plots folder."""
    apply_threads(config)
    plan = Plan(list_splits(config, ("test",)))
    writable_file(metrics, "metrics")
    if plots is not None:
        writable_dir(plots, what="plots folder")
    return plan


def check_predict(config: VPDMConfig, *, output: Path, overlays: bool) -> Plan:
    """``vpdm predict``: the output folder and, unless --no-overlays, its overlays/ folder."""
    apply_threads(config)
    writable_dir(output)
    if overlays:
        writable_dir(output / "overlays", what="overlays folder")
    return Plan()
