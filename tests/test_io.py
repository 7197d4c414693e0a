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
# Bound on child processes: generous, so that a machine loaded by other jobs is slow, not failing.
PATIENCE_S = 1800


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
    proc = subprocess.run(
        [sys.executable, "-c", script, str(target)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=PATIENCE_S,
        preexec_fn=file_size_limit(64 * 1024),
    )
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
    assert str(info.value) == (
        "cannot write overlay '/dev/full': no space left on device (ENOSPC); free some space or write somewhere else"
    )


def _private_tmpfs_works() -> bool:
    if shutil.which("unshare") is None or sys.platform != "linux":
        return False
    probe = subprocess.run(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            'd=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs "$d" && umount "$d"; rmdir "$d"',
        ],
        capture_output=True,
        timeout=PATIENCE_S,
    )
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
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", cmd, "sh", str(mnt), sys.executable, script],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=PATIENCE_S,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["save"] == (
        f"cannot write checkpoint {str(mnt / 'model.pt')!r}: no space left on device (ENOSPC); "
        "free some space or write somewhere else"
    )
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


# --------------------------------------------------------------------------------------------
# one run per folder: replacing a run as a whole
# --------------------------------------------------------------------------------------------

NEW_FILES = ("model.pt", "config.yaml", "history.json")


def _old_run_and_new_files(root: Path) -> tuple[Path, dict[str, Path]]:
    """A run folder holding an old run (every output, plots/ too) and this run's prepared temporaries."""
    from vpdm.io import RUN_OUTPUTS

    out = root / "run"
    out.mkdir(parents=True)
    for name in RUN_OUTPUTS:
        if name == "plots":
            (out / name).mkdir()
            (out / name / "roc.png").write_text("old plots/roc.png")
        else:
            (out / name).write_text(f"old {name}")
    prepared = {}
    for name in NEW_FILES:
        prepared[name] = out / f"{name}.abc123.tmp"
        prepared[name].write_text(f"new {name}")
    return out, prepared


def _contents(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def test_commit_run_leaves_one_run_and_loses_nothing_whichever_step_fails(tmp_path, monkeypatch):
    """Fail the k-th rename/link of the commit, for every k: the folder's run outputs come from one run only,
    every file of both runs still exists somewhere, and the message says where; then the commit without faults."""
    import errno

    from vpdm import io as vio
    from vpdm.io import RUN_OUTPUTS, commit_run

    real = {name: getattr(os, name) for name in ("rename", "replace", "link")}
    old_texts = {f"old {n}" for n in RUN_OUTPUTS if n != "plots"} | {"old plots/roc.png"}
    new_texts = {f"new {n}" for n in NEW_FILES}
    k = 0
    while True:
        k += 1
        root = tmp_path / f"k{k}"
        out, prepared = _old_run_and_new_files(root)
        calls = {"n": 0}

        def failing(name, calls=calls, k=k):
            def op(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] == k:
                    raise OSError(errno.EIO, "injected I/O error")
                return real[name](*args, **kwargs)

            return op

        for name in real:
            monkeypatch.setattr(vio.os, name, failing(name))
        try:
            commit_run(out, prepared, replace=True)
            error = None
        except OutputError as exc:
            error = str(exc)
        finally:
            for name, fn in real.items():
                monkeypatch.setattr(vio.os, name, fn)
        files = _contents(out)  # everything stays inside the run folder
        texts = set(files.values())
        if error is None:  # k is past the last operation: the new run, alone, nothing left over
            assert files == {name: f"new {name}" for name in NEW_FILES}, files
            break
        assert old_texts <= texts and new_texts <= texts, (k, error, files)  # nothing lost
        in_place = {text.split()[0] for path, text in files.items() if path.split("/")[0] in RUN_OUTPUTS}
        assert len(in_place) == 1, (k, files)  # the folder's own outputs: one run, never a mix
        for path in files:  # anything not in place is named in the message
            top = path.split("/")[0]
            assert top in RUN_OUTPUTS or str(out / top) in error, (k, error, path)
    assert k > 5  # the commit has that many steps, and each was failed once


def test_commit_run_never_replaces_a_model_that_appeared(tmp_path):
    from vpdm.io import commit_run

    out, prepared = _old_run_and_new_files(tmp_path)
    (out / "model.pt").write_text("appeared meanwhile")
    with pytest.raises(OutputError, match="appeared while this run was working"):
        commit_run(out, prepared, replace=False)
    assert (out / "model.pt").read_text() == "appeared meanwhile"
    assert (out / f"model.pt.new-{os.getpid()}").read_text() == "new model.pt"


def test_exclusive_folder_refuses_a_second_holder_and_is_released(tmp_path):
    from vpdm.io import exclusive_folder

    with exclusive_folder(tmp_path / "run") as folder:
        assert (folder / ".vpdm.lock").read_text().strip() == str(os.getpid())
        with pytest.raises(OutputError, match=rf"is in use by another vpdm run \(pid {os.getpid()}\)"):
            with exclusive_folder(tmp_path / "run"):
                pass
    assert not (tmp_path / "run" / ".vpdm.lock").exists()
    with exclusive_folder(tmp_path / "run"):  # free again
        pass
