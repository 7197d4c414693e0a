"""Named model settings the benchmark trains side by side.

``default`` is the library's defaults; ``paper`` is the paper's literal method
(:data:`vpdm.config.presets.PAPER`), and the ``paper-*`` presets are the paper's Table 3 ablations of it.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import yaml

from vpdm.config.presets import ABLATIONS as CONFIG_ABLATIONS
from vpdm.config.presets import PAPER
from vpdm.errors import ConfigError

# The benchmark's names of the paper's ablations (vpdm.config.presets.ABLATIONS, trained on the paper's settings).
_PAPER_ABLATIONS = {
    "paper-no-vague": "no-vague",
    "paper-no-ot": "nearest",
    "paper-no-ot-loss": "no-ot-loss",
    "paper-ddpm-start": "ddpm-start",
}
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "paper": dict(PAPER),
    **{name: {**PAPER, **CONFIG_ABLATIONS[ablation][1]} for name, ablation in _PAPER_ABLATIONS.items()},
}
PRESET_DESCRIPTIONS = {
    "default": "this library's defaults",
    "paper": "the paper's literal method (whole-image prototypes, eps, N(yhat, I) start, L2 over all channels)",
    "paper-no-vague": "paper without the vague step (N=1: prototypes of the raw features)",
    "paper-no-ot": "paper with prototypes without OT (nearest prototype)",
    "paper-no-ot-loss": "paper with the OT assignment but no OT loss (lambda_OT=0)",
    "paper-ddpm-start": "paper with the standard DDPM start N(0, I) instead of N(yhat, I)",
}
# The presets --ablations trains: the paper and its Table 3 ablations.
ABLATIONS = ("paper", "paper-no-vague", "paper-no-ot", "paper-no-ot-loss", "paper-ddpm-start")
# MVTec-AD (15 classes) image / pixel AUROC of the paper's Table 3 rows these presets correspond to;
# for orientation only (other data, other backbone).
PAPER_TABLE3 = {
    "paper": (98.4, 97.8),
    "paper-no-vague": (96.5, 96.8),
    "paper-no-ot": (93.5, 94.1),
    "paper-no-ot-loss": (97.1, 96.9),
    "paper-ddpm-start": (76.7, 80.1),
}


# --set values kept as typed (not YAML-parsed): paths and names.
_STRING_KEYS = ("data.spec", "data.test_spec", "data.cache_dir", "backbone.name", "backbone.weights")


def build_config(args: argparse.Namespace, preset: dict[str, Any] | None = None):
    """Defaults, then ``--config``, then the preset's overrides, then the command line (``--set`` and
    the shortcuts), so a setting the user names holds for every preset."""
    from vpdm.config.schema import load_config

    base = load_config(args.config)
    if preset:
        base = base.with_overrides(preset)
    overrides: dict[str, Any] = {"data.spec": args.data}
    for key, value in (
        ("train.epochs", args.epochs),
        ("backbone.name", args.backbone),
        ("backbone.weights", args.weights),
        ("train.device", args.device),
    ):
        if value is not None:
            overrides[key] = value
    for item in args.overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} must look like section.key=value")
        key, raw = (s.strip() for s in item.split("=", 1))
        overrides[key] = raw if key in _STRING_KEYS else yaml.safe_load(raw)
    config = base.with_overrides(overrides)
    threads = args.threads or config.train.threads or torch.get_num_threads()
    return config.with_overrides({"train.threads": int(threads)}).validate()
