"""Reduced-precision inference (``inference.precision``): autocast for the backbone and the denoiser.

Only the two networks run under :func:`torch.autocast`; everything around them (feature
normalisation, the diffusion update, distances, scores, maps) stays float32, and their outputs are
cast back to float32. Training steps never use it. Kept free of the config module so that
:mod:`vpdm.features.backbone` (which the config imports) can use it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch

from vpdm.errors import ConfigError

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision_name(precision: str) -> None:
    """ConfigError for anything but fp32 / bf16 / fp16."""
    if precision not in PRECISIONS:
        raise ConfigError(f"inference.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``precision``; None for fp32 (no autocast)."""
    check_precision_name(precision)
    return _DTYPES.get(precision)


def check_precision(precision: str, device: torch.device | str) -> None:
    """ConfigError when this torch cannot autocast to ``precision`` on ``device``.

    torch does not raise for an unsupported (device, dtype) pair: it warns and silently runs in
    float32, so a user asking for bf16 would measure fp32 and not know it. This tries it instead.
    """
    dtype = autocast_dtype(precision)
    if dtype is None:
        return
    device_type = torch.device(device).type
    problem = ""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.autocast(device_type=device_type, dtype=dtype):
                enabled = torch.is_autocast_enabled(device_type)
        if not enabled or any("not supported" in str(w.message) for w in caught):
            problem = "; ".join(str(w.message).splitlines()[0] for w in caught) or "autocast stays disabled"
    except (RuntimeError, ValueError) as exc:  # e.g. a device type without autocast
        problem = str(exc).splitlines()[0]
    if problem:
        raise ConfigError(
            f"inference.precision={precision!r} is not supported on device {str(device)!r} by torch "
            f"{torch.__version__} ({problem}); use inference.precision=fp32"
        )


@contextlib.contextmanager
def autocast(precision: str, device: torch.device | str) -> Iterator[None]:
    """``torch.autocast`` to ``precision`` on ``device``'s type; nothing for fp32."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
        yield
