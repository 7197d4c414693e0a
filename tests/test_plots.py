"""Plots: files are written as valid PNGs of the documented size; overlay_array is a plain uint8 blend."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vpdm.errors import DataError
from vpdm.evaluation.plots import overlay_array, save_overlay, save_roc_curves


def _png_size(path: Path) -> tuple[int, int]:
    """Width, height from the IHDR chunk; also proves the file starts as a PNG."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def _sample(h: int = 48, w: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), dtype=bool)
    mask[10:20, 30:45] = True
    amap = rng.random((h, w)) + 2.0 * mask
    return image, amap, mask


def test_overlay_array_shape_dtype_and_colours() -> None:
    image, amap, _ = _sample()
    out = overlay_array(image, amap)
    assert out.shape == image.shape and out.dtype == np.uint8
    grey = np.full((2, 2, 3), 100, dtype=np.uint8)
    low_high = overlay_array(grey, np.array([[0.0, 0.0], [1.0, 1.0]]))
    # jet: minimum is dark blue (0, 0, 127.5), maximum dark red (127.5, 0, 0); alpha 0.5
    assert low_high[0, 0].tolist() == [50, 50, 114]
    assert low_high[1, 1].tolist() == [114, 50, 50]
    # a fixed vmax makes maps comparable: half of vmax is the jet midpoint, values above saturate
    assert overlay_array(grey, np.full((2, 2), 10.0), vmax=2.0)[0, 0].tolist() == [114, 50, 50]


def test_overlay_array_matches_matplotlib_jet() -> None:
    from matplotlib import colormaps

    values = np.linspace(0, 1, 101).reshape(1, -1)
    black = np.zeros((1, 101, 3), dtype=np.uint8)
    ours = overlay_array(black, values, vmax=1.0).astype(float)
    theirs = 0.5 * 255 * colormaps["jet"](values[0])[:, :3]
    assert np.abs(ours[0] - theirs).max() <= 2.0  # matplotlib quantises jet to 256 entries


def test_overlay_array_rejects_bad_shapes() -> None:
    image, amap, _ = _sample()
    with pytest.raises(DataError, match=r"\(24, 32\).*\(48, 64\)"):
        overlay_array(image, amap[::2, ::2])
    with pytest.raises(DataError, match="uint8"):
        overlay_array(image.astype(np.float32), amap)
    with pytest.raises(DataError, match="H x W x 3"):
        overlay_array(image[..., 0], amap)


def test_save_overlay_writes_png(tmp_path: Path) -> None:
    image, amap, mask = _sample()
    path = save_overlay(image, amap, tmp_path / "sub" / "overlay.png", mask=mask, score=0.8731, vmax=3.0)
    assert path == tmp_path / "sub" / "overlay.png"
    assert _png_size(path) == (800, 440)
    with Image.open(path) as im:
        im.verify()
    plain = save_overlay(image, amap, tmp_path / "plain.png")  # no mask, score or vmax
    assert _png_size(plain) == (800, 440)


def test_save_roc_curves_writes_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    per_class: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for i in range(3):
        labels = rng.integers(0, 2, 40)
        per_class[f"class{i}"] = (labels, labels * 0.5 + rng.random(40))
    per_class["normal_only"] = (np.zeros(5), rng.random(5))  # no ROC: listed as n/a, no crash
    path = save_roc_curves(per_class, tmp_path / "roc.png", title="test ROC")
    assert _png_size(path) == (600, 600)
    with Image.open(path) as im:
        im.verify()


def test_importing_plots_does_not_import_matplotlib() -> None:
    import subprocess

    code = "import vpdm, vpdm.evaluation.plots, vpdm.evaluation.metrics, sys; print('matplotlib' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "False"
