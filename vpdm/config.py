"""Typed configuration of a whole run, with the paper's defaults.

Each component owns its own dataclass (``BackboneConfig`` in ``backbone``, ``VPOTConfig`` in
``vpot``, ...). This module composes them, loads them from YAML and applies ``key.sub=value``
overrides typed on the command line, and validates everything before any long work starts.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vpdm.backbone import BackboneConfig
from vpdm.data import MISSING_MASKS
from vpdm.denoiser import DenoiserConfig
from vpdm.diffusion import NoiseScheduleConfig, ReverseSampler, ShiftedDiffusion, make_sampler
from vpdm.errors import ConfigError
from vpdm.io import atomic_write_text
from vpdm.precision import check_precision_name
from vpdm.scoring import ScoringConfig
from vpdm.vpot import FineConfig, VPOTConfig

SAMPLERS = ("ddpm", "ddim")
INPUT_COPIES = ("none", "dropout", "jitter")

# The paper's literal method as overrides: whole-image prototypes matched by batch OT, eps-prediction
# with the plain eps-MSE, the chain from N(yhat, I), L2 over all standardised channels, max of the
# average-pooled map. The sampler is the accelerated one (DDIM, 3 trailing steps, which matched the
# 1000-step chain on the benchmark subset); Algorithm 2 itself is sampling.sampler=ddpm, num_steps=1000.
# Every key is set explicitly, so the preset stays the paper whatever the defaults become.
PAPER: dict[str, Any] = {
    "model.prototypes.level": "image",
    "model.prototypes.num_prototypes": 50,
    "model.prototypes.downsample": 4,
    "model.prototypes.ot_reg": 0.05,
    "model.prototypes.assignment": "ot",
    "model.prototypes.init": "samples",
    "model.prototypes.ot_scope": "batch",
    "model.prototypes.list_size": 0,
    "model.ot_weight": 1.0,
    "model.diffusion.schedule": "linear",
    "model.diffusion.num_timesteps": 1000,
    "model.diffusion.beta_start": 1e-4,
    "model.diffusion.beta_end": 0.02,
    "model.diffusion.shift_to_condition": True,
    "model.diffusion.prediction": "eps",
    "model.loss_weighting": "none",
    "model.train_max_step": None,
    "model.input_copy": "none",
    "sampling.sampler": "ddim",
    "sampling.num_steps": 3,
    "sampling.spacing": "trailing",
    "sampling.start_step": None,
    "scoring.distance": "l2",
    "scoring.per_stage": False,
    "scoring.feature_space": "normalised",
    "scoring.image_score": "max_pool",
    "scoring.aggregate": 1,
    "scoring.pools": [1],
    "scoring.image_pools": None,
    "scoring.fine_pools": [],
    "scoring.fine_image_pools": None,
    "scoring.combine": "weighted",
    "model.fine.num_prototypes": 0,
    "train.lr": 1e-3,
    "train.batch_size": 32,
    "train.lr_schedule": "constant",
    "train.warmup_fraction": 0.0,
    "train.ema_decay": 0.0,
    "train.prototype_lr_scale": 1.0,
}
PRESETS: dict[str, dict[str, Any]] = {"paper": PAPER}

# Settings added after vpdm 0.1.0, with the value that reproduces how a model saved before they
# existed was built and scored. A saved config that lacks one of them gets this value, never the new
# default (which would rebuild a different model from the same weights).
LEGACY_VALUES: dict[str, Any] = {
    "backbone.resize": "bilinear",
    "model.prototypes.level": "image",
    "model.prototypes.init": "samples",
    "model.prototypes.kmeans_iters": 20,
    "model.prototypes.ot_scope": "batch",
    "model.prototypes.potential_lr": 0.1,
    "model.diffusion.prediction": "eps",
    "model.loss_weighting": "none",
    "model.min_snr_gamma": 5.0,
    "model.train_max_step": None,
    "model.input_copy": "none",
    "model.input_copy_strength": 0.2,
    "sampling.start_step": None,
    "scoring.distance": "l2",
    "scoring.per_stage": False,
    "scoring.feature_space": "normalised",
    "scoring.image_score": "max_pool",
    "scoring.top_k_percent": 1.0,
    "scoring.aggregate": 1,
    "scoring.pools": [1],
    "scoring.image_pools": None,
    "scoring.fine_pools": [],
    "scoring.fine_image_pools": None,
    "scoring.combine": "weighted",
    "model.fine": {"num_prototypes": 0},
    "model.prototypes.list_size": 0,
    "train.prototype_lr_scale": 1.0,
    "train.lr_schedule": "constant",
    "train.warmup_fraction": 0.0,
    "train.ema_decay": 0.0,
    "train.calibration_fraction": 0.0,  # trained on every train/good image: no held-out calibration images
}


# Settings retired because no measurement showed where they win (the record stays in
# benchmarks/EXPERIMENTS.md), with the one value the code still has. A saved config (an older checkpoint, a
# logged run) or a written one may name a retired setting at that value, and it is dropped; any other value
# is refused, naming the setting, for the code that gave it a meaning is gone.
RETIRED: dict[str, tuple[Any, str]] = {
    "model.feature_jitter": (
        0.0,
        "Gaussian jitter of the training features, never screened ahead of the default (EXPERIMENTS section 6)",
    ),
}


def drop_retired(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a nested config mapping) without its retired settings at their remaining value; a retired
    setting at another value is a :class:`ConfigError`."""
    import copy

    data = copy.deepcopy(data)
    for key, (kept, why) in RETIRED.items():
        *sections, name = key.split(".")
        node = data
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if isinstance(node, dict) and name in node:
            if node[name] != kept:
                raise ConfigError(
                    f"{key}={node[name]!r}: this setting was retired ({why}); this vpdm only has {key}={kept!r}. "
                    "Train the model again without it, or score it with the vpdm version that wrote it"
                )
            del node[name]
    return data


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
class ModelConfig:
    """The trainable part: prototypes, noise process, denoiser, and how they are combined."""

    prototypes: VPOTConfig = field(default_factory=VPOTConfig)
    # Per-position prototypes beside the vague ones, compared with the features directly (0 = none).
    fine: FineConfig = field(default_factory=FineConfig)
    # x0-prediction (the paper: eps): one step from N(yhat, I) is then the decoder's conditional mean, not
    # an eps estimate divided by sqrt(abar_T) ~ 0.006.
    diffusion: NoiseScheduleConfig = field(default_factory=lambda: NoiseScheduleConfig(prediction="x0"))
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    ot_weight: float = 1.0  # lambda_OT in L = eps-MSE + lambda_OT * L_OT
    # Per-channel standardisation of the backbone features (statistics of the training set). The
    # diffusion endpoint N(yhat, I) assumes unit-scale data; raw EfficientNet stages differ in scale by 10x.
    feature_norm: str = "channel"  # "channel" or "none"
    # Weighting of the diffusion loss over timesteps: "none" (plain MSE in the prediction's space: the
    # paper's eps-MSE) or "min_snr" (Hang et al. 2023: every timestep's x0 error weighted min(SNR, gamma)).
    loss_weighting: str = "min_snr"
    min_snr_gamma: float = 5.0
    # Training timesteps are drawn from 1..train_max_step (None = T, the paper). A chain that starts
    # below T (sampling.start_step) never visits larger t, so training there spends capacity it never uses.
    train_max_step: int | None = None
    # Training augmentation: Gaussian noise of this std (standardised feature units) on the features the
    # network sees, while the targets stay clean (UniAD's feature jitter). 0 = off.
    # What the denoiser sees of the image besides the chain and yhat. "none" (the paper): nothing, the
    # image enters only through yhat. "dropout" / "jitter": also a copy of the image's own standardised
    # features, perturbed while training (each value zeroed with probability ``input_copy_strength`` and
    # the rest rescaled: Dinomaly's dropout bottleneck; or Gaussian noise of that std: UniAD's feature
    # jitter, whose scale 20 over 256 channels is about 1.25) and clean at inference, as both do. A
    # direct path for the image: it may pass defects through (the identical shortcut); the bench's
    # defect/outside error measures how much.
    input_copy: str = "none"
    input_copy_strength: float = 0.2

    def validate(self, feature_size: int | None = None) -> None:
        self.prototypes.validate(feature_size)
        self.fine.validate(feature_size)
        self.diffusion.validate()
        self.denoiser.validate()
        if self.loss_weighting not in ("none", "min_snr"):
            raise ConfigError(f"model.loss_weighting must be 'none' or 'min_snr', got {self.loss_weighting!r}")
        if not (
            isinstance(self.min_snr_gamma, (int, float))
            and math.isfinite(self.min_snr_gamma)
            and self.min_snr_gamma > 0
        ):
            raise ConfigError(f"model.min_snr_gamma must be a finite number > 0, got {self.min_snr_gamma!r}")
        if self.input_copy not in INPUT_COPIES:
            raise ConfigError(f"model.input_copy must be one of {INPUT_COPIES}, got {self.input_copy!r}")
        strength = self.input_copy_strength
        if not (
            isinstance(strength, (int, float))
            and not isinstance(strength, bool)
            and math.isfinite(strength)
            and strength >= 0
            and (self.input_copy != "dropout" or strength < 1)
        ):
            raise ConfigError(
                "model.input_copy_strength must be a finite number >= 0 (and < 1 for dropout, a "
                f"probability), got {strength!r}"
            )
        t = self.diffusion.num_timesteps
        if self.train_max_step is not None and (
            not isinstance(self.train_max_step, int)
            or isinstance(self.train_max_step, bool)
            or not 1 <= self.train_max_step <= t
        ):
            raise ConfigError(
                f"model.train_max_step must be an integer in 1..{t} (T) or null, got {self.train_max_step!r}"
            )
        if not (self.ot_weight >= 0 and math.isfinite(self.ot_weight)):
            raise ConfigError(f"model.ot_weight must be a finite number >= 0, got {self.ot_weight!r}")
        if self.feature_norm not in ("channel", "none"):
            raise ConfigError(f"model.feature_norm must be 'channel' or 'none', got {self.feature_norm!r}")


@dataclass
class SamplingConfig:
    """How the reverse chain is run at scoring time.

    The paper runs the full 1000-step ancestral chain (``sampler='ddpm'``, ``num_steps=1000``).
    The default here is the accelerated deterministic DDIM chain on ``z = x - yhat`` with 3
    trailing-spaced steps; the benchmark reports AUROC against the number of steps.
    """

    sampler: str = "ddim"
    num_steps: int = 1
    eta: float = 0.0  # DDIM only: 0 deterministic, 1 ancestral variance; the ddpm sampler ignores it
    # Timesteps of a shortened chain: "trailing" (T-1, T-1-T/n, ...: every step removes noise) or
    # "linspace" (evenly over 0..T-1, so the last step starts at t=0 and barely changes x). On the four
    # real datasets trailing DDIM 3 matched the 1000-step chain's image AUROC on the 40-image subset
    # (83.0 vs 83.0) where linspace DDIM 3 (= trailing 2 plus a t=0 step) trailed it (benchmarks/).
    spacing: str = "trailing"
    # Where the reverse chain starts, as the paper's 1-based t: null or T = the paper's N(yhat, I), where
    # the image enters only through yhat; below T the chain starts from the image's own features noised
    # to that step by the shifted forward marginal (as DDAD and DiffusionAD do).
    start_step: int | None = None
    seed: int = 0  # every image gets the same noise stream, so its score never depends on its batch

    def build(self, process: ShiftedDiffusion) -> ReverseSampler:
        """The configured sampler for ``process`` (``eta`` is DDIM's; the ddpm sampler has none)."""
        return make_sampler(process, self.sampler, self.eta if self.sampler == "ddim" else None)

    def validate(self, num_timesteps: int | None = None) -> None:
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampling.sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ConfigError(f"sampling.num_steps must be an integer >= 1, got {self.num_steps!r}")
        if num_timesteps is not None and self.num_steps > num_timesteps:
            raise ConfigError(
                f"sampling.num_steps={self.num_steps} exceeds the number of diffusion timesteps T={num_timesteps}"
            )
        if not 0.0 <= self.eta <= 1.0:
            raise ConfigError(f"sampling.eta must be in [0, 1], got {self.eta!r}")
        if self.spacing not in ("linspace", "trailing"):
            raise ConfigError(f"sampling.spacing must be 'linspace' or 'trailing', got {self.spacing!r}")
        if self.start_step is not None:
            if (
                not isinstance(self.start_step, int)
                or isinstance(self.start_step, bool)
                or self.start_step < 1
                or (num_timesteps is not None and self.start_step > num_timesteps)
            ):
                raise ConfigError(
                    f"sampling.start_step must be an integer in 1..T={num_timesteps} or null, got {self.start_step!r}"
                )
            if self.num_steps > self.start_step:
                raise ConfigError(
                    f"sampling.num_steps={self.num_steps} exceeds sampling.start_step={self.start_step}: a chain "
                    "started at step s has at most s steps"
                )


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
    lr_schedule: str = "constant"  # "constant" (the paper) or "cosine" (decay to 0 over the run)
    warmup_fraction: float = 0.0  # linear warm-up over this fraction of all steps
    # Exponential moving average of the weights, used for every evaluation and the saved model; 0 = off.
    ema_decay: float = 0.0
    # Fraction of each class's train/good images held out (seeded by train.seed, at least 2 per class) to
    # calibrate the decision thresholds after training (vpdm.calibration); 0 = train on all, no thresholds.
    calibration_fraction: float = 0.1
    # `vpdm train` writes a resumable state (vpdm.resume) every this many epochs; 0 = never.
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
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"train.lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if not (isinstance(self.warmup_fraction, (int, float)) and 0 <= self.warmup_fraction < 1):
            raise ConfigError(f"train.warmup_fraction must be a number in [0, 1), got {self.warmup_fraction!r}")
        if not (isinstance(self.ema_decay, (int, float)) and 0 <= self.ema_decay < 1):
            raise ConfigError(f"train.ema_decay must be a number in [0, 1) (0 = off), got {self.ema_decay!r}")
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
    """How decision thresholds are calibrated (vpdm.postprocess, vpdm.calibration)."""

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

    def resolve(self, labelled: bool) -> str:
        """The method to use, with or without a labelled validation set; ConfigError for a mismatch."""
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
        if self.model.prototypes.lists and self.train.prototype_lr_scale > 0:
            raise ConfigError(
                f"model.prototypes.list_size={self.model.prototypes.list_size} (short lists) needs frozen "
                f"prototypes (the lists are built once), but train.prototype_lr_scale="
                f"{self.train.prototype_lr_scale}: use prototypes.list_size=0 or train.prototype_lr_scale=0"
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


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def check_finite(config: Any, prefix: str = "") -> None:
    """Refuse NaN and infinity in every float, and integers beyond 64 bits, of a (nested) config dataclass,
    naming the setting.

    One generic rule rather than a check in each component: a comparison such as ``value >= 0`` is
    False for NaN, so a forgotten check would let ``train.weight_decay=nan`` train a model of NaNs; and
    torch, numpy and the checkpoint store integers in 64 bits, so ``train.seed=10**23`` would fail
    after feature extraction instead of now.
    """
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_finite(value, name + ".")
            continue
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"{name} must be a finite number, got {item!r}")
            if isinstance(item, int) and not isinstance(item, bool) and not INT64_MIN <= item <= INT64_MAX:
                raise ConfigError(
                    f"{name} must be an integer that fits in 64 bits ({INT64_MIN}..{INT64_MAX}), got {item}"
                )


def to_dict(config: Any) -> dict[str, Any]:
    """Plain dict of builtins (lists for tuples) - safe for YAML, JSON, MLflow params and weights_only checkpoints."""

    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        return value

    return convert(config)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping of {hint.__name__} settings, got {value!r}")
        return from_dict(hint, value, where + ".")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        return _coerce(value, others[0], where) if len(others) == 1 else value
    if origin is tuple:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]  # a single value for a list setting: scoring.pools=4 means [4]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return tuple(_coerce(v, args[0], where) for v in value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and not (
        isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{where} must be of type {hint.__name__}, got {value!r}")
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build a (nested) dataclass from a dict, rejecting unknown keys and wrong types by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {[prefix + u for u in unknown]}; known: {sorted(prefix + k for k in known)}"
        )
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    return cls(**kwargs)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (YAML would keep the last, silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                where = f" in {self.name}" if getattr(self, "name", None) not in (None, "<unicode string>") else ""
                raise ConfigError(
                    f"setting {key!r} is given twice{where}, on lines {seen[key]} and {line}; keep one "
                    "(YAML would silently keep the last)"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, name: str | None = None) -> Any:
    """``yaml.safe_load`` of a settings text that refuses duplicate keys (:class:`ConfigError` naming the key
    and both lines; ``name``, the file, in the message)."""
    loader = _UniqueKeyLoader(text)
    if name is not None:
        loader.name = name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


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


def flatten_dict(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> ``{"a.b.c": value}`` (YAML sections, MLflow params and tags)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(flatten_dict(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def save_config(config: VPDMConfig, path: str | Path) -> Path:
    return atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False), what="config")
