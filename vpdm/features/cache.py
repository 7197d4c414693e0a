"""Backbone features once per dataset: the on-disk cache, its fingerprints and checksums."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, overload

import torch
from torch import Tensor

from vpdm.errors import ConfigError, DataError, OutputError
from vpdm.features.backbone import _FEATURE_FORMAT_VERSION, FeatureExtractor
from vpdm.io import atomic_torch_save

__all__ = [
    "dataset_content_hash",
    "extract_features",
    "features_checksum",
]

logger = logging.getLogger(__name__)


# (path, size, mtime_ns) -> sha1, so a sweep in one process reads each image's bytes once.
_file_hash_memo: dict[tuple[str, int, int], str] = {}


def _file_sha1(path: Path) -> str:
    try:
        st = path.stat()
    except OSError as exc:
        raise DataError(f"cannot read image {str(path)!r} to key the feature cache: {exc}") from exc
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    digest = _file_hash_memo.get(key)
    if digest is None:
        h = hashlib.sha1()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digest = h.hexdigest()
        _file_hash_memo[key] = digest
    return digest


def dataset_content_hash(dataset: Any, image_size: int) -> str:
    """sha1 over the dataset's image bytes (in order) and preprocessing settings: what features depend on."""
    samples: Sequence[Any] | None = getattr(dataset, "samples", None)
    if samples is None:
        raise ConfigError(
            f"feature caching needs a dataset with a `samples` list (items with `.image_path`), "
            f"got {type(dataset).__name__}; pass cache_dir=None to extract without a cache"
        )
    # image_size and normalize are what vpdm.data.dataset.AnomalyDataset's tensors depend on besides the bytes.
    size = getattr(dataset, "image_size", image_size)
    normalize = getattr(dataset, "normalize", True)
    h = hashlib.sha1(f"image_size={size}|normalize={normalize}|n={len(samples)}|".encode())
    for s in samples:
        h.update(_file_sha1(Path(s.image_path)).encode())
    return h.hexdigest()


def _collate_images(items: list[dict[str, Any]]) -> Tensor:
    # Only the image is needed; default collation would choke on None masks etc.
    return torch.stack([item["image"] for item in items])


def features_checksum(features: Tensor) -> str:
    """sha256 of the features' float32 bytes (C order): what a cache entry stores and is checked against."""
    array = features.detach().cpu().contiguous().numpy()
    return hashlib.sha256(memoryview(array).cast("B")).hexdigest()


def _read_cache(path: Path, fingerprint: str, data_hash: str, shape: tuple[int, ...]) -> Tensor | None:
    """The cached features if the entry is intact and its content matches its checksum; else warn and None."""
    try:
        # Mapped, not read: the pages are the file's, so the OS can drop and re-read them, and processes on
        # one machine that map the same entry share one copy (a private mapping: a write stays in-process).
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        features = payload["features"]
        ok = (
            payload.get("fingerprint") == fingerprint
            and payload.get("dataset_hash") == data_hash
            and isinstance(features, Tensor)
            and tuple(features.shape) == shape
            and features.dtype == torch.float32
        )
        if not ok:
            problem = "its key or shape does not match"
        elif not isinstance(payload.get("checksum"), str):
            problem = "it has no checksum of its content"
        elif features_checksum(features) != payload["checksum"]:
            problem = "its features do not match the checksum stored with them (damaged or replaced)"
        else:
            return features
    except Exception as exc:  # truncated/garbled files raise many types; all mean "recompute"
        problem = f"{type(exc).__name__}: {exc}"
    warnings.warn(f"feature cache {str(path)!r} is unusable ({problem}); recomputing it", RuntimeWarning, stacklevel=3)
    return None


def _file_backed_buffer(folder: Path, shape: tuple[int, ...]) -> Tensor | None:
    """A zeroed float32 tensor of ``shape`` whose pages are a file in ``folder`` (deleted at once, so nothing is
    left behind if the process dies), or None where that cannot be had (the caller then uses memory).

    Extraction writes into it batch by batch, so the features of a large dataset never have to fit in
    memory: written pages go to disk under pressure as any file's do. The space is reserved up front
    (``posix_fallocate``) so that a full disk is an error here, not a SIGBUS on a later write."""
    if not hasattr(os, "posix_fallocate") or os.name == "nt":  # a mapped file cannot be unlinked on Windows
        return None
    count = math.prod(shape)
    nbytes = count * 4
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=folder, prefix=".features.", suffix=".tmp")
    except OSError as exc:
        logger.info("features kept in memory: no buffer file in %s (%s)", folder, exc)
        return None
    try:
        try:
            os.posix_fallocate(fd, 0, nbytes)
        finally:
            os.close(fd)
        buffer = torch.from_file(name, shared=True, size=count, dtype=torch.float32).view(shape)
    except (OSError, RuntimeError) as exc:
        logger.info("features kept in memory: no %d-byte buffer file in %s (%s)", nbytes, folder, exc)
        buffer = None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)
    return buffer


@overload
def extract_features(
    extractor: FeatureExtractor,
    dataset: Any,
    *,
    batch_size: int = ...,
    cache_dir: Path | str | None = ...,
    progress: bool = ...,
    num_workers: int = ...,
    return_info: Literal[False] = ...,
) -> Tensor: ...


@overload
def extract_features(
    extractor: FeatureExtractor,
    dataset: Any,
    *,
    batch_size: int = ...,
    cache_dir: Path | str | None = ...,
    progress: bool = ...,
    num_workers: int = ...,
    return_info: Literal[True],
) -> tuple[Tensor, dict[str, Any]]: ...


def extract_features(
    extractor: FeatureExtractor,
    dataset: Any,
    *,
    batch_size: int = 16,
    cache_dir: Path | str | None = None,
    progress: bool = True,
    num_workers: int = 0,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Any]]:
    """N x C x S x S float32 CPU features of ``dataset`` (items: dicts with ``"image"``), in order.

    With ``cache_dir`` the result is stored under a key of the extractor's fingerprint and the
    dataset's image bytes, with a sha256 of the features, so each image goes through the backbone
    once; an unusable cache file (unreadable, or content that does not match its checksum) is
    recomputed with a warning, and one that cannot be written (full disk, read-only folder) is
    skipped with a warning: the features are still returned. ``return_info=True`` also returns
    ``{"cache_hit": bool, "path": Path | None, "images_computed": int}``.

    With a cache the features come back memory-mapped from the entry (extraction writes into a file, not
    into memory), so a dataset's features need not fit in memory and do not count as the process's own
    memory. A cache entry must therefore only ever be replaced (vpdm writes a new file and renames it),
    never rewritten in place while a process reads it.
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError(f"num_workers must be a non-negative integer, got {num_workers!r}")
    n = len(dataset)
    if n == 0:
        raise DataError("cannot extract features of an empty dataset: expected at least one image")
    s = extractor.config.feature_size
    shape = (n, extractor.out_channels, s, s)

    cache_path: Path | None = None
    fingerprint = data_hash = ""
    if cache_dir is not None:
        fingerprint = extractor.fingerprint()
        data_hash = dataset_content_hash(dataset, extractor.config.image_size)
        cache_path = Path(cache_dir).expanduser() / f"{fingerprint}_d{data_hash[:16]}.pt"
        if cache_path.is_file():
            cached = _read_cache(cache_path, fingerprint, data_hash, shape)
            if cached is not None:
                logger.info("feature cache hit: %s", cache_path)
                info = {"cache_hit": True, "path": cache_path, "images_computed": 0}
                return (cached, info) if return_info else cached
        logger.info("feature cache miss: %s", cache_path)

    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate_images
    )
    out = _file_backed_buffer(cache_path.parent, shape) if cache_path is not None else None
    if out is None:
        out = torch.empty(shape, dtype=torch.float32)
    device = extractor.device
    start = 0
    with tqdm(total=n, desc="backbone features", unit="img", disable=not progress) as bar:
        for images in loader:
            feats = extractor(images.to(device))
            out[start : start + feats.shape[0]] = feats.cpu()
            start += feats.shape[0]
            bar.update(feats.shape[0])
    if start != n:
        raise DataError(f"dataset reported {n} items but yielded {start} images")

    if cache_path is not None:
        checksum = features_checksum(out)
        try:
            atomic_torch_save(
                {
                    "features": out,
                    "fingerprint": fingerprint,
                    "dataset_hash": data_hash,
                    "format": _FEATURE_FORMAT_VERSION,
                    "checksum": checksum,
                },
                cache_path,
                what="feature cache",
            )
        except OutputError as exc:  # the cache only saves time: a full disk must not cost the features
            warnings.warn(
                f"{exc}; continuing without it (the next run extracts the features again)", RuntimeWarning, stacklevel=2
            )
            cache_path = None  # info["path"] names a file that exists
        else:
            # Map the entry just written and drop the buffer: one file's pages, no second copy on disk.
            with contextlib.suppress(Exception):  # the buffer holds the same features
                out = torch.load(cache_path, map_location="cpu", weights_only=True, mmap=True)["features"]
    info = {"cache_hit": False, "path": cache_path, "images_computed": n}
    return (out, info) if return_info else out
