"""Writes that fail for real (file-size limit, full file system, a file where a folder should be).

Run as root, chmod does not block writes, so faults are injected by the kernel: RLIMIT_FSIZE gives
EFBIG, a tiny tmpfs in a private mount namespace gives ENOSPC, /dev/full gives ENOSPC on any write.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vpdm.errors import OutputError, VPDMError
from vpdm.io import atomic_torch_save, atomic_write_text, writable_dir, writing

REPO_ROOT = Path(__file__).resolve().parents[1]


def file_size_limit(limit: int):
    """preexec_fn for a child whose regular-file writes past ``limit`` bytes fail with EFBIG (not SIGXFSZ)."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the ignored disposition survives exec
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".vpdm-write-test"))


def test_efbig_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "model.pt"
    atomic_torch_save({"version": "old"}, target)
    before = target.read_bytes()
    script = textwrap.dedent("""
        import sys, torch
        from vpdm.errors import OutputError
        from vpdm.io import atomic_torch_save
        try:
            atomic_torch_save({"w": torch.zeros(200_000)}, sys.argv[1], what="checkpoint")  # 800 KB
        except OutputError as exc:
            print(exc)
            sys.exit(3)
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(target)], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120, preexec_fn=file_size_limit(64 * 1024))
    assert proc.returncode == 3, proc.stderr[-2000:]
    message = proc.stdout.strip()
    assert message.startswith(f"cannot write checkpoint {str(target)!r}: file too large (EFBIG)"), message
    assert "ulimit -f" in message
    assert target.read_bytes() == before  # the previous checkpoint survives
    assert torch.load(target, weights_only=True) == {"version": "old"}
    assert _leftovers(tmp_path) == []


def test_a_file_in_place_of_a_folder_is_named(tmp_path):
    blocker = tmp_path / "runs"
    blocker.write_text("I am a file")
    for path in (blocker / "model.pt", blocker / "sub" / "model.pt"):
        with pytest.raises(OutputError) as info:
            atomic_torch_save({"a": 1}, path, what="checkpoint")
        assert str(info.value) == f"cannot write checkpoint {str(path)!r}: {str(blocker)!r} is a file, not a folder"
    for folder in (blocker, blocker / "sub"):
        with pytest.raises(OutputError, match="is a file, not a folder") as info:
            writable_dir(folder)
        assert str(folder) in str(info.value)
    assert blocker.read_text() == "I am a file"
    assert isinstance(info.value, VPDMError)


def test_an_existing_folder_at_the_target_is_refused_and_kept(tmp_path):
    (tmp_path / "scores.csv").mkdir()
    with pytest.raises(OutputError, match=r"cannot write scores .*scores\.csv.*is a directory \(EISDIR\)"):
        atomic_write_text(tmp_path / "scores.csv", "path,score\n", what="scores")
    assert (tmp_path / "scores.csv").is_dir() and _leftovers(tmp_path) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_dev_full_gives_a_named_enospc():
    with pytest.raises(OutputError) as info, writing("/dev/full", "overlay"):
        with open("/dev/full", "wb") as f:
            f.write(b"x" * 10)
    assert str(info.value) == ("cannot write overlay '/dev/full': no space left on device (ENOSPC); "
                               "free some space or write somewhere else")


def _private_tmpfs_works() -> bool:
    if shutil.which("unshare") is None or sys.platform != "linux":
        return False
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs \"$d\" && umount \"$d\"; rmdir \"$d\""],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.skipif(not _private_tmpfs_works(), reason="needs unshare + mount (root or CAP_SYS_ADMIN)")
def test_full_file_system_enospc(tmp_path):
    """A 256 KiB tmpfs, private to the child: a big write fails, a full one refuses even the folder probe."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = textwrap.dedent("""
        import json, sys, torch
        from pathlib import Path
        from vpdm.errors import OutputError
        from vpdm.io import atomic_torch_save, writable_dir
        mnt = Path(sys.argv[1])
        out = {}
        atomic_torch_save({"version": "old"}, mnt / "model.pt")
        before = (mnt / "model.pt").read_bytes()
        writable_dir(mnt / "run")                      # room left: fine
        try:
            atomic_torch_save({"w": torch.zeros(1_000_000)}, mnt / "model.pt", what="checkpoint")  # 4 MB
        except OutputError as exc:
            out["save"] = str(exc)
        out["kept"] = (mnt / "model.pt").read_bytes() == before
        out["files_after_save"] = sorted(p.name for p in mnt.iterdir())
        with open(mnt / "filler", "wb", buffering=0) as f:  # fill the rest
            try:
                while True:
                    f.write(b"\\0" * 4096)
            except OSError:
                pass
        try:
            writable_dir(mnt / "run")
        except OutputError as exc:
            out["probe"] = str(exc)
        out["files_after_probe"] = sorted(p.name for p in (mnt / "run").iterdir())
        print(json.dumps(out))
    """)
    cmd = 'mount -t tmpfs -o size=256k tmpfs "$1" && exec "$2" -c "$3" "$1"'
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", cmd, "sh", str(mnt),
                           sys.executable, script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["save"] == (f"cannot write checkpoint {str(mnt / 'model.pt')!r}: no space left on device (ENOSPC); "
                           "free some space or write somewhere else")
    assert got["kept"] is True
    assert got["files_after_save"] == ["model.pt", "run"]  # no temporary left behind
    assert got["probe"].startswith(f"cannot write output folder {str(mnt / 'run')!r}: no space left on device (ENOSPC)")
    assert got["files_after_probe"] == []
    assert not any(mnt.iterdir())  # the tmpfs lived only in the child's namespace


def test_written_files_follow_the_umask_like_open(tmp_path):
    from vpdm.io import atomic_write_text

    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with open(tmp_path / "b.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o640
