"""Timing, memory and environment facts for the benchmark's speed section."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _status_mb(field: str) -> float | None:
    """One ``/proc/self/status`` field in MiB (``RssAnon``: memory that is the process's own, which the OS
    can only swap out; ``RssFile``: pages of mapped files, which it can drop and read again), or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class AnonymousPeak:
    """The peak of ``RssAnon`` while the block runs, sampled every ``interval`` seconds by a thread.

    ``ru_maxrss`` counts mapped file pages too (the memory-mapped feature cache once it has been read); what
    must fit in memory is the anonymous part. ``peak_mb`` is None where /proc is not there."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval, self.peak_mb = interval, _status_mb("RssAnon")
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        assert self._stop is not None
        while not self._stop.wait(self.interval):
            self._update()

    def _update(self) -> None:
        now = _status_mb("RssAnon")
        if now is not None:
            self.peak_mb = max(self.peak_mb or 0.0, now)

    def __enter__(self) -> AnonymousPeak:
        if self.peak_mb is not None:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, name="rss-anon", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None and self._stop is not None:
            self._stop.set()
            self._thread.join()
            self._update()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int, warmup: int = 1
) -> dict[str, dict[str, Any]]:
    """Wall time of each callable (seconds): ``warmup`` untimed rounds, then ``repeats`` rounds that
    run every callable once in turn, so a burst of load from other processes hits all of them
    alike. Reports the min (the least disturbed run: used for the ratios) and the median."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: {"min": min(t), "median": statistics.median(t), "all": t} for name, t in times.items()}


def versions() -> dict[str, Any]:
    import timm

    import vpdm

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "vpdm": vpdm.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    if hasattr(os, "sched_getaffinity"):
        info["cpus_available"] = len(os.sched_getaffinity(0))
    try:
        here = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--", "vpdm"],
                cwd=here.parent,
                capture_output=True,
                text=True,
                timeout=10,
            )
            info["git_dirty_vpdm"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info
