"""What every command shares: argument types, the config and device a command runs with, its notes and files."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any


def positive_int(text: str) -> int:
    """argparse type for counts: an integer >= 1 (argparse reports anything else in one line, exit code 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def threshold_arg(text: str) -> float:
    """argparse type for a threshold override: a finite number >= 0 (scores and maps are distances)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def warn_settings(calibration, config) -> None:
    from vpdm.decision.postprocess import settings_differ

    differ = settings_differ(calibration, config)
    if differ:
        print(
            f"warning: {', '.join(differ)} differ from the settings the thresholds were calibrated with; "
            "the decisions may not hold ('vpdm calibrate' calibrates a checkpoint's own settings only: for "
            "thresholds that fit these, train with them, or give your own with --image-threshold / --pixel-threshold)",
            file=sys.stderr,
        )


def inference_override_args(args: argparse.Namespace) -> list[str]:
    """``--set`` items plus the ``--precision`` shortcut (evaluate, predict)."""
    precision = getattr(args, "precision", None)
    return list(args.overrides) + ([f"inference.precision={precision}"] if precision else [])


def command_device(args: argparse.Namespace, config):
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


def device_note(device, config) -> str:
    return f"device {device}, inference.precision {config.inference.precision}"


def command_config(args: argparse.Namespace):
    from vpdm.config.schema import load_config

    return load_config(args.config, list(args.overrides), getattr(args, "preset", None))


def calibration_summary(calibration) -> str:
    lines = [f"calibrated thresholds: {calibration.describe()}:"]
    for c, t in calibration.classes.items():
        defective = f" ({t.num_anomalous} defective)" if t.num_anomalous else ""
        lines.append(
            f"  {c}: {t.num_images} image(s){defective}, image threshold {t.image_threshold:.6g}, "
            f"pixel threshold {t.pixel_threshold:.6g}"
        )
    return "\n".join(lines)


def torch_save_to(obj: Any, path: Path) -> None:
    import torch

    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def torch_save_file(obj: Any, f: Any) -> None:
    import torch

    torch.save(obj, f)


def text_file(text: str):
    return lambda f: f.write(text.encode("utf-8"))


def config_yaml(config) -> str:
    import yaml

    from vpdm.config.values import to_dict

    return yaml.safe_dump(to_dict(config), sort_keys=False)


def cache_note(split) -> str:
    """Where the features came from: the cache entry used (checksum verified) or a fresh extraction."""
    if split.cache_hit:
        return f"cache hit {split.cache_path} (content checksum verified)"
    return "extracted" + (f", cached as {split.cache_path}" if split.cache_path else "")
