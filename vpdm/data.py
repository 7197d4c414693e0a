"""Datasets for multi-class industrial anomaly detection.

A *data spec* is what users type, e.g. ``"mvtec:/data/mvtec_anomaly_detection,visa:/data/VisA"``;
several comma-joined specs form one union so a single model is trained on every class
(the multi-class setting of VPDM). Everything is validated cheaply (file existence, PNG
headers) *before* any long work starts, so a typo fails in seconds rather than mid-training.

Known spec kinds:

* ``mvtec``, ``mpdd``, ``loco``, ``mtd`` -- MVTec layout. The path is either a dataset root
  (every sub-directory with ``train/good`` is a category) or one category directory (it has
  ``train/`` or ``test/`` itself). Masks: ``ground_truth/<defect>/<stem>_mask.png``.
* ``visa`` -- VisA root with ``split_csv/1cls.csv`` (columns ``object,split,label,image,mask``;
  paths relative to the root).
* ``folder`` -- one category in MVTec layout, named after the folder.
* ``demo`` / ``demo:<dir>`` -- the built-in synthetic demo (:func:`make_demo_dataset`),
  generated on first use in :func:`demo_root` or ``<dir>``.
* ``demo-small`` / ``demo-small:<dir>`` -- the synthetic small-defect set (small parts freely
  placed, fine textures; defects of a few pixels at 256 px), generated the same way.

Every anomalous test image needs its mask: without one, all its pixels would count as normal and
the pixel metrics would be wrong without a sign. ``missing_masks="image_only"`` keeps such images for
the image metrics only (their ``Sample.mask_path`` is None and ``has_mask`` False).

Category names are ``"<kind>/<category>"`` (e.g. ``"mvtec/bottle"``); they are the classes of
per-class metrics. Paths containing commas cannot be used in a spec.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageFile

from vpdm.backbone import IMAGENET_MEAN, IMAGENET_STD, imagenet_normalise
from vpdm.errors import ConfigError, DataError
from vpdm.io import new_file_mode

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "KNOWN_KINDS",
    "MIN_IMAGE_SIDE",
    "MISSING_MASKS",
    "AnomalyDataset",
    "Sample",
    "categories",
    "check_images",
    "image_to_rgb",
    "demo_root",
    "list_samples",
    "make_demo_dataset",
    "parse_data_spec",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
# Smaller images are refused, not upscaled: a few pixels cannot show a part's defects, and a score
# computed on invented detail would look as trustworthy as a real one. Thumbnails and icons land here.
MIN_IMAGE_SIDE = 8

MVTEC_LAYOUT_KINDS: tuple[str, ...] = ("mvtec", "mpdd", "loco", "mtd")
KNOWN_KINDS: tuple[str, ...] = (*MVTEC_LAYOUT_KINDS, "visa", "folder", "demo", "demo-small")
DEMO_KINDS: tuple[str, ...] = ("demo", "demo-small")

# Truncated files must fail loudly instead of yielding half-grey images; we never flip this.
ImageFile.LOAD_TRUNCATED_IMAGES = False

Split = Literal["train", "test"]
# What to do with an anomalous test image that has no mask: refuse the data (default), or keep the
# image for the image metrics and leave it out of the pixel metrics.
MISSING_MASKS: tuple[str, ...] = ("refuse", "image_only")


@dataclass(frozen=True)
class Sample:
    """One image on disk with its ground truth; the unit every loader and metric works on."""

    image_path: Path
    mask_path: Path | None  # None -> all-zero mask (normal image), or unknown (anomalous, missing_masks="image_only")
    label: int  # 0 normal, 1 anomalous
    category: str  # "<kind>/<category>", the class for per-class metrics
    defect: str  # "good" or the defect folder name

    @property
    def has_mask(self) -> bool:
        """Whether pixel ground truth is known (normal images: yes, all zero)."""
        return self.label == 0 or self.mask_path is not None


# --------------------------------------------------------------------------------------------
# spec parsing and listing
# --------------------------------------------------------------------------------------------


def parse_data_spec(spec: str) -> list[tuple[str, Path]]:
    """Split a user data spec into ``(kind, path)`` pairs, failing early on typos.

    Exact duplicates are dropped. ``demo`` paths need not exist yet (generated on first use).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(
            f"empty data spec {spec!r}: expected '<kind>:<path>' (kinds: {', '.join(KNOWN_KINDS)}), "
            "several joined with commas"
        )
    out: list[tuple[str, Path]] = []
    seen: set[tuple[str, str]] = set()
    for raw in spec.split(","):
        entry = raw.strip()
        if not entry:
            continue
        kind, sep, rest = entry.partition(":")
        kind = kind.strip().lower()
        if kind in DEMO_KINDS:
            path = Path(rest.strip()).expanduser() if sep and rest.strip() else demo_root(kind)
        elif kind not in KNOWN_KINDS or not sep:
            raise DataError(
                f"unknown data spec prefix in {entry!r}: expected '<kind>:<path>' with kind one of "
                f"{', '.join(KNOWN_KINDS)} (or plain 'demo' / 'demo-small')"
            )
        else:
            if not rest.strip():
                raise DataError(f"data spec {entry!r} has no path: expected '{kind}:<path>'")
            path = Path(rest.strip()).expanduser()
            if not path.exists():
                raise DataError(f"data path {str(path)!r} (from spec {entry!r}) does not exist")
            if not path.is_dir():
                raise DataError(f"data path {str(path)!r} (from spec {entry!r}) is not a directory")
        key = (kind, str(path.resolve()))
        if key not in seen:
            seen.add(key)
            out.append((kind, path))
    if not out:
        raise DataError(f"data spec {spec!r} names no dataset: expected '<kind>:<path>'")
    return out


def list_samples(spec: str, split: Split, missing_masks: str = "refuse") -> list[Sample]:
    """List and validate every sample of ``split`` for the union of datasets in ``spec``.

    Only file names and image headers are read, so this is fast; :func:`check_images` does a
    full decode. Train lists normal images only. Order: by category, then by image path.
    An anomalous test image without a mask is a :class:`DataError` naming the image and the mask
    path looked for, unless ``missing_masks="image_only"`` (then its ``has_mask`` is False).
    """
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    if missing_masks not in MISSING_MASKS:
        raise ConfigError(f"missing_masks must be one of {', '.join(MISSING_MASKS)}, got {missing_masks!r}")
    masks_required = missing_masks == "refuse"
    samples: list[Sample] = []
    used_names: set[str] = set()
    seen_dirs: set[str] = set()
    for kind, path in parse_data_spec(spec):
        if kind in DEMO_KINDS:
            _ensure_demo(path, SMALL_DEMO_PARAMS if kind == "demo-small" else None)
        groups = (
            _list_visa(path, split, masks_required)
            if kind == "visa"
            else _list_mvtec_like(kind, path, split, seen_dirs, masks_required)
        )
        for name, group in groups:
            unique = _unique_name(f"{kind}/{name}", used_names)
            samples.extend(Sample(s.image_path, s.mask_path, s.label, unique, s.defect) for s in group)
    return sorted(samples, key=lambda s: (s.category, str(s.image_path)))


def categories(samples: Iterable[Sample]) -> list[str]:
    """Sorted unique category names; position = ``class_index``."""
    return sorted({s.category for s in samples})


def _unique_name(name: str, used: set[str]) -> str:
    """Same kind/category from two roots -> ``name``, ``name#2``, ... in spec order."""
    candidate, n = name, 1
    while candidate in used:
        n += 1
        candidate = f"{name}#{n}"
    used.add(candidate)
    return candidate


def _images_in(directory: Path) -> list[Path]:
    """Image files (by extension) directly in ``directory``, sorted; hidden files skipped."""
    if not directory.is_dir():
        return []
    return sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _is_category_dir(path: Path) -> bool:
    return (path / "train").is_dir() or (path / "test").is_dir()


def _list_mvtec_like(
    kind: str, path: Path, split: Split, seen_dirs: set[str], masks_required: bool
) -> list[tuple[str, list[Sample]]]:
    """Categories of an MVTec-layout root or single category dir (``folder``: always one category)."""
    if kind == "folder" or _is_category_dir(path):
        cat_dirs = [path]
    else:
        cat_dirs = sorted(
            d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".") and _is_category_dir(d)
        )
        if not cat_dirs:
            raise DataError(
                f"no category found in {str(path)!r} ({kind}): expected sub-directories with "
                "train/good/*.png, or a category directory with train/ and test/"
            )
    groups: list[tuple[str, list[Sample]]] = []
    for cat_dir in cat_dirs:
        key = str(cat_dir.resolve())
        if key in seen_dirs:  # same directory reached twice (root + category spec)
            continue
        seen_dirs.add(key)
        groups.append((cat_dir.resolve().name, _list_mvtec_category(cat_dir, split, masks_required=masks_required)))
    return groups


def _list_mvtec_category(cat_dir: Path, split: Split, *, masks_required: bool) -> list[Sample]:
    train_good = cat_dir / "train" / "good"
    train = _images_in(train_good)
    if not train:
        raise DataError(f"category {str(cat_dir)!r} has no training images: expected {str(train_good)!r}/*.png")
    if split == "train":
        return [Sample(p, None, 0, "", "good") for p in train]
    test_dir = cat_dir / "test"
    defect_dirs: list[Path] = []
    if test_dir.is_dir():
        defect_dirs = sorted(d for d in test_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    out: list[Sample] = []
    for d in defect_dirs:
        for img in _images_in(d):
            if d.name == "good":
                out.append(Sample(img, None, 0, "", "good"))
                continue
            mask = _find_mask(cat_dir / "ground_truth" / d.name, img.stem)
            if mask is None:
                expected = cat_dir / "ground_truth" / d.name / f"{img.stem}_mask.png"
                if masks_required:
                    raise DataError(_no_mask_message(img, expected))
            else:
                _check_mask_size(img, mask)
            out.append(Sample(img, mask, 1, "", d.name))
    if not out:
        raise DataError(f"category {str(cat_dir)!r} has no test images: expected {str(test_dir)!r}/<defect>/*.png")
    return out


def _no_mask_message(image: Path, expected: Path) -> str:
    return (
        f"anomalous test image {str(image)!r} has no mask: expected {str(expected)!r} (without it every pixel "
        "would count as normal); add the mask, or set data.missing_masks=image_only to leave such images "
        "out of the pixel metrics"
    )


def _find_mask(gt_dir: Path, stem: str) -> Path | None:
    for ext in (".png", ".PNG", *sorted(IMAGE_EXTENSIONS - {".png"})):
        cand = gt_dir / f"{stem}_mask{ext}"
        if cand.is_file():
            return cand
    return None


def _header_size(path: Path) -> tuple[int, int]:
    """Image size from the header only (no decode), wrapping PIL errors in DataError."""
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as e:  # PIL raises many types for bad files
        raise DataError(f"cannot read image {str(path)!r}: {e} (expected a readable image file)") from e


def _check_mask_size(image: Path, mask: Path) -> None:
    isize, msize = _header_size(image), _header_size(mask)
    if isize != msize:
        raise DataError(
            f"mask {str(mask)!r} is {msize[0]}x{msize[1]} but its image {str(image)!r} is "
            f"{isize[0]}x{isize[1]}: expected the same size"
        )


VISA_COLUMNS: tuple[str, ...] = ("object", "split", "label", "image", "mask")


def _list_visa(root: Path, split: Split, masks_required: bool = True) -> list[tuple[str, list[Sample]]]:
    """VisA from ``split_csv/1cls.csv``; labels ``normal``/``anomaly``, defect name ``anomaly``."""
    csv_path = root / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        raise DataError(f"VisA root {str(root)!r} has no split file: expected {str(csv_path)!r}")
    by_obj: dict[str, list[Sample]] = {}
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in VISA_COLUMNS if c not in cols]
        if missing:
            raise DataError(f"{str(csv_path)!r} lacks columns {missing}: expected header {','.join(VISA_COLUMNS)}")
        for lineno, row0 in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in row0.items()}
            obj = row["object"]
            if not obj:
                raise DataError(f"{str(csv_path)!r} line {lineno}: empty 'object' value")
            by_obj.setdefault(obj, [])
            if row["split"] != split:
                continue
            label_s = row["label"].lower()
            if label_s not in ("normal", "anomaly", "0", "1"):
                raise DataError(
                    f"{str(csv_path)!r} line {lineno}: label {row['label']!r}, expected 'normal' or 'anomaly'"
                )
            label = 1 if label_s in ("anomaly", "1") else 0
            if split == "train" and label == 1:
                continue  # unsupervised: train on normals only
            img = root / row["image"]
            if not row["image"] or not img.is_file():
                raise DataError(f"{str(csv_path)!r} line {lineno}: image {str(img)!r} does not exist")
            if label == 0:
                by_obj[obj].append(Sample(img, None, 0, "", "good"))
                continue
            if not row["mask"]:
                if masks_required:
                    raise DataError(
                        f"{str(csv_path)!r} line {lineno}: anomalous image {str(img)!r} has no mask "
                        "(expected a path in the 'mask' column; or set data.missing_masks=image_only)"
                    )
                by_obj[obj].append(Sample(img, None, 1, "", "anomaly"))
                continue
            mask = root / row["mask"]
            if not mask.is_file():
                if masks_required:
                    raise DataError(_no_mask_message(img, mask))
                by_obj[obj].append(Sample(img, None, 1, "", "anomaly"))
                continue
            _check_mask_size(img, mask)
            by_obj[obj].append(Sample(img, mask, 1, "", "anomaly"))
    if not by_obj:
        raise DataError(f"{str(csv_path)!r} has no rows: expected one row per image")
    if split == "train":
        for obj, group in by_obj.items():
            if not group:
                raise DataError(f"VisA object {obj!r} in {str(csv_path)!r} has no normal training images")
    return [(obj, group) for obj, group in sorted(by_obj.items()) if group]


# --------------------------------------------------------------------------------------------
# image decoding
# --------------------------------------------------------------------------------------------


def _open_loaded(path: Path) -> Image.Image:
    """Open and fully decode, so corrupt/truncated files fail here with the file named."""
    im: Image.Image | None = None
    try:
        im = Image.open(path)
        im.load()
        return im
    except Image.DecompressionBombError as e:  # from the header: nothing was decoded
        raise DataError(f"image {str(path)!r} refused, too large: {e}") from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib.error, ...
        if im is not None:
            im.close()
        raise DataError(f"cannot decode image {str(path)!r}: {e} (expected a valid, complete image file)") from e


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any mode -> 8-bit RGB, the one input the backbone knows.

    Grayscale (L, 1) is replicated to three channels; palette images go through their colours;
    alpha (RGBA, LA, PA) is dropped, not composited, so a transparent pixel scores as its colour.
    16-bit grayscale (I;16*, I) maps 0..65535 linearly onto 0..255 (value / 257, rounded; I values
    outside 0..65535 are clipped); 16-bit colour PNGs already come from PIL as their high byte
    (value >> 8). Float (F) images in 0..1 are scaled by 255, otherwise clipped to 0..255.
    """
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float64) / 257.0  # 0..65535 -> 0..255
        im = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    elif im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        if arr.size and float(arr.max()) <= 1.0:
            arr = arr * 255.0
        im = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    elif im.mode == "P":
        im = im.convert("RGBA")  # palette may carry transparency; go via RGBA then drop it
    return im.convert("RGB") if im.mode != "RGB" else im


def image_to_rgb(im: Image.Image, image_size: int, name: str) -> np.ndarray:
    """Decoded image -> uint8 ``image_size`` x ``image_size`` x 3 RGB (bicubic): training, predict and serving.

    Raises :class:`DataError` naming ``name`` when a side is below :data:`MIN_IMAGE_SIDE`.
    """
    if min(im.size) < MIN_IMAGE_SIDE:
        raise DataError(
            f"{name}: {im.width}x{im.height} pixels is too small, expected at least "
            f"{MIN_IMAGE_SIDE} pixels on each side (small images are refused, not upscaled)"
        )
    rgb = _to_rgb(im).resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.array(rgb, dtype=np.uint8)


def _mask_array(im: Image.Image) -> np.ndarray:
    """Binary HxW uint8 {0,1}: ``>127`` when values reach the 0..255 range, else ``>0``.

    Palette masks use their indices (0 = background); 0/1 and small label-id masks (VisA)
    therefore work as well as 0/255 ones.
    """
    if im.mode in ("P", "L", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "1"):
        arr = np.asarray(im)
        if im.mode == "1":
            arr = arr.astype(np.uint8)
    else:
        arr = np.asarray(im.convert("L"))
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    thr = 127 if arr.size and float(arr.max()) > 127 else 0
    return (arr > thr).astype(np.uint8)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A {0, 1} H x W mask at ``size`` x ``size``, squashed as its image is (the aspect ratio is not kept).

    Nearest neighbour, as anomalib resizes masks, except that a defect region nearest neighbour would
    erase entirely (narrower than the resampling step: BSData's one-pixel pits shrink from 256 to 224
    columns) keeps the output pixels its area overlaps (a box filter > 0), so no defect image loses its
    defect."""
    if mask.shape == (size, size):
        return mask.astype(np.uint8)
    out = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.Resampling.NEAREST)) > 127
    from scipy import ndimage  # lazy: only masks need it

    labels, n = ndimage.label(mask > 0, structure=np.ones((3, 3), dtype=bool))
    if n:
        kept = np.asarray(
            Image.fromarray(labels.astype(np.int32), mode="I").resize((size, size), Image.Resampling.NEAREST)
        )
        for region in sorted(set(range(1, n + 1)) - set(np.unique(kept).tolist())):
            area = Image.fromarray((labels == region).astype(np.float32), mode="F").resize(
                (size, size), Image.Resampling.BOX
            )
            out |= np.asarray(area) > 0
    return out.astype(np.uint8)


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


# --------------------------------------------------------------------------------------------
# synthetic demo
# --------------------------------------------------------------------------------------------

DEMO_VERSION = 1
DEMO_MARKER = ".vpdm_demo.json"
DEMO_DEFECTS: tuple[str, ...] = ("scratch", "spot", "hole", "stain")


def demo_root(kind: str = "demo") -> Path:
    """Where ``"demo"`` generates its data: ``$VPDM_DEMO_DIR`` or ``~/.cache/vpdm/demo-v1``;
    ``"demo-small"`` beside it (``<that>-small``)."""
    env = os.environ.get("VPDM_DEMO_DIR")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "vpdm" / f"demo-v{DEMO_VERSION}"
    return root.with_name(root.name + "-small") if kind == "demo-small" else root


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    return yy, xx


def _noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    return rng.normal(0.0, sigma, (size, size, 1))


def _gen_grid(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Regular line texture, random phase/brightness."""
    yy, xx = _coords(size)
    period = size / 8.0
    py, px = rng.uniform(0, period, 2)
    thick = 0.14 * period
    lines = (((yy + py) % period) < thick) | (((xx + px) % period) < thick)
    bg = np.array([190.0, 185.0, 170.0]) * rng.uniform(0.9, 1.1)
    fg = np.array([70.0, 75.0, 90.0]) * rng.uniform(0.9, 1.1)
    img = np.where(lines[..., None], fg, bg) + _noise(rng, size, 6.0)
    return img, np.ones((size, size), dtype=bool)


def _gen_blobs(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random-wave noise mapped between two colours."""
    yy, xx = _coords(size)
    f = np.zeros((size, size))
    for _ in range(6):
        u, v = rng.uniform(-3.0, 3.0, 2)
        f += rng.uniform(0.5, 1.0) * np.cos(2 * np.pi * (u * xx + v * yy) / size + rng.uniform(0, 2 * np.pi))
    f = (f - f.min()) / (np.ptp(f) + 1e-9)
    c0, c1 = np.array([60.0, 120.0, 70.0]), np.array([170.0, 200.0, 120.0])
    img = c0 + f[..., None] * (c1 - c0) + _noise(rng, size, 4.0)
    return img, np.ones((size, size), dtype=bool)


def _gen_disc(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Shaded centred disc (an 'object') with position/radius jitter on a dark background."""
    yy, xx = _coords(size)
    cy, cx = size / 2 + rng.uniform(-0.04, 0.04, 2) * size
    r = size * rng.uniform(0.30, 0.34)
    d = np.hypot(yy - cy, xx - cx)
    obj = d < r
    shade = 1.0 - 0.35 * (d / r) ** 2
    base = np.array([200.0, 160.0, 90.0]) * rng.uniform(0.92, 1.08)
    bg = np.array([25.0, 25.0, 30.0])
    img = np.where(obj[..., None], base * shade[..., None], bg) + _noise(rng, size, 4.0)
    return img, obj


def _gen_stripes(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Diagonal sinusoidal stripes, random phase."""
    yy, xx = _coords(size)
    s = 0.5 + 0.5 * np.sin(2 * np.pi * (xx + yy) / (size / 6.0) + rng.uniform(0, 2 * np.pi))
    c0, c1 = np.array([40.0, 60.0, 140.0]), np.array([150.0, 170.0, 230.0])
    img = c0 + s[..., None] * (c1 - c0) + _noise(rng, size, 5.0)
    return img, np.ones((size, size), dtype=bool)


def _gen_ring(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A washer-like annulus object with jitter."""
    yy, xx = _coords(size)
    cy, cx = size / 2 + rng.uniform(-0.04, 0.04, 2) * size
    r_out = size * rng.uniform(0.33, 0.37)
    d = np.hypot(yy - cy, xx - cx)
    obj = (d < r_out) & (d > 0.45 * r_out)
    base = np.array([170.0, 175.0, 185.0]) * rng.uniform(0.92, 1.08)
    bg = np.array([60.0, 40.0, 30.0])
    img = np.where(obj[..., None], base, bg) + _noise(rng, size, 4.0)
    return img, obj


def _shade(rng: np.random.Generator, size: int, strength: float) -> np.ndarray:
    """A gentle linear illumination gradient in a random direction (multiplicative, mean 1)."""
    yy, xx = _coords(size)
    ang = rng.uniform(0, 2 * np.pi)
    ramp = ((yy - size / 2) * np.sin(ang) + (xx - size / 2) * np.cos(ang)) / size
    return (1.0 + strength * ramp)[..., None]


def _gen_screw(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A small threaded part (shaft, thread, head) at a random place and angle on a plain background,
    as MVTec's screws: the part covers a few percent of the image and its look changes with the angle."""
    yy, xx = _coords(size)
    ang = rng.uniform(0, 2 * np.pi)
    cy, cx = rng.uniform(0.35, 0.65, 2) * size
    length, half_width = size * rng.uniform(0.34, 0.38), size * 0.028
    u = (xx - cx) * np.cos(ang) + (yy - cy) * np.sin(ang)  # along the shaft
    v = -(xx - cx) * np.sin(ang) + (yy - cy) * np.cos(ang)  # across it
    taper = np.clip((length / 2 - u) / (0.12 * length), 0.0, 1.0)  # pointed tip at u = +L/2
    shaft = (np.abs(u) < length / 2) & (np.abs(v) < half_width * (0.35 + 0.65 * taper))
    head = np.hypot(u + length / 2, v) < size * 0.055
    part = shaft | head
    period = size * 0.022
    thread = 0.5 + 0.5 * np.sin(2 * np.pi * u / period + 0.6 * v / half_width)
    across = 1.0 - 0.45 * (v / (size * 0.055)) ** 2  # a cylinder lit from above
    metal = (95.0 + 70.0 * across * np.where(head, 0.8, 0.55 + 0.45 * thread))[..., None] * np.array([1.0, 1.0, 1.05])
    bg = np.array([205.0, 205.0, 200.0]) * rng.uniform(0.95, 1.05)
    img = np.where(part[..., None], metal, bg) * _shade(rng, size, 0.12) + _noise(rng, size, 3.0)
    return img, part


def _gen_tread(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Tyre tread: dark rubber with repeating zig-zag grooves and thin sipes at a random phase."""
    yy, xx = _coords(size)
    period = size / 5.0
    py, px = rng.uniform(0, period, 2)
    zig = np.abs(((xx + px) % period) / period - 0.5) * period * 0.6  # zig-zag offset of the groove
    groove = np.abs(((yy + py + zig) % period) - period / 2) < period * 0.09
    sipe = (np.abs(((xx + px + 0.5 * (yy + py)) % (period / 2)) - period / 4) < 0.9) & ~groove
    rubber = 62.0 * rng.uniform(0.92, 1.08)
    base = np.where(groove, rubber * 0.45, np.where(sipe, rubber * 0.7, rubber))
    img = base[..., None] * np.array([1.0, 1.0, 1.04]) * _shade(rng, size, 0.15) + _noise(rng, size, 3.0)
    return img, ~groove


def _gen_brushed(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Brushed metal: fine streaks along one direction (noise smoothed along rows), mid grey."""
    streaks = rng.normal(0.0, 1.0, (size, size + 32))
    kernel = np.ones(32) / 32.0
    streaks = np.stack([np.convolve(row, kernel, mode="valid")[:size] for row in streaks])
    streaks /= streaks.std() + 1e-9
    level = 150.0 * rng.uniform(0.93, 1.07)
    img = (level + 9.0 * streaks)[..., None] * np.array([1.0, 1.01, 1.03]) * _shade(rng, size, 0.2)
    return img + _noise(rng, size, 2.0), np.ones((size, size), dtype=bool)


def _gen_mesh(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A fine woven mesh: thin bright wires every few pixels over a dark backing, random phase."""
    yy, xx = _coords(size)
    period = size / 24.0
    py, px = rng.uniform(0, period, 2)
    wy = np.cos(2 * np.pi * (yy + py) / period) ** 8
    wx = np.cos(2 * np.pi * (xx + px) / period) ** 8
    wires = np.maximum(wy, wx)
    img = (45.0 + 150.0 * wires)[..., None] * np.array([1.0, 0.97, 0.9]) * rng.uniform(0.93, 1.07)
    return img * _shade(rng, size, 0.1) + _noise(rng, size, 3.0), np.ones((size, size), dtype=bool)


DEMO_CLASSES: tuple[tuple[str, Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]], ...] = (
    ("grid", _gen_grid),
    ("blobs", _gen_blobs),
    ("disc", _gen_disc),
    ("stripes", _gen_stripes),
    ("ring", _gen_ring),
    ("screw", _gen_screw),
    ("tread", _gen_tread),
    ("brushed", _gen_brushed),
    ("mesh", _gen_mesh),
)
# Defects of a few pixels (at 256 px: 3-60 pixels of mask), painted on the small-defect classes.
SMALL_DEFECTS: tuple[str, ...] = ("pinhole", "thin_scratch", "chip")
# The small-defect development set (`demo-small`): small parts freely placed, fine textures.
SMALL_DEMO_CLASSES: tuple[str, ...] = ("screw", "tread", "brushed", "mesh")
SMALL_DEMO_PARAMS: dict[str, Any] = {
    "classes": list(SMALL_DEMO_CLASSES),
    "train_per_class": 80,
    "test_good_per_class": 30,
    "test_defect_per_class": 30,
    "size": 256,
}


def _defects_of(name: str) -> tuple[str, ...]:
    return SMALL_DEFECTS if name in SMALL_DEMO_CLASSES else DEMO_DEFECTS


def _paint_defect(
    rng: np.random.Generator, img: np.ndarray, region: np.ndarray, kind: str
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one visible defect inside ``region``; returns (image, bool mask of painted pixels)."""
    size = img.shape[0]
    yy, xx = _coords(size)
    ys, xs = np.nonzero(region[size // 8 : size - size // 8, size // 8 : size - size // 8])
    k = int(rng.integers(len(ys)))
    cy, cx = float(ys[k] + size // 8), float(xs[k] + size // 8)
    mean = img[region].mean(axis=0)
    contrast = np.where(mean > 128, 20.0, 235.0)  # dark on bright, bright on dark
    if kind == "scratch":
        ang = rng.uniform(0, np.pi)
        length = size * rng.uniform(0.25, 0.45)
        dy, dx = np.sin(ang), np.cos(ang)
        t = (yy - cy) * dy + (xx - cx) * dx
        dist = np.abs((yy - cy) * dx - (xx - cx) * dy)
        mask = (dist < max(1.0, size / 90)) & (np.abs(t) < length / 2)
        color: np.ndarray = contrast
    elif kind == "spot":
        r = size * rng.uniform(0.04, 0.08)
        mask = np.hypot(yy - cy, xx - cx) < r
        color = contrast
    elif kind == "hole":
        r = size * rng.uniform(0.07, 0.11)
        mask = np.hypot((yy - cy) / 1.3, xx - cx) < r
        color = np.array([5.0, 5.0, 5.0]) if mean.mean() > 60 else np.array([230.0, 230.0, 230.0])
    elif kind == "stain":
        r0 = size * rng.uniform(0.08, 0.12)
        ang = np.arctan2(yy - cy, xx - cx)
        wob = 1 + 0.25 * np.sin(3 * ang + rng.uniform(0, 6.3)) + 0.15 * np.sin(5 * ang + rng.uniform(0, 6.3))
        mask = np.hypot(yy - cy, xx - cx) < r0 * wob
        color = np.array([200.0, 30.0, 30.0])
        out = img.copy()
        out[mask] = 0.35 * out[mask] + 0.65 * color
        mask &= region
        return np.where(region[..., None], out, img), mask
    else:  # pragma: no cover - internal
        raise ValueError(kind)
    mask &= region
    out = img.copy()
    out[mask] = color
    return out, mask


def _paint_small_defect(
    rng: np.random.Generator, img: np.ndarray, region: np.ndarray, kind: str
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect of a few pixels inside ``region``: a pin-hole (radius 1-2.5 px), a thin scratch
    (1 px wide, 6-8 % of the side long) or a chip (a bite of radius 1.5-3.5 px taken out of the
    region's edge, showing the background). Returns (image, bool mask of the changed pixels)."""
    size = img.shape[0]
    yy, xx = _coords(size)
    px = size / 256.0  # sizes are given at 256 px
    if kind == "chip":
        inner = region.copy()
        for axis in (0, 1):  # the region's edge: region pixels with a non-region 4-neighbour
            inner &= np.roll(region, 1, axis) & np.roll(region, -1, axis)
        edge = region & ~inner
        edge[: size // 8] = edge[size - size // 8 :] = False
        edge[:, : size // 8] = edge[:, size - size // 8 :] = False
        ys, xs = np.nonzero(edge if edge.any() else region)
    else:
        margin = size // 8
        ys, xs = np.nonzero(region[margin : size - margin, margin : size - margin])
        ys, xs = ys + margin, xs + margin
    k = int(rng.integers(len(ys)))
    cy, cx = float(ys[k]), float(xs[k])
    mean = img[region].mean(axis=0)
    contrast = np.where(mean.mean() > 110, mean * 0.35, np.minimum(mean * 2.2 + 40, 255.0))
    out = img.copy()
    if kind == "pinhole":
        mask = np.hypot(yy - cy, xx - cx) <= px * rng.uniform(1.0, 2.5)
        mask &= region
        out[mask] = contrast
    elif kind == "thin_scratch":
        ang = rng.uniform(0, np.pi)
        half = size * rng.uniform(0.03, 0.04)
        t = (yy - cy) * np.sin(ang) + (xx - cx) * np.cos(ang)
        dist = np.abs((yy - cy) * np.cos(ang) - (xx - cx) * np.sin(ang))
        mask = (dist < max(0.5, 0.6 * px)) & (np.abs(t) < half) & region
        out[mask] = 0.3 * out[mask] + 0.7 * contrast
    elif kind == "chip":
        mask = (np.hypot(yy - cy, xx - cx) <= px * rng.uniform(1.5, 3.5)) & region
        outside = ~region
        background = img[outside].mean(axis=0) if outside.any() else contrast
        out[mask] = background
    else:  # pragma: no cover - internal
        raise ValueError(kind)
    return out, mask


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _write_png(path: Path, arr: np.ndarray) -> None:
    """Atomic write, so concurrent generators (e.g. DDP ranks) never expose half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".png")
    try:
        os.fchmod(fd, new_file_mode())  # mkstemp makes 0600: the demo is shared like any file open() makes
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(arr).save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _demo_class_names(classes: int | Sequence[str]) -> list[str]:
    """The demo's class names: the first ``classes`` of :data:`DEMO_CLASSES`, or the names given."""
    known = [name for name, _ in DEMO_CLASSES]
    if isinstance(classes, bool) or not isinstance(classes, (int, list, tuple)):
        raise ConfigError(
            f"demo classes must be an integer in 1..{len(DEMO_CLASSES)} or a list of class names "
            f"({', '.join(known)}), got {classes!r}"
        )
    if isinstance(classes, int):
        if not 1 <= classes <= len(DEMO_CLASSES):
            raise ConfigError(f"demo classes must be an integer in 1..{len(DEMO_CLASSES)}, got {classes!r}")
        return known[:classes]
    names = list(classes)
    unknown = [n for n in names if n not in known]
    if not names or unknown or len(set(names)) != len(names):
        raise ConfigError(f"demo classes must be distinct names among {', '.join(known)}, got {classes!r}")
    return names


def _demo_files(params: dict[str, Any]) -> list[Path]:
    """Relative paths the demo with ``params`` consists of (for completeness checks)."""
    files: list[Path] = []
    for name in _demo_class_names(params["classes"]):
        c = Path(name)
        defects = _defects_of(name)
        files += [c / "train" / "good" / f"{i:03d}.png" for i in range(params["train_per_class"])]
        files += [c / "test" / "good" / f"{i:03d}.png" for i in range(params["test_good_per_class"])]
        for i in range(params["test_defect_per_class"]):
            d = defects[i % len(defects)]
            files += [c / "test" / d / f"{i:03d}.png", c / "ground_truth" / d / f"{i:03d}_mask.png"]
    return files


def _ensure_demo(root: Path, defaults: dict[str, Any] | None = None) -> None:
    """Use a demo dir as generated (any parameters), or generate one there with ``defaults`` (the
    default demo when None)."""
    try:
        old = json.loads((root / DEMO_MARKER).read_text(encoding="utf-8"))
        kwargs = {k: (list(v) if isinstance(v, list) else int(v)) for k, v in old.items() if k != "version"}
    except (OSError, ValueError, TypeError, AttributeError):
        kwargs = dict(defaults or {})
    try:
        make_demo_dataset(root, **kwargs)
    except TypeError:  # marker from an unknown future version: fall back to the defaults
        make_demo_dataset(root, **(defaults or {}))


def make_demo_dataset(
    root: Path,
    *,
    classes: int | Sequence[str] = 3,
    train_per_class: int = 24,
    test_good_per_class: int = 8,
    test_defect_per_class: int = 8,
    size: int = 128,
    seed: int = 0,
) -> Path:
    """Write a small synthetic multi-class dataset (MVTec layout) so everything runs without downloads.

    ``classes``: the first n of grid, blobs, disc, stripes, ring, screw, tread, brushed, mesh, or a
    list of those names. Defects cycle through scratch, spot, hole, stain (large: 4-20 % of the
    side), and on the small-defect classes (screw, tread, brushed, mesh: ``demo-small``) through
    pinhole, thin_scratch, chip (a few pixels). Deterministic in ``seed`` and idempotent: a marker
    file records the parameters and generation is skipped when it matches and all files exist.
    Returns ``root``.
    """
    root = Path(root).expanduser()
    names = _demo_class_names(classes)
    for name, v, lo in (
        ("train_per_class", train_per_class, 1),
        ("test_good_per_class", test_good_per_class, 0),
        ("test_defect_per_class", test_defect_per_class, 0),
        ("size", size, 32),
        ("seed", seed, 0),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ConfigError(f"demo {name} must be an integer >= {lo}, got {v!r}")
    if test_good_per_class + test_defect_per_class == 0:
        raise ConfigError("demo needs test images: test_good_per_class + test_defect_per_class must be > 0")
    params = {
        "version": DEMO_VERSION,
        "classes": classes if isinstance(classes, int) else names,
        "train_per_class": train_per_class,
        "test_good_per_class": test_good_per_class,
        "test_defect_per_class": test_defect_per_class,
        "size": size,
        "seed": seed,
    }
    marker = root / DEMO_MARKER
    if marker.is_file():
        try:
            old = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if old is not None and old != params:
            raise DataError(
                f"demo directory {str(root)!r} was generated with other parameters {old} "
                f"(wanted {params}): use another directory or delete it"
            )
        if old == params and all((root / p).is_file() for p in _demo_files(params)):
            return root
    if root.exists() and not root.is_dir():
        raise DataError(f"demo path {str(root)!r} exists and is not a directory")

    generators = dict(DEMO_CLASSES)
    for ci, name in enumerate(names):
        gen = generators[name]
        cdir = root / name
        defects = _defects_of(name)
        paint = _paint_small_defect if defects is SMALL_DEFECTS else _paint_defect

        def rng_for(split_code: int, i: int, _ci: int = ci) -> np.random.Generator:
            return np.random.default_rng([seed, _ci, split_code, i])

        for i in range(train_per_class):
            img, _ = gen(rng_for(0, i), size)
            _write_png(cdir / "train" / "good" / f"{i:03d}.png", _to_uint8(img))
        for i in range(test_good_per_class):
            img, _ = gen(rng_for(1, i), size)
            _write_png(cdir / "test" / "good" / f"{i:03d}.png", _to_uint8(img))
        for i in range(test_defect_per_class):
            d = defects[i % len(defects)]
            rng = rng_for(2, i)
            img, region = gen(rng, size)
            img, mask = paint(rng, img, region, d)
            _write_png(cdir / "test" / d / f"{i:03d}.png", _to_uint8(img))
            _write_png(cdir / "ground_truth" / d / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)

    fd, tmp = tempfile.mkstemp(dir=root, prefix=".tmp-", suffix=".json")
    os.fchmod(fd, new_file_mode())
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(params, f, sort_keys=True)
    os.replace(tmp, marker)
    return root
