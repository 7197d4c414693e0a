"""Readable differences between two state dicts, for the errors of checkpoints and backbone weights that do
not fit the model they are loaded into."""

from __future__ import annotations

from typing import Any

import torch


def _shape(value: Any) -> str:
    return "x".join(map(str, value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def state_dict_differences(expected: dict[str, Any], got: dict[str, Any], shown: int = 5) -> list[str]:
    """Readable differences between two state dicts: tensors of another shape, missing and unexpected ones."""
    out = []
    differ = [
        f"{k} (checkpoint {_shape(got[k])}, model {_shape(expected[k])})"
        for k in sorted(set(got) & set(expected))
        if not isinstance(got[k], torch.Tensor) or tuple(got[k].shape) != tuple(expected[k].shape)
    ]
    for label, items in (
        ("tensors of another shape", differ),
        ("missing", sorted(set(expected) - set(got))),
        ("unexpected", sorted(set(got) - set(expected))),
    ):
        if items:
            more = f", ... ({len(items) - shown} more)" if len(items) > shown else ""
            out.append(f"{label}: {', '.join(items[:shown])}{more}")
    return out
