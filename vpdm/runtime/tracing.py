"""Building constants inside a traced forward (``torch.onnx.export``), so one forward serves torch and the graph.

A forward that makes a tensor from the shapes it sees (an averaging matrix, an upsampling matrix) would,
when traced, record every op of that making as graph nodes, in-place ones among them. Made under
:func:`untraced`, the tensor is an ordinary value to the tracer: the graph holds it as a constant.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def is_tracing() -> bool:
    """Whether a torch.jit / torch.onnx trace is recording the ops run now."""
    return torch._C._get_tracing_state() is not None


@contextmanager
def untraced() -> Iterator[None]:
    """Run the body with tracing paused (nothing it does is recorded); outside a trace it changes nothing."""
    state = torch._C._get_tracing_state()
    if state is None:
        yield
        return
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)
