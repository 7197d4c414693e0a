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
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image

from vpdm.data.demo import SMALL_DEMO_PARAMS, _ensure_demo, demo_root
from vpdm.data.images import IMAGE_EXTENSIONS
from vpdm.errors import ConfigError, DataError

__all__ = [
    "KNOWN_KINDS",
    "MISSING_MASKS",
    "Sample",
    "categories",
    "list_samples",
    "parse_data_spec",
]

MVTEC_LAYOUT_KINDS: tuple[str, ...] = ("mvtec", "mpdd", "loco", "mtd")
KNOWN_KINDS: tuple[str, ...] = (*MVTEC_LAYOUT_KINDS, "visa", "folder", "demo", "demo-small")
DEMO_KINDS: tuple[str, ...] = ("demo", "demo-small")

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
