"""glibc's allocator set to keep a forward pass's large work buffers instead of mapping them anew every call.

glibc serves a block above ``M_MMAP_THRESHOLD`` as a fresh mapping and unmaps it on free, and returns the heap's
free top to the system above ``M_TRIM_THRESHOLD``. Its default threshold adapts only up to 32 MiB, and a batch
of 16 through the backbone needs larger buffers, so a fresh process maps, zero-fills page by page and unmaps
them in every forward pass. On the 2-core CPU of ``benchmarks/EXPERIMENTS.md`` section 24 that took the
EfficientNet-Lite2 backbone from 15-16 to 27-28 ms per image, and the detector end to end from 30.3 to 41.5 ms.
A long process that happened to free such blocks earlier (the benchmark) ran fast already; this makes every
process do so. The cost: freed memory below the threshold stays in the process for its next batch instead of
going back to the system. Opt out with ``VPDM_KEEP_LARGE_BUFFERS=0`` (or by preloading another allocator).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

__all__ = ["LARGE_BUFFER_BYTES", "keep_large_buffers"]

logger = logging.getLogger(__name__)

# glibc's malloc.h parameter numbers.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Above a batch of 16 images' largest work buffers at 224-448 px; below any real data or model size.
LARGE_BUFFER_BYTES = 256 * 1024 * 1024
_done: bool | None = None


def keep_large_buffers(threshold: int = LARGE_BUFFER_BYTES) -> bool:
    """Set both glibc thresholds to ``threshold`` bytes for this process, once; True when they are set.

    False, doing nothing, off Linux, where the C library has no ``mallopt`` (musl), where glibc refuses the
    values, or with ``VPDM_KEEP_LARGE_BUFFERS=0``. The command line and ``jobs/score.py`` call it at start;
    a program that imports vpdm as a library calls it itself if it wants the speed."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("VPDM_KEEP_LARGE_BUFFERS", "1").strip() in ("0", "false", "no", "off"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = mallopt(_M_MMAP_THRESHOLD, threshold) == 1 and mallopt(_M_TRIM_THRESHOLD, threshold) == 1
    if not _done:
        logger.info("glibc refused the large-buffer thresholds (%d bytes); the allocator keeps its defaults", threshold)
    return _done
