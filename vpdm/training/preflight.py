"""Everything a command needs, checked before the first image goes through the backbone.

Each ``vpdm`` command calls one function here first (:func:`check_train`, :func:`check_evaluate`,
:func:`check_predict`): the data splits it will read are listed and checked (paths, masks, mask
sizes) and every image and mask of them is decoded, the device exists, every output path passes
:func:`vpdm.io.check_outputs` (writable, not an input, not there already unless ``--overwrite``), and
``train.threads`` is applied. A typo, a bad path or a truncated file then fails in seconds, not after
feature extraction, training or scoring, when the work would be lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vpdm.config.schema import VPDMConfig
from vpdm.data.dataset import check_images
from vpdm.data.layouts import Sample, list_samples
from vpdm.errors import OutputError
from vpdm.io import Output, check_outputs, writable_dir


@dataclass
class Plan:
    """What the checks found: the listed samples of each split, and the device (train only)."""

    samples: dict[str, list[Sample]] = field(default_factory=dict)
    device: torch.device | None = None
    state: dict[str, Any] | None = None  # the training state to resume (vpdm.training.resume), train --resume only


def apply_threads(config: VPDMConfig) -> None:
    """``train.threads`` for this process (0: torch's default), so every phase uses it, not only training."""
    if config.train.threads:
        torch.set_num_threads(config.train.threads)


def split_spec(config: VPDMConfig, split: str) -> str:
    return config.data.spec if split == "train" else (config.data.test_spec or config.data.spec)


def list_splits(config: VPDMConfig, splits: tuple[str, ...]) -> dict[str, list[Sample]]:
    """List and check each split: paths, masks and mask sizes, then every image and mask fully decoded
    (:func:`vpdm.data.dataset.check_images`: a truncated file fails now, naming it, not after extraction or training);
    DataError naming the bad file."""
    out = {split: list_samples(split_spec(config, split), split, config.data.missing_masks) for split in splits}
    for samples in out.values():
        check_images(samples)
    return out


def check_train(config: VPDMConfig, output: Path, *, overwrite: bool, evaluate: bool, resume: bool = False) -> Plan:
    """``vpdm train``: device, the run's outputs (:func:`check_outputs`), the state of an unfinished run (read
    with ``resume``, else never lost: refused unless ``overwrite``), the training split and, with --evaluate,
    the test split (decoded). The output folder is already created, probed and locked by the caller."""
    from vpdm.runtime.device import select_device
    from vpdm.training.resume import STATE_NAME, check_state, read_state

    apply_threads(config)
    device = select_device(config.train.device)
    names = {
        "model.pt": "checkpoint",
        "config.yaml": "config",
        "history.json": "training history",
        **({"metrics.json": "metrics"} if evaluate else {}),
    }
    splits = ("train", "test") if evaluate else ("train",)
    inputs = [root for split in splits for root in data_roots(config, split)]
    check_outputs([Output(output / n, w) for n, w in names.items()], inputs=inputs, overwrite=overwrite)
    state_path, state = output / STATE_NAME, None
    if resume:
        state = read_state(state_path)
        check_state(state, config, state_path)  # the settings now; the training features once extracted
    elif state_path.exists() and not overwrite:
        raise OutputError(
            f"{str(output)!r} holds the state of an unfinished run ({str(state_path)!r}): continue it "
            "with --resume, or pass --overwrite to start again"
        )
    return Plan(list_splits(config, splits), device, state)


def check_evaluate(config: VPDMConfig, *, outputs: list[Output], inputs: list[str | Path], overwrite: bool) -> Plan:
    """``vpdm evaluate``: the test split (decoded), the metrics file and the plots folder (:func:`check_outputs`)."""
    apply_threads(config)
    check_outputs(outputs, inputs=[*inputs, *data_roots(config, "test")], overwrite=overwrite)
    return Plan(list_splits(config, ("test",)))


def check_predict(config: VPDMConfig, *, outputs: list[Output], inputs: list[str | Path], overwrite: bool) -> Plan:
    """``vpdm predict``: scores.csv, overlays/ and masks/ (:func:`check_outputs`: not inside ``--images``, not
    there already unless ``--overwrite``, writable)."""
    apply_threads(config)
    check_outputs(outputs, inputs=inputs, overwrite=overwrite, probe=False)  # nothing created for a refused one
    for out in {Path(o.path).parent for o in outputs}:
        writable_dir(out)  # the folder they go to, named as such
    check_outputs(outputs, inputs=inputs, overwrite=overwrite)
    return Plan()


def data_roots(config: VPDMConfig, split: str) -> list[Path]:
    """The folders a split's data spec reads (the images and masks under them are a command's inputs)."""
    from vpdm.data.layouts import parse_data_spec

    return [path for _, path in parse_data_spec(split_spec(config, split))]
