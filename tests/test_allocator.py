"""The allocator setting the command line applies: large buffers come from the heap, not fresh mappings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not Path("/proc/self/maps").is_file(),
    reason="glibc's mallopt and /proc/self/maps are Linux's",
)

# Where a 64 MiB tensor's bytes live: the mapping of /proc/self/maps that holds its first byte.
_PROBE = """
import sys, torch
from vpdm.runtime.allocator import keep_large_buffers
print(keep_large_buffers() if sys.argv[1] == "call" else None)
t = torch.empty(16 * 2**20)
t.fill_(1.0)
p = t.data_ptr()
for line in open("/proc/self/maps"):
    fields = line.split()
    lo, hi = (int(x, 16) for x in fields[0].split("-"))
    if lo <= p < hi:
        print(fields[5] if len(fields) > 5 else "anonymous", hi - lo >= 64 * 2**20)
"""


def _probe(call: bool, **env: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, "call" if call else "skip"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
    ).stdout.split("\n")
    return [line for line in out if line]


def test_large_buffers_come_from_the_heap_once_set_and_from_their_own_mapping_otherwise() -> None:
    if "[heap]" not in Path("/proc/self/maps").read_text():
        pytest.skip("this process has no brk heap to compare with")
    assert _probe(False) == ["None", "anonymous True"]  # glibc's default: a mapping of its own
    assert _probe(True) == ["True", "[heap] True"]


def test_the_setting_can_be_declined_by_environment() -> None:
    assert _probe(True, VPDM_KEEP_LARGE_BUFFERS="0") == ["False", "anonymous True"]
