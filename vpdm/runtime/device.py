"""Which torch device a setting names, checked before any work starts."""

from __future__ import annotations

import torch

from vpdm.errors import VPDMError
from vpdm.runtime.precision import check_precision


def select_device(
    name: str | torch.device = "auto", what: str = "train.device", precision: str = "fp32"
) -> torch.device:
    """The torch device ``name`` means ("auto": cuda when available, else cpu), checked to exist now, and to
    run ``precision`` (``inference.precision``), so that a typo, a GPU that is not there or an autocast this
    torch would silently skip fails before any image is read. ``what`` names the setting in errors."""
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except (RuntimeError, TypeError):
            raise VPDMError(
                f"{what}={name!r} is not a torch device (expected 'auto', 'cpu', 'cuda', 'cuda:N')"
            ) from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise VPDMError(f"{what}={name!r} but no CUDA device is available; use 'cpu' or 'auto'")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise VPDMError(
                    f"{what}={name!r} but this machine has {torch.cuda.device_count()} CUDA device(s) "
                    f"(cuda:0..cuda:{torch.cuda.device_count() - 1})"
                )
    check_precision(precision, device)
    return device
