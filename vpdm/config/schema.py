"""Typed configuration of a whole run, with the paper's defaults.

Each component owns its own dataclass (``BackboneConfig`` in ``backbone``, ``VPOTConfig`` in
``vpot``, ...). This module composes them, loads them from YAML and applies ``key.sub=value``
overrides typed on the command line, and validates everything before any long work starts.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vpdm.config.migration import LEGACY_VALUES, RETIRED, drop_retired
from vpdm.config.presets import PRESETS
from vpdm.config.values import check_finite, flatten_dict, from_dict, load_yaml, to_dict
from vpdm.data.layouts import MISSING_MASKS
from vpdm.errors import ConfigError
from vpdm.features.backbone import BackboneConfig
from vpdm.io import atomic_write_text
from vpdm.model.config import ModelConfig, SamplingConfig
from vpdm.model.scoring import ScoringConfig
from vpdm.runtime.precision import check_precision_name


def saved_config(data: dict[str, Any]) -> VPDMConfig:
    """The config of a saved model (checkpoint, logged run): settings it predates take their
    :data:`LEGACY_VALUES`, so an older model is rebuilt and scored as it was trained."""
    import copy

    data = copy.deepcopy(data)
    if not isinstance(data, dict):
        raise ConfigError(f"a saved config must be a mapping of sections, got {type(data).__name__}")
    for key, value in LEGACY_VALUES.items():
        *sections, name = key.split(".")
        node = data
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if isinstance(node, dict) and name not in node:
            node[name] = copy.deepcopy(value)
    return VPDMConfig.from_dict(data)


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 32  # paper: 32
    lr: float = 1e-3  # paper: Adam, 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    seed: int = 0
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    # Learning rate of the prototypes relative to train.lr (0 = keep them where they were initialised).
    prototype_lr_scale: float = 0.0
    # Fraction of each class's train/good images held out (seeded by train.seed, at least 2 per class) to
    # calibrate the decision thresholds after training (vpdm.decision.calibration); 0 = train on all, no thresholds.
    calibration_fraction: float = 0.1
    # `vpdm train` writes a resumable state (vpdm.training.resume) every this many epochs; 0 = never.
    checkpoint_every: int = 1

    def validate(self) -> None:
        if (
            not isinstance(self.checkpoint_every, int)
            or isinstance(self.checkpoint_every, bool)
            or self.checkpoint_every < 0
        ):
            raise ConfigError(
                f"train.checkpoint_every must be an integer >= 0 (0 = never), got {self.checkpoint_every!r}"
            )
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"train.{name} must be an integer >= 1, got {value!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"train.lr must be a finite number > 0, got {self.lr!r}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("train.weight_decay and train.grad_clip must be >= 0")
        if not (
            isinstance(self.prototype_lr_scale, (int, float))
            and math.isfinite(self.prototype_lr_scale)
            and self.prototype_lr_scale >= 0
        ):
            raise ConfigError(f"train.prototype_lr_scale must be a finite number >= 0, got {self.prototype_lr_scale!r}")
        if not isinstance(self.threads, int) or self.threads < 0:
            raise ConfigError(f"train.threads must be an integer >= 0, got {self.threads!r}")
        if not (
            isinstance(self.calibration_fraction, (int, float))
            and not isinstance(self.calibration_fraction, bool)
            and 0 <= self.calibration_fraction < 1
        ):
            raise ConfigError(
                f"train.calibration_fraction must be a number in [0, 1) (0 = no held-out calibration "
                f"images), got {self.calibration_fraction!r}"
            )


CALIBRATION_METHODS: tuple[str, ...] = ("auto", "quantile", "f1", "recall")


@dataclass
class CalibrationConfig:
    """How decision thresholds are calibrated (vpdm.decision.postprocess, vpdm.decision.calibration)."""

    # "quantile": from normal images only (train's hold-out, `vpdm calibrate --data`), at false_alarm_rate;
    # "f1": F1-maximising on a labelled validation set (`--val-data SPEC`), as anomalib's F1AdaptiveThreshold;
    # "recall": on the same labelled set, the highest threshold still flagging target_recall of the defects;
    # "auto": f1 when --val-data is given, quantile otherwise.
    method: str = "auto"
    # Target false-alarm rate on normal images: the image threshold is the (1 - rate) quantile of the held-out
    # normal images' scores, the pixel threshold the same quantile of their map pixels (numpy, method
    # "higher": with fewer than 1/rate + 1 images, the maximum).
    false_alarm_rate: float = 0.01
    # method=recall: the fraction of the validation defects (images; pixels for the pixel threshold) flagged.
    target_recall: float = 0.95
    # With labelled defects (--val-data): before the thresholds, choose per class the weight of the coarse
    # (4x4-block) against the fine (per-position) map terms that maximises the class's pixel AUROC on them.
    # Which term finds a class's defects depends on the defects, which normal images do not show: chosen on
    # half of each class's test images, the other half gains pixel AUROC 93.5 -> 93.9, AP 55.6 -> 57.2, no
    # class lower (EXPERIMENTS #136).
    choose_map_weights: bool = False
    # With normal images (method quantile: train's hold-out, `vpdm calibrate --data`, a sweep trial's hold-out):
    # before the thresholds, each class's map-term statistics move this far from the training images' fit toward
    # these unseen images' (0: the training fit; 1: these images' alone). On images the model never saw, the coarse
    # term spreads 1.2-1.9x wider than on its training images and the fine 0.7-1.0x, so with the training fit the
    # map weighs the coarse term about twice what the statistics meant (EXPERIMENTS #148). Halfway, registered
    # before it was measured on three fresh seeds (#149): pixel AP +0.5, AUPRO +0.4 over six seeds, no class's image
    # or pixel AUROC more than 0.25 pt lower; 1 (these images alone) costs Magnetic Tile 0.53 pt of pixel AUROC.
    statistics_weight: float = 0.5

    def validate(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise ConfigError(
                f"calibration.method must be one of {', '.join(CALIBRATION_METHODS)}, got {self.method!r}"
            )
        if not (
            isinstance(self.false_alarm_rate, (int, float))
            and not isinstance(self.false_alarm_rate, bool)
            and 0 <= self.false_alarm_rate < 1
        ):
            raise ConfigError(f"calibration.false_alarm_rate must be a number in [0, 1), got {self.false_alarm_rate!r}")
        if not (
            isinstance(self.target_recall, (int, float))
            and not isinstance(self.target_recall, bool)
            and 0 < self.target_recall <= 1
        ):
            raise ConfigError(f"calibration.target_recall must be a number in (0, 1], got {self.target_recall!r}")
        if not isinstance(self.choose_map_weights, bool):
            raise ConfigError(f"calibration.choose_map_weights must be true or false, got {self.choose_map_weights!r}")
        if not (
            isinstance(self.statistics_weight, (int, float))
            and not isinstance(self.statistics_weight, bool)
            and 0 <= self.statistics_weight <= 1
        ):
            raise ConfigError(
                f"calibration.statistics_weight must be a number in [0, 1], got {self.statistics_weight!r}"
            )

    def resolve(self, labelled: bool) -> str:
        """The method to use, with or without a labelled validation set; ConfigError for a mismatch."""
        if self.choose_map_weights and not labelled:
            raise ConfigError(
                "calibration.choose_map_weights=true chooses the map's weights on labelled defects: pass "
                "--val-data SPEC (normal and defect images with masks), or leave it false"
            )
        if self.method == "auto":
            return "f1" if labelled else "quantile"
        if labelled and self.method == "quantile":
            raise ConfigError(
                "calibration.method=quantile uses normal images only, but --val-data (a labelled "
                "validation set) was given: use calibration.method=f1 or recall with it, or calibrate "
                "on normal images with 'vpdm calibrate --data SPEC' (its train/good)"
            )
        if not labelled and self.method != "quantile":
            raise ConfigError(
                f"calibration.method={self.method} needs a labelled validation set (normal and defect "
                "images with masks): pass --val-data SPEC, or use calibration.method=quantile"
            )
        return self.method


@dataclass
class InferenceConfig:
    """How the frozen networks run when nothing is trained: every backbone forward (the backbone is never
    trained, so feature extraction in `vpdm train` too) and the denoiser when scoring.

    "fp32" (default): plain float32. "bf16" / "fp16": the backbone and the denoiser run under
    torch.autocast to that dtype (faster on GPUs with tensor cores), their outputs cast back to float32;
    the rest of scoring stays float32. Scores move by a small relative amount (README, "GPU"), so
    thresholds hold for the precision they were calibrated at, and features extracted at one precision
    have their own cache entry.
    """

    precision: str = "fp32"

    def validate(self) -> None:
        check_precision_name(self.precision)


def default_cache_dir() -> str:
    return os.environ.get("VPDM_CACHE_DIR", str(Path("~/.cache/vpdm/features").expanduser()))


@dataclass
class DataConfig:
    spec: str = "demo"  # e.g. "mvtec:/data/mvtec_anomaly_detection", "mvtec:/data/mvtec/bottle,mpdd:/data/mpdd"
    test_spec: str | None = None  # None = the same datasets' test splits
    cache_dir: str | None = None  # backbone feature cache; None = $VPDM_CACHE_DIR or ~/.cache/vpdm/features
    extract_batch_size: int = 16
    # An anomalous test image without a mask: "refuse" the data before any work (its pixels would all count
    # as normal), or "image_only": score it in the image metrics and leave it out of the pixel metrics.
    missing_masks: str = "refuse"

    def validate(self) -> None:
        if not isinstance(self.spec, str) or not self.spec.strip():
            raise ConfigError(
                f"data.spec must be a non-empty data spec such as 'mvtec:/path/to/mvtec', got {self.spec!r}"
            )
        if self.missing_masks not in MISSING_MASKS:
            raise ConfigError(
                f"data.missing_masks must be one of {', '.join(MISSING_MASKS)}, got {self.missing_masks!r}"
            )
        if not isinstance(self.extract_batch_size, int) or self.extract_batch_size < 1:
            raise ConfigError(f"data.extract_batch_size must be an integer >= 1, got {self.extract_batch_size!r}")


@dataclass
class VPDMConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)

    def validate(self) -> VPDMConfig:
        check_finite(self)  # one rule for every number, before each component's own checks
        self.backbone.validate()
        self.model.validate(self.backbone.feature_size)
        self.sampling.validate(self.model.diffusion.num_timesteps)
        self.scoring.validate()
        fine_terms = tuple(self.scoring.fine_pools) + tuple(self.scoring.image_terms()[1])
        if fine_terms and not self.model.fine.num_prototypes:
            raise ConfigError(
                "scoring.fine_pools / scoring.fine_image_pools score the fine prototypes' condition, but "
                "model.fine.num_prototypes=0 (none): set both to [] or give the model fine prototypes"
            )
        scoring = self.scoring
        if self.calibration.choose_map_weights and (
            scoring.combine != "standardised" or not scoring.pools or not scoring.fine_pools
        ):
            raise ConfigError(
                "calibration.choose_map_weights weighs the map's coarse terms against its fine ones: it needs "
                "scoring.combine=standardised and both scoring.pools and scoring.fine_pools non-empty; got "
                f"combine={scoring.combine}, pools={list(scoring.pools)}, fine_pools={list(scoring.fine_pools)}"
            )
        if self.model.prototypes.lists and self.train.prototype_lr_scale > 0:
            raise ConfigError(
                f"model.prototypes.list_size={self.model.prototypes.list_size} (short lists) needs frozen "
                f"prototypes (the lists are built once), but train.prototype_lr_scale="
                f"{self.train.prototype_lr_scale}: use prototypes.list_size=0 or train.prototype_lr_scale=0"
            )
        if self.model.prototypes.by_class and self.train.prototype_lr_scale > 0:
            raise ConfigError(
                "model.prototypes.per_class=true chooses each class's prototypes once (their number follows the "
                f"data), but train.prototype_lr_scale={self.train.prototype_lr_scale} would train them: use "
                "train.prototype_lr_scale=0 or prototypes.per_class=false"
            )
        for key in ("pools", "image_pools", "fine_pools", "fine_image_pools"):
            for p in getattr(self.scoring, key) or ():
                if self.backbone.feature_size % p:
                    raise ConfigError(
                        f"scoring.{key}: {p} must divide backbone.feature_size={self.backbone.feature_size}"
                    )
        self.train.validate()
        self.data.validate()
        self.calibration.validate()
        self.inference.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VPDMConfig:
        return from_dict(cls, drop_retired(data) if isinstance(data, dict) else data, "")

    def with_overrides(self, overrides: list[str] | dict[str, Any]) -> VPDMConfig:
        return apply_overrides(self, overrides)


def _override_pairs(overrides: list[str] | dict[str, Any]) -> list[tuple[str, Any]]:
    """``["a.b=1", ...]`` or ``{"a.b": 1}`` -> ``[("a.b", 1), ...]`` (strings parsed as YAML)."""
    if isinstance(overrides, dict):
        return list(overrides.items())
    pairs = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} must look like section.key=value, e.g. model.prototypes.num_prototypes=20"
            )
        key, raw = item.split("=", 1)
        try:
            value = load_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({str(exc).splitlines()[0]})") from None
        pairs.append((key.strip(), value))
    return pairs


# The settings a trained model was built for: its weights only mean something with them.
CHECKPOINT_SECTIONS: tuple[str, ...] = ("backbone", "model")


def inference_overrides(config: VPDMConfig, overrides: list[str] | dict[str, Any], command: str) -> VPDMConfig:
    """``config`` (a checkpoint's) with ``overrides`` applied, refusing those that change what the checkpoint means.

    ``backbone.*`` (network, weights, stages, feature and image size) and ``model.*`` are what the weights
    were trained for: features of another backbone or size would be scored as nonsense, or not fit at all.
    Sampling, scoring, data, ``inference.precision`` and ``train.threads`` / ``train.batch_size`` /
    ``train.device`` may change.
    """
    pairs = _override_pairs(overrides)
    fixed = [key for key, _ in pairs if key.split(".", 1)[0] in CHECKPOINT_SECTIONS]
    if fixed:
        raise ConfigError(
            f"{command} cannot change {', '.join(fixed)}: backbone.* and model.* settings are what the checkpoint's "
            "weights were trained for (another backbone or feature size would give meaningless scores); "
            "train a model with them instead. Sampling, scoring, data and inference settings may change."
        )
    return apply_overrides(config, dict(pairs))


def apply_overrides(config: VPDMConfig, overrides: list[str] | dict[str, Any]) -> VPDMConfig:
    """Return a copy with ``a.b.c=value`` overrides applied (values parsed as YAML: 10, 1e-3, true, [1,2])."""
    pairs = _override_pairs(overrides)
    data = to_dict(config)
    expanded: list[tuple[str, Any]] = []
    for key, value in pairs:  # a section given as a mapping (`train={epochs: 3}`) merges into it, key by key
        node: Any = data
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"{key!r} is a section; give a mapping ({key}={{key: value}}) or one setting "
                    f"({key}.<key>=value), got {value!r}"
                )
            expanded.extend(flatten_dict(value, f"{key}.").items() if value else [])
        else:
            expanded.append((key, value))
    for key, value in expanded:
        if key in RETIRED:  # at its remaining value it changes nothing; another value is refused by from_dict
            *sections, name = key.split(".")
            node = data
            for section in sections:
                node = node.setdefault(section, {})
            node[name] = value
            continue
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"unknown setting {key!r}: {part!r} is not a section")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"unknown setting {key!r}; known in that section: {sorted(node)}")
        node[parts[-1]] = value
    return VPDMConfig.from_dict(data)


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, preset: str | None = None
) -> VPDMConfig:
    """Defaults, then a named preset (``PRESETS``, e.g. ``paper``), then a YAML file (partial is fine),
    then overrides; validated."""
    config = VPDMConfig()
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"preset {preset!r} is unknown; expected one of {sorted(PRESETS)}")
        config = apply_overrides(config, PRESETS[preset])
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = load_yaml(path.read_text(), str(path)) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
        config = apply_overrides(config, flatten_dict(data))
    if overrides:
        config = apply_overrides(config, overrides)
    return config.validate()


def save_config(config: VPDMConfig, path: str | Path) -> Path:
    return atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False), what="config")
