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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from vpdm.errors import OutputError

__all__ = [
    "RUN_OUTPUTS",
    "Output",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_text",
    "check_outputs",
    "commit_run",
    "exclusive_folder",
    "free_name",
    "new_file_mode",
    "os_error_reason",
    "output_error",
    "prepare_write",
    "remove_stale_temporaries",
    "staged_outputs",
    "writable_dir",
    "writable_file",
    "writing",
]

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
# Every temporary file of prepare_write is ``<name>.<random>.tmp`` beside its target: a run killed before
# the rename leaves one, which the next run that owns the folder removes (remove_stale_temporaries).
TEMP_SUFFIX = ".tmp"


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
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=TEMP_SUFFIX)
        os.fchmod(fd, new_file_mode())  # mkstemp makes 0600; a checkpoint is shared like any file
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


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file (0666 less the umask): for files made with mkstemp (0600)."""
    return 0o666 & ~_umask()


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
            raise OutputError(
                f"{what} {str(folder)!r} is in use by another vpdm run ({_holder(lock)}); "
                "wait for it to finish or choose another folder"
            )
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


def commit_run(
    folder: str | Path,
    prepared: dict[str, Path],
    *,
    replace: bool,
    key: str = "model.pt",
    outputs: tuple[str, ...] = RUN_OUTPUTS,
) -> None:
    """Make ``prepared`` ({name: fsynced temporary file in ``folder``}) the run in ``folder``.

    The previous run's ``outputs`` (model, config, history, metrics, plots) are moved aside into
    ``.vpdm-previous-<pid>/``, then ``key`` (model.pt) takes its name without ever replacing a file,
    then the other new files take theirs, and only then is the previous run deleted. At every point the
    folder holds files of one run only: a crash leaves the old run (part of it moved aside), or part of
    the new one with the whole old one in ``.vpdm-previous-<pid>/``; never a mix of two runs.
    ``replace=False`` and a file of ``prepared`` present (it appeared while working: something that ignores
    the lock wrote it) -> :class:`OutputError`, that file kept and nothing moved. Whenever this raises, the new files
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
                dst = free_name(folder / f"{name}.new-{pid}")
                try:
                    os.replace(tmp, dst)
                    kept.append(str(dst))
                except OSError:
                    kept.append(str(tmp))
        where = f"; this run's files not in place are kept as {', '.join(kept)}" if kept else ""
        if previous.exists():
            where += f"; the previous run's files are in {str(previous)!r}"
        return OutputError(reason + where)

    if not replace:  # nothing is moved aside, let alone deleted: any name in the way stops the commit
        there = [name for name in sorted(prepared, key=lambda n: n != key) if os.path.lexists(folder / name)]
        if there:
            raise keep_new(
                f"{str(folder / there[0])!r} appeared while this run was working (written by something "
                "that does not take vpdm's lock); it was not replaced"
            )
    old = (
        [name for name in sorted(outputs, key=lambda n: n != key) if os.path.lexists(folder / name)] if replace else []
    )
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
        raise keep_new(
            f"{str(target)!r} appeared while this run was working (written by something that does not "
            "take vpdm's lock); it was not replaced"
        ) from None
    except OSError as exc:
        restore_old()
        raise keep_new(f"cannot write {str(target)!r}: {os_error_reason(exc)}") from exc
    try:
        for name, tmp in prepared.items():
            if name != key:
                os.replace(tmp, folder / name)
    except OSError as exc:
        raise keep_new(
            f"cannot complete the run in {str(folder)!r} ({os_error_reason(exc)}); its model is {str(target)!r}"
        ) from exc
    if old:
        shutil.rmtree(previous, ignore_errors=True)


# -- outputs: never onto an input, never over an existing file unless told to ---------------------


def free_name(path: str | Path) -> Path:
    """``path``, or ``path.2``, ``path.3``, ...: the first name nothing exists at (a backup never replaces one)."""
    path = Path(path)
    candidate, k = path, 1
    while os.path.lexists(candidate):
        k += 1
        candidate = path.with_name(f"{path.name}.{k}")
    return candidate


@dataclass(frozen=True)
class Output:
    """One file or folder a command writes, as its messages name it (``what``: "metrics", "plots folder").

    A ``folder`` output is written as a whole (a new folder, swapped in at the end); ``holds`` are the
    file suffixes vpdm writes in it: an existing folder with anything else in it is never replaced.
    ``written=False``: this run writes nothing there (``predict --no-overlays``), but an old one belongs to
    the previous run and leaves with it, so that a folder never holds the files of two runs.
    """

    path: Path
    what: str
    folder: bool = False
    holds: tuple[str, ...] = (".png",)
    written: bool = True


def _real(path: str | Path) -> Path:
    return Path(os.path.abspath(path)).resolve()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _foreign(folder: Path, holds: tuple[str, ...]) -> Path | None:
    """The first entry of ``folder`` (recursively) that is not a file with one of the ``holds`` suffixes."""
    for p in sorted(folder.rglob("*")):
        if not (p.is_file() and p.suffix.lower() in holds):
            return p
    return None


def check_outputs(
    outputs: Iterable[Output],
    *,
    inputs: Iterable[str | Path] = (),
    overwrite: bool = False,
    flag: str = "--overwrite",
    probe: bool = True,
) -> None:
    """The one rule every command applies to what it will write, before any work (:class:`OutputError`):

    * an output is never an input, inside an input folder, or (a folder) around an input, whatever
      ``overwrite`` says: a checkpoint, an image or the folder being scanned is never written onto;
    * an existing output is refused unless ``overwrite`` (the message names it and ``flag``); a folder
      output is replaced only when it holds nothing but what vpdm writes there (``Output.holds``);
    * a file output is not a folder, a folder output is not a file, and (``probe``) its folder can be
      written: only then is anything created, so a refused output leaves nothing behind.
    """
    outputs = list(outputs)
    sources = [(Path(i), _real(i)) for i in inputs]
    for out in outputs:
        path, real = Path(out.path), _real(out.path)
        for given, src in sources:
            if real == src or src in real.parents or _same_file(path, given) or (out.folder and real in src.parents):
                where = (
                    "is" if real == src or _same_file(path, given) else "is inside" if src in real.parents else "holds"
                )
                raise OutputError(
                    f"{out.what} {str(path)!r} {where} the input {str(given)!r}: a command never writes "
                    f"onto or into what it reads ({flag} does not change that); choose another output"
                )
        if os.path.lexists(path):
            if out.folder and not path.is_dir():
                raise OutputError(f"cannot write {out.what} {str(path)!r}: it is a file, not a folder")
            if not out.folder and path.is_dir():
                raise OutputError(f"cannot write {out.what} {str(path)!r}: it is a folder, expected a file name")
            if not overwrite:
                raise OutputError(f"{out.what} {str(path)!r} exists; pass {flag} to replace it, or choose another name")
            if out.folder:
                stranger = _foreign(path, out.holds)
                if stranger is not None:
                    raise OutputError(
                        f"{out.what} {str(path)!r} holds {str(stranger)!r}, which vpdm does not write "
                        f"there ({flag} replaces only a folder of {', '.join(out.holds)} files); "
                        "choose another folder"
                    )
    for out in outputs if probe else ():
        if out.folder:
            writable_dir(Path(out.path).parent, what="output folder")
        else:
            writable_file(out.path, out.what)


def _stage(out: Output) -> Path:
    path = Path(out.path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if out.folder:
            tmp = tempfile.mkdtemp(dir=path.parent, prefix=path.name + ".", suffix=TEMP_SUFFIX)
            os.chmod(tmp, 0o777 & ~_umask())
        else:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=TEMP_SUFFIX)
            os.fchmod(fd, new_file_mode())
            os.close(fd)
    except OSError as exc:
        raise output_error(exc, path, out.what, is_folder=out.folder) from exc
    return Path(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def staged_outputs(outputs: Sequence[Output], *, overwrite: bool) -> Iterator[dict[Path, Path]]:
    """Temporaries for ``outputs`` ({output path: temporary file or empty folder beside it}) for the block to
    fill; when it succeeds they take their names together, per folder, through :func:`commit_run` (an
    existing one is moved aside and deleted only once the new ones are in place, and only with
    ``overwrite``; one that appeared meanwhile is kept and the new one left beside it). When the block
    fails, the temporaries are removed and nothing that was there changes."""
    staged: dict[Path, Path] = {}
    try:
        for out in outputs:
            if out.written:
                staged[Path(out.path)] = _stage(out)
        yield staged
        groups: dict[Path, list[str]] = {}
        for out in outputs:
            groups.setdefault(Path(out.path).parent, []).append(Path(out.path).name)
        for folder, names in groups.items():
            prepared = {n: staged[folder / n] for n in names if folder / n in staged}
            if prepared:
                commit_run(folder, prepared, replace=overwrite, key=next(iter(prepared)), outputs=tuple(names))
    finally:
        for tmp in staged.values():
            if os.path.lexists(tmp):
                _remove(tmp)


def remove_stale_temporaries(folder: str | Path, names: Iterable[str]) -> list[Path]:
    """Remove ``<name>.<random>.tmp`` files and folders of ``names`` in ``folder`` that a killed run left.

    Only for a folder this process holds the lock of (:func:`exclusive_folder`): no other vpdm run can be
    writing there, so every such temporary is a leftover. Returns what was removed.
    """
    folder = Path(folder)
    removed = []
    for name in names:
        for p in folder.glob(f"{glob_escape(name)}.*{TEMP_SUFFIX}"):
            _remove(p)
            removed.append(p)
    return removed


def glob_escape(name: str) -> str:
    """``name`` with glob's special characters made literal."""
    import glob

    return glob.escape(name)
