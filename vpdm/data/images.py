"""Decoding images and masks, and resizing them the way the README says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from vpdm.errors import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MIN_IMAGE_SIDE",
    "image_to_rgb",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
# Smaller images are refused, not upscaled: a few pixels cannot show a part's defects, and a score
# computed on invented detail would look as trustworthy as a real one. Thumbnails and icons land here.
MIN_IMAGE_SIDE = 8

# Truncated files must fail loudly instead of yielding half-grey images; we never flip this.
ImageFile.LOAD_TRUNCATED_IMAGES = False


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
