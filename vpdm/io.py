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
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

from vpdm.errors import OutputError

__all__ = ["atomic_torch_save", "atomic_write", "atomic_write_text", "os_error_reason", "output_error",
           "writable_dir", "writing"]

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


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any], what: str = "file") -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync, rename it to ``path``.

    On any failure the temporary file is removed and an existing ``path`` is left as it was; an
    OSError (also one that torch wraps in a RuntimeError) is raised as :class:`OutputError`.
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
        os.replace(tmp, path)
        tmp = None
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        cause = _os_error_in(exc) if isinstance(exc, (OSError, RuntimeError)) else None
        if cause is not None:
            raise output_error(cause, path, what) from exc
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
