"""``vpdm calibrate``: thresholds of a checkpoint from normal or labelled images, stored in it."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

from vpdm.cli.common import calibration_summary, command_device, torch_save_to
from vpdm.errors import VPDMError
from vpdm.io import writing


def cmd_calibrate(args: argparse.Namespace) -> int:
    from vpdm.config.schema import inference_overrides
    from vpdm.data.layouts import categories
    from vpdm.decision.calibration import (
        calibrate,
        calibrate_labelled,
        calibration_picks,
        check_map_weights_possible,
        check_partial,
        merge_calibration,
        validation_samples,
    )
    from vpdm.inference.checkpoint import checkpoint_calibration, load_checkpoint, with_calibrated_buffers
    from vpdm.io import Output, check_outputs, writable_file
    from vpdm.training import engine
    from vpdm.training.preflight import data_roots, list_splits

    if args.config:
        raise VPDMError(
            "calibrate takes its settings from the checkpoint; use --set to change sampling, scoring "
            "or calibration.* (method, false_alarm_rate, target_recall)"
        )
    if args.fraction is not None and not (math.isfinite(args.fraction) and 0 < args.fraction <= 1):
        raise VPDMError(f"--fraction must be a number in (0, 1], got {args.fraction!r}")
    if args.val_data is not None and (args.data is not None or args.fraction is not None):
        raise VPDMError(
            "--val-data calibrates on its labelled test split; --data and --fraction choose normal "
            "train/good images for calibration.method=quantile: give one or the other"
        )
    model, config, payload = load_checkpoint(args.checkpoint)
    previous = checkpoint_calibration(payload, args.checkpoint)
    allowed = ("calibration.", "data.", "train.threads=", "train.batch_size=", "train.seed=", "train.device=")
    other = [o for o in args.overrides if not o.strip().startswith(allowed)]
    if other:
        raise VPDMError(
            f"calibrate cannot change {', '.join(other)}: thresholds hold for the checkpoint's own "
            "sampling, scoring and inference settings; only calibration.*, data.*, train.threads, "
            "train.batch_size, train.seed and train.device (--device) may change"
        )
    # Choosing the map weights is an act of one calibration, not a setting the checkpoint carries on: the weights
    # it chose stay in the model, and a later calibration (e.g. on normal images) chooses again only when asked.
    config = config.with_overrides({"calibration.choose_map_weights": False})
    config = inference_overrides(config, args.overrides, "calibrate")
    if args.data:
        config = config.with_overrides({"data.spec": args.data})
    config.validate()
    config, device = command_device(args, config)
    model.to(device)
    method = config.calibration.resolve(labelled=args.val_data is not None)
    target = Path(args.output) if args.output else Path(args.checkpoint)
    in_place = target.exists() and os.path.samefile(target, args.checkpoint)
    # before any image: where it goes (never onto the data; another existing file only with --overwrite)
    roots = data_roots(
        config.with_overrides({"data.test_spec": args.val_data}) if args.val_data else config,
        "test" if args.val_data else "train",
    )
    if in_place:  # the documented default: the previous file is kept complete as .bak
        check_outputs([], inputs=roots)
        writable_file(target, "checkpoint")
    else:
        check_outputs([Output(target, "checkpoint")], inputs=[args.checkpoint, *roots], overwrite=args.overwrite)
    progress = not args.no_progress
    model_classes = list(payload.get("categories") or [])
    flag = f"--val-data {args.val_data!r}" if args.val_data is not None else f"--data {config.data.spec!r}"
    if args.val_data is not None:
        val_samples = validation_samples(args.val_data, config, model_classes)  # classes, masks: before any image
        if config.calibration.choose_map_weights:
            check_map_weights_possible(model, model_classes)
        kept = check_partial(previous, categories(val_samples), model_classes, method, config, flag)
        split = engine.load_split(config, "test", progress=progress, samples=val_samples, device=device)
        calibration = calibrate_labelled(
            model,
            config,
            split,
            method,
            source=f"--val-data {args.val_data}",
            progress=progress,
            model_classes=model_classes,
        )
    else:
        samples = list_splits(config, ("train",))["train"]
        kept = check_partial(previous, categories(samples), model_classes, method, config, flag)
        if args.fraction is not None and args.fraction < 1:  # the same pick as train's hold-out (same data and seed)
            keep = {
                i for _, picked in calibration_picks(samples, args.fraction, config.train.seed).values() for i in picked
            }
            samples = [s for i, s in enumerate(samples) if i in keep]
        split = engine.load_split(config, "train", progress=progress, samples=samples, device=device)
        unknown = sorted(set(split.dataset.categories) - set(model_classes))
        if unknown:
            print(
                f"note: class(es) {', '.join(unknown)} were not in the model's training data "
                f"({', '.join(model_classes)}); calibrating them anyway"
            )
        fraction = f", fraction {args.fraction:g}" if args.fraction is not None else ""
        calibration = calibrate(
            model,
            config,
            split.features,
            [s.category for s in samples],
            source=f"vpdm calibrate --data {config.data.spec}{fraction}",
            progress=progress,
            model_classes=model_classes,
        )
    if kept:
        print(
            f"recalibrated: {', '.join(sorted(calibration.classes))}; kept from the previous calibration "
            f"({previous.describe()}): {', '.join(kept)}"
        )
        calibration = merge_calibration(calibration, previous, kept)
    # what the calibration changed in the model (map weights, term statistics) is saved with its state
    payload = with_calibrated_buffers(payload, model)
    return _store_calibration(calibration, payload, config, target, in_place=in_place, overwrite=args.overwrite)


def _store_calibration(
    calibration, payload: dict[str, Any], config, target: Path, *, in_place: bool, overwrite: bool = False
) -> int:
    """Write ``payload`` with ``calibration`` to ``target`` atomically. In place (``target`` is the checkpoint
    read), the previous file is first kept complete as ``<name>.bak`` (or ``.bak.2``, ...: never over a file)."""
    import shutil

    from vpdm.config.values import to_dict
    from vpdm.io import Output, atomic_torch_save, atomic_write, free_name, staged_outputs

    print(calibration_summary(calibration))
    payload = dict(payload)
    payload["calibration"] = calibration.to_payload()
    payload["config"]["calibration"] = to_dict(config.calibration)
    if in_place:
        backup = free_name(target.with_name(target.name + ".bak"))

        def copy(f, _src=target):
            with open(_src, "rb") as old:
                shutil.copyfileobj(old, f)

        atomic_write(backup, copy, what="backup of the previous checkpoint")
        print(f"previous {target.name} kept as {backup}")
        atomic_torch_save(payload, target, what="checkpoint")  # temp file + rename: the old file survives any failure
    else:  # a new file, or one --overwrite replaces; one that appeared meanwhile is kept
        output = Output(target, "checkpoint")
        with staged_outputs([output], overwrite=overwrite) as staged, writing(target, "checkpoint"):
            torch_save_to(payload, staged[target])
    print(f"thresholds written to {target}")
    return 0
