"""Crash-safe file writes shared by checkpoints, the feature cache and the command-line outputs.

A file is written to a temporary file in its folder, fsynced, then renamed over the target: a crash,
a full disk or a file-size limit never leaves half a file and never destroys the previous version.
Every ``OSError`` becomes an :class:`~vpdm.errors.OutputError` that names the path and the reason,
so a CLI can report it in one line instead of a traceback hours into a job.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

from vpdm.errors import OutputError

__all__ = ["RUN_OUTPUTS", "atomic_torch_save", "atomic_write", "atomic_write_text", "commit_run", "exclusive_folder",
           "os_error_reason", "output_error", "prepare_write", "writable_dir", "writable_file", "writing"]

_HINTS: dict[int, str] = {
    errno.ENOSPC: "free some space or write somewhere else",
    errno.EDQUOT: "the disk quota is used up; free some space or write somewhere else",
    errno.EFBIG: "the file is over the size limit of this process (ulimit -f) or file system",
    errno.EROFS: "the file system is read-only; write somewhere else",
    errno.EACCES: "no permission to write there",
    errno.EPERM: "no permission to write there",
}

# Written by writable_dir: a zero-byte probe would succeed on a full disk that still has inodes.
_PROBE_BYTES = 4096


def os_error_reason(exc: OSError) -> str:
    """``'no space left on device (ENOSPC)'``: the OS's words in lower case plus the errno name."""
    text = (exc.strerror or str(exc) or type(exc).__name__).rstrip(".")
    text = text[:1].lower() + text[1:]
    name = errno.errorcode.get(exc.errno) if isinstance(exc.errno, int) else None
    return f"{text} ({name})" if name else text


def _file_in_the_way(folder: Path) -> Path | None:
    """The first ancestor of ``folder`` (or ``folder`` itself) that exists but is not a directory."""
    for p in (*reversed(folder.absolute().parents), folder.absolute()):
        if not p.exists():
            return None
        if not p.is_dir():
            return p
    return None


def output_error(exc: OSError, path: str | Path, what: str = "file", *, is_folder: bool = False) -> OutputError:
    """The :class:`OutputError` for ``exc``, raised while writing ``what`` at ``path``."""
    path = Path(path)
    reason = os_error_reason(exc)
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):  # mkdir through or onto a regular file
        blocker = _file_in_the_way(path if is_folder else path.parent)
        if blocker is not None:
            reason = f"{str(blocker)!r} is a file, not a folder"
    hint = _HINTS.get(exc.errno) if isinstance(exc.errno, int) else None
    return OutputError(f"cannot write {what} {str(path)!r}: {reason}" + (f"; {hint}" if hint else ""))


def _os_error_in(exc: BaseException) -> OSError | None:
    """``exc`` or the OSError behind it: torch.save reports a failed write as a RuntimeError."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


@contextlib.contextmanager
def writing(path: str | Path, what: str = "file") -> Iterator[None]:
    """Turn an OSError raised in the block into an :class:`OutputError` naming ``path``."""
    try:
        yield
    except OSError as exc:
        raise output_error(exc, path, what) from exc


def writable_dir(path: str | Path, what: str = "output folder") -> Path:
    """Create ``path`` if needed and prove a small file can be written there, before any long work."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".vpdm-write-test-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(b"\0" * _PROBE_BYTES)
                f.flush()
        finally:
            os.unlink(probe)
    except OSError as exc:
        raise output_error(exc, path, what, is_folder=True) from exc
    return path


def prepare_write(path: str | Path, write: Callable[[IO[bytes]], Any], what: str = "file") -> Path:
    """Call ``write(f)`` on a temporary file beside ``path`` and fsync it; returns the temporary file.

    The caller renames it to ``path`` (:func:`atomic_write`, :func:`commit_run`) or removes it. On any
    failure the temporary file is removed; an OSError (also one that torch wraps in a RuntimeError) is
    raised as :class:`OutputError` naming ``path``, the file the user asked for.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a checkpoint is shared like any file
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        return Path(tmp)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        cause = _os_error_in(exc) if isinstance(exc, (OSError, RuntimeError)) else None
        if cause is not None:
            raise output_error(cause, path, what) from exc
        raise


def writable_file(path: str | Path, what: str = "file") -> Path:
    """Prove ``path`` can be written later (not a folder; its folder created and writable), without touching it."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write {what} {str(path)!r}: it is a folder, expected a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=".vpdm-write-test-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(b"\0" * _PROBE_BYTES)
                f.flush()
        finally:
            os.unlink(probe)
    except OSError as exc:
        raise output_error(exc, path, what) from exc
    return path


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any], what: str = "file") -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync, rename it to ``path``.

    On any failure the temporary file is removed and an existing ``path`` is left as it was; an
    OSError (also one that torch wraps in a RuntimeError) is raised as :class:`OutputError`.
    """
    path = Path(path)
    tmp = prepare_write(path, write, what)
    try:
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise output_error(exc, path, what) from exc
        raise
    return path


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask has to set one)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def atomic_torch_save(obj: Any, path: str | Path, what: str = "file") -> Path:
    """``torch.save`` through :func:`atomic_write`."""
    return atomic_write(path, lambda f: torch.save(obj, f), what)


def atomic_write_text(path: str | Path, text: str, what: str = "file") -> Path:
    """UTF-8 text through :func:`atomic_write`."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")), what)


# -- one run per output folder ---------------------------------------------------------------------

LOCK_NAME = ".vpdm.lock"
# What a training run (and an evaluation beside it) leaves in its folder: replaced together, never mixed.
RUN_OUTPUTS: tuple[str, ...] = ("model.pt", "config.yaml", "history.json", "metrics.json", "plots")


def _try_lock(fd: int) -> bool:
    """A non-blocking exclusive lock on ``fd``; False when another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _holder(lock: Path) -> str:
    try:
        pid = lock.read_text(encoding="ascii").strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "pid unknown"


@contextlib.contextmanager
def exclusive_folder(folder: str | Path, what: str = "output folder") -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (created if needed) for the block.

    Another process holding it -> :class:`OutputError` at once, naming the folder and that process's pid.
    The lock is ``flock`` on ``folder/.vpdm.lock`` (the kernel drops it when a process dies, so a crash
    never leaves a stale lock); the file holds the holder's pid and is removed on release.
    """
    folder = writable_dir(folder, what)
    lock = folder / LOCK_NAME
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise output_error(exc, lock, "lock file") from exc
        if not _try_lock(fd):
            os.close(fd)
            raise OutputError(f"{what} {str(folder)!r} is in use by another vpdm run ({_holder(lock)}); "
                              "wait for it to finish or choose another folder")
        try:  # the previous holder may have removed the file between our open and our lock: lock the new one
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        yield folder
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)  # while still holding it: a waiting opener re-checks the inode above
        os.close(fd)


def _claim(src: Path, dst: Path) -> None:
    """Give ``src``'s file the name ``dst`` unless ``dst`` exists (FileExistsError): never replaces a file."""
    try:
        os.link(src, dst)  # atomic and fails if dst exists
    except FileExistsError:
        raise
    except OSError as exc:  # a file system without hard links: check, then rename (a tiny window)
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "File exists", str(dst)) from None
        os.rename(src, dst)
        return
    os.unlink(src)


def commit_run(folder: str | Path, prepared: dict[str, Path], *, replace: bool, key: str = "model.pt",
               outputs: tuple[str, ...] = RUN_OUTPUTS) -> None:
    """Make ``prepared`` ({name: fsynced temporary file in ``folder``}) the run in ``folder``.

    The previous run's ``outputs`` (model, config, history, metrics, plots) are moved aside into
    ``.vpdm-previous-<pid>/``, then ``key`` (model.pt) takes its name without ever replacing a file,
    then the other new files take theirs, and only then is the previous run deleted. At every point the
    folder holds files of one run only: a crash leaves the old run (part of it moved aside), or part of
    the new one with the whole old one in ``.vpdm-previous-<pid>/``; never a mix of two runs.
    ``replace=False`` and a ``key`` file present (it appeared while training: something that ignores
    the lock wrote it) -> :class:`OutputError`, that file kept. Whenever this raises, the new files
    not yet in place are kept as ``<name>.new-<pid>`` and the message says where everything is.
    """
    folder = Path(folder)
    pid = os.getpid()
    target = folder / key
    previous = folder / f".vpdm-previous-{pid}"

    def keep_new(reason: str) -> OutputError:
        kept = []
        for name, tmp in prepared.items():
            if os.path.lexists(tmp):
                dst = folder / f"{name}.new-{pid}"
                try:
                    os.replace(tmp, dst)
                    kept.append(str(dst))
                except OSError:
                    kept.append(str(tmp))
        where = f"; this run's files not in place are kept as {', '.join(kept)}" if kept else ""
        if previous.exists():
            where += f"; the previous run's files are in {str(previous)!r}"
        return OutputError(reason + where)

    if not replace and os.path.lexists(target):
        raise keep_new(f"{str(target)!r} appeared while this run was working (written by something that does not "
                       "take vpdm's lock); it was not replaced")
    old = [name for name in sorted(outputs, key=lambda n: n != key) if os.path.lexists(folder / name)]
    moved: list[str] = []

    def restore_old() -> None:
        """Put the previous run back as it was (best effort; what stays aside is named by keep_new)."""
        for name in reversed(moved):
            with contextlib.suppress(OSError):
                os.rename(previous / name, folder / name)
        with contextlib.suppress(OSError):
            previous.rmdir()

    try:
        if old:
            previous.mkdir()
        for name in old:  # the model first: a folder holding part of the old run has no model
            os.rename(folder / name, previous / name)
            moved.append(name)
    except OSError as exc:
        restore_old()
        raise keep_new(f"cannot move the previous run in {str(folder)!r} aside: {os_error_reason(exc)}") from exc
    try:
        _claim(prepared[key], target)
    except FileExistsError:  # the newcomer stays; the previous run stays aside rather than mix with it
        raise keep_new(f"{str(target)!r} appeared while this run was working (written by something that does not "
                       "take vpdm's lock); it was not replaced") from None
    except OSError as exc:
        restore_old()
        raise keep_new(f"cannot write {str(target)!r}: {os_error_reason(exc)}") from exc
    try:
        for name, tmp in prepared.items():
            if name != key:
                os.replace(tmp, folder / name)
    except OSError as exc:
        raise keep_new(f"cannot complete the run in {str(folder)!r} ({os_error_reason(exc)}); its model is "
                       f"{str(target)!r}") from exc
    if old:
        shutil.rmtree(previous, ignore_errors=True)
