"""``vpdm train``: a run folder with the model, its calibration, metrics and a resumable state."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from vpdm.cli.common import (
    cache_note,
    calibration_summary,
    command_config,
    config_yaml,
    device_note,
    text_file,
    torch_save_file,
)
from vpdm.cli.evaluate import write_metrics


def cmd_train(args: argparse.Namespace) -> int:
    from vpdm.io import exclusive_folder
    from vpdm.training import engine

    shortcuts = {
        "data.spec": args.data,
        "train.epochs": args.epochs,
        "backbone.name": args.backbone,
        "backbone.weights": args.weights,
        "train.device": args.device,
        "train.batch_size": args.batch_size,
    }
    config = command_config(args).with_overrides({k: v for k, v in shortcuts.items() if v is not None}).validate()
    # Before the output folder is created: a GPU that is not there leaves nothing behind.
    device = engine.select_device(
        config.train.device,
        what="--device" if args.device is not None else "train.device",
        precision=config.inference.precision,
    )
    method = config.calibration.resolve(labelled=args.val_data is not None)
    if args.val_data is not None and config.train.calibration_fraction > 0:
        # The thresholds come from the labelled set: no train/good image needs to be held out (the saved config says so).
        print(
            f"calibration: thresholds from --val-data ({method}); train.calibration_fraction="
            f"{config.train.calibration_fraction:g} not used, training on all of train/good"
        )
        config = config.with_overrides({"train.calibration_fraction": 0.0}).validate()
    progress = not args.no_progress
    output = Path(args.output)
    created = _first_missing(output)  # a failed run removes the folders it made, unless they hold something
    try:
        # One run per folder: a second `vpdm train` into it fails at once instead of both "succeeding".
        with exclusive_folder(output) as out:
            return _train_in(out, args, config, device, method, progress)
    except BaseException:
        if created is not None:
            _remove_empty_folders(output, created)
        raise


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` (itself included) that does not exist yet."""
    missing = None
    for p in (path.absolute(), *path.absolute().parents):
        if os.path.lexists(p):
            break
        missing = p
    return missing


def _remove_empty_folders(path: Path, upto: Path) -> None:
    """Remove ``path`` and its parents up to ``upto`` while they are empty (rmdir never removes a file)."""
    current = path.absolute()
    while True:
        try:
            current.rmdir()
        except OSError:
            return
        if current == upto or current.parent == current:
            return
        current = current.parent


def _train_in(out: Path, args: argparse.Namespace, config, device, method: str, progress: bool) -> int:
    """The training run in ``out``, locked by the caller: checks, features, fit (resumable), calibration, commit."""
    from vpdm.data.layouts import categories
    from vpdm.decision.calibration import (
        calibrate,
        calibrate_labelled,
        check_partial,
        holdout_index,
        subset,
        validation_samples,
    )
    from vpdm.evaluation import evaluator
    from vpdm.inference.checkpoint import checkpoint_payload
    from vpdm.io import RUN_OUTPUTS, commit_run, prepare_write, remove_stale_temporaries
    from vpdm.training import engine
    from vpdm.training.preflight import check_train
    from vpdm.training.resume import STATE_NAME, capture, check_state, features_checksum, write_state

    stale = remove_stale_temporaries(out, (*RUN_OUTPUTS, STATE_NAME))  # left by a run that was killed
    if stale:
        print(
            f"removed {len(stale)} temporary file(s) a killed run left in {out}: "
            f"{', '.join(p.name for p in stale[:5])}{', ...' if len(stale) > 5 else ''}"
        )
    state_path = out / STATE_NAME
    # before the first image: outputs, data (decoded), device, a state to resume or not to lose
    plan = check_train(config, out, overwrite=args.overwrite, evaluate=args.evaluate, resume=args.resume)
    val_samples = None
    if args.val_data is not None:
        val_samples = validation_samples(args.val_data, config, categories(plan.samples["train"]))
        check_partial(
            None,
            categories(val_samples),
            categories(plan.samples["train"]),
            method,
            config,
            f"--val-data {args.val_data!r}",
        )
    fraction = config.train.calibration_fraction
    # One extraction (and cache entry) for all of train/good, then the seeded split of the features.
    print(device_note(device, config))
    every = engine.load_split(config, "train", progress=progress, samples=plan.samples["train"])
    keep, held_index = holdout_index(plan.samples["train"], fraction, config.train.seed)
    train = subset(every, keep) if held_index else every
    held = subset(every, held_index) if held_index else None
    if held is not None:
        print(f"calibration: {len(held_index)} train/good images held out (train.calibration_fraction={fraction:g})")
    val = None
    if val_samples is not None:  # extracted before training: an unreadable image fails before the long work
        val = engine.load_split(config, "test", progress=progress, samples=val_samples)
        print(
            f"calibration: {len(val_samples)} labelled validation images ({sum(s.label for s in val_samples)} "
            f"defective) from --val-data, features {cache_note(val)}"
        )
    print(
        f"train: {len(train.features)} images, {len(train.dataset.categories)} classes, "
        f"features {tuple(train.features.shape[1:])} ({cache_note(train)} in {train.extract_seconds:.1f}s)"
    )
    resumable = plan.state is not None or config.train.checkpoint_every > 0
    checksum = features_checksum(train.features) if resumable else ""
    if plan.state is not None:
        check_state(plan.state, config, state_path, checksum)
        print(f"resuming {state_path}: {plan.state['epoch']} of {config.train.epochs} epochs done")

    def report(epoch: int, m: dict[str, float]) -> None:
        if epoch == 0 or (epoch + 1) % max(1, config.train.epochs // 10) == 0 or epoch + 1 == config.train.epochs:
            print(
                f"epoch {epoch + 1:>4}/{config.train.epochs}  loss {m['loss']:.4f}  eps-mse {m['eps_mse']:.4f}  "
                f"ot {m['ot_loss']:.4f}  {m['seconds']:.1f}s",
                flush=True,
            )

    def save_state(**state) -> None:
        write_state(state_path, capture(**state, config=config, checksum=checksum))

    start = time.perf_counter()
    try:
        model, history = engine.fit(
            config,
            train,
            callback=report,
            progress=progress,
            resume=plan.state,
            save_state=save_state if resumable else None,
        )
    except KeyboardInterrupt:
        if state_path.exists():
            print(
                f"vpdm train: the state after the last saved epoch is in {state_path}; continue with the same "
                "command and --resume",
                file=sys.stderr,
            )
        raise
    train_seconds = time.perf_counter() - start
    del every  # the full tensor is no longer needed
    calibration = None
    if val is not None:
        calibration = calibrate_labelled(
            model,
            config,
            val,
            method,
            source=f"--val-data {args.val_data}",
            progress=progress,
            model_classes=list(train.dataset.categories),
        )
        print(calibration_summary(calibration))
    elif held is not None:
        calibration = calibrate(
            model,
            config,
            held.features,
            [s.category for s in held.dataset.samples],
            source=f"train holdout {fraction:g} (seed {config.train.seed})",
            progress=progress,
            model_classes=list(train.dataset.categories),
        )
        print(calibration_summary(calibration))
    else:
        print(
            "no calibration images (train.calibration_fraction=0): the model has no decision thresholds; "
            f"make them with: vpdm calibrate --checkpoint {out / 'model.pt'} --data SPEC"
        )
    payload = checkpoint_payload(
        model,
        config,
        categories=train.dataset.categories,
        calibration=calibration,
        extra={
            "train_seconds": train_seconds,
            "train_images": len(train.features),
            "calibration_images": len(val_samples) if val_samples else len(held_index),
        },
    )
    prepared: dict[str, Path] = {}
    try:  # every file complete on disk first, then the previous run is replaced by this one as a whole
        prepared["model.pt"] = prepare_write(out / "model.pt", lambda f: torch_save_file(payload, f), "checkpoint")
        prepared["config.yaml"] = prepare_write(out / "config.yaml", text_file(config_yaml(config)), "config")
        prepared["history.json"] = prepare_write(
            out / "history.json", text_file(json.dumps(history, indent=2)), "training history"
        )
        commit_run(out, prepared, replace=args.overwrite)
    finally:
        for tmp in prepared.values():
            tmp.unlink(missing_ok=True)
    state_path.unlink(missing_ok=True)  # the run is complete: nothing left to resume
    print(f"trained in {train_seconds:.1f}s -> {out / 'model.pt'}")
    if args.evaluate:
        test = engine.load_split(config, "test", progress=progress, samples=plan.samples["test"])
        print(f"test: {len(test.features)} images, features {cache_note(test)}")
        result = evaluator.evaluate(model, config, test, progress=progress)
        write_metrics(result, out / "metrics.json", config, calibration=calibration, checkpoint=str(out / "model.pt"))
    return 0
