"""The torch dataset of images and masks every loader and metric works on."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vpdm.data.images import _mask_array, _open_loaded, image_to_rgb, resize_mask
from vpdm.data.layouts import Sample, categories
from vpdm.errors import ConfigError, DataError
from vpdm.features.backbone import imagenet_normalise

__all__ = [
    "AnomalyDataset",
    "check_images",
]


def _check_size(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


class AnomalyDataset(torch.utils.data.Dataset):
    """Tensors for training/evaluation; holds only paths so DataLoader workers stay cheap.

    Items: ``image`` float32 3xSxS (bicubic, ImageNet-normalised unless ``normalize=False``,
    then in [0, 1]), ``mask`` float32 1xMxM in {0, 1} (nearest), ``label``, ``class_index``
    (into :attr:`categories`), ``category``, ``path``, ``index``, ``has_mask``.
    Grayscale/palette/16-bit images become RGB; RGBA drops alpha (no compositing).
    """

    def __init__(
        self,
        samples: list[Sample],
        image_size: int = 224,
        mask_size: int | None = None,
        normalize: bool = True,
    ) -> None:
        if not samples:
            raise DataError("no samples given to AnomalyDataset: expected a non-empty list from list_samples()")
        self.samples: list[Sample] = list(samples)
        self.image_size: int = _check_size("image_size", image_size)
        self.mask_size: int = _check_size("mask_size", mask_size) if mask_size is not None else image_size
        self.normalize: bool = bool(normalize)
        self.categories: list[str] = categories(self.samples)
        self._class_of: dict[str, int] = {c: i for i, c in enumerate(self.categories)}

    def __len__(self) -> int:
        return len(self.samples)

    def raw_image(self, i: int) -> np.ndarray:
        """uint8 HxWx3 RGB resized to ``image_size``, for overlays."""
        s = self.samples[i]
        with _open_loaded(s.image_path) as im:
            return image_to_rgb(im, self.image_size, f"image {str(s.image_path)!r}")

    def mask_array(self, i: int) -> np.ndarray:
        """uint8 MxM {0, 1} ground truth resized to ``mask_size`` (zeros when unknown/normal)."""
        s = self.samples[i]
        if s.mask_path is None:
            return np.zeros((self.mask_size, self.mask_size), dtype=np.uint8)
        with _open_loaded(s.mask_path) as im:
            m = _mask_array(im)
        return resize_mask(m, self.mask_size)

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self.samples)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for dataset of {n} samples")
        i = i % n
        s = self.samples[i]
        img = torch.from_numpy(self.raw_image(i)).permute(2, 0, 1).float().div_(255.0)
        if self.normalize:
            img = imagenet_normalise(img)
        mask = torch.from_numpy(self.mask_array(i)).float().unsqueeze(0)
        return {
            "image": img.contiguous(),
            "mask": mask,
            "label": int(s.label),
            "class_index": self._class_of[s.category],
            "category": s.category,
            "path": str(s.image_path),
            "index": i,
            "has_mask": s.has_mask,
        }


def check_images(samples: Sequence[Sample], progress: bool = False) -> None:
    """Fully decode every image and mask once; raises DataError on the first bad file.

    Optional because it reads every byte; run it before long jobs on unfamiliar data.
    """
    files: list[Path] = []
    seen: set[Path] = set()
    for s in samples:
        for p in (s.image_path, s.mask_path):
            if p is not None and p not in seen:
                seen.add(p)
                files.append(p)
    it: Iterable[Path] = files
    if progress:
        from tqdm import tqdm

        it = tqdm(files, desc="checking images", unit="file", file=sys.stderr)
    for p in it:
        with _open_loaded(p):
            pass
