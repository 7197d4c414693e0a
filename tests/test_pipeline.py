"""The Detector's input contract: what ``score_tensor`` and ``predict_files`` accept, convert and refuse.

Expectations are computed independently of the library (integer arithmetic on the pixel values,
hand-written PNG files), and a converted image must score exactly like its plain 8-bit RGB equivalent.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import train_checkpoint
from tests.images import declared_size_png, png_bytes, raw_png16
from tests.test_cli import TINY
from vpdm.data.images import MIN_IMAGE_SIDE
from vpdm.errors import DataError
from vpdm.features.backbone import IMAGENET_MEAN, IMAGENET_STD
from vpdm.inference.detector import Detector

SIZE = 64  # backbone.image_size in TINY


@pytest.fixture(scope="module")
def detector(tiny_demo, tmp_path_factory) -> Detector:
    return Detector.from_checkpoint(train_checkpoint(tiny_demo, tmp_path_factory, TINY))


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    """Two ImageNet-normalised random images."""
    rgb = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (rgb - mean) / std


EXPECTED = "expected a float B x 3 x 64 x 64 tensor of ImageNet-normalised RGB images"


# --------------------------------------------------------------------------------------------
# score_tensor
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool, torch.complex64])
def test_score_tensor_refuses_non_float_dtypes(detector, batch, dtype):
    with pytest.raises(DataError) as info:
        detector.score_tensor(batch.to(dtype))
    message = str(info.value)
    assert f"images have dtype {dtype}" in message and EXPECTED in message
    if dtype == torch.uint8:
        assert "divide by 255 and normalise" in message


@pytest.mark.parametrize(
    "shape",
    [
        (3, SIZE, SIZE),
        (1, 2, 3, SIZE, SIZE),
        (2, 1, SIZE, SIZE),
        (2, 4, SIZE, SIZE),
        (2, 3, 0, SIZE),
        (2, 3, SIZE, 0),
        (2, 3, 32, 32),
        (2, 3, SIZE, 48),
    ],
)
def test_score_tensor_refuses_wrong_shapes(detector, shape):
    with pytest.raises(DataError) as info:
        detector.score_tensor(torch.zeros(shape))
    assert (
        str(info.value) == f"images have shape {shape}; {EXPECTED} "
        "((x / 255 - IMAGENET_MEAN) / IMAGENET_STD, as vpdm.data.dataset.AnomalyDataset yields)"
    )


def test_score_tensor_refuses_non_tensors(detector, batch):
    with pytest.raises(DataError, match=f"{EXPECTED}.*got ndarray"):
        detector.score_tensor(batch.numpy())


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_score_tensor_names_the_non_finite_items(detector, batch, value):
    bad = batch.repeat(3, 1, 1, 1)
    bad[1, 2, 5, 7] = value
    bad[4, 0, 0, 0] = value
    with pytest.raises(DataError, match=r"^batch item\(s\) 1, 4 contain NaN or infinite values; expected"):
        detector.score_tensor(bad)


def test_score_tensor_converts_other_float_dtypes(detector, batch):
    scores, maps = detector.score_tensor(batch)
    assert scores.dtype == torch.float32 and scores.shape == (2,) and maps.shape == (2, SIZE, SIZE)
    s64, _ = detector.score_tensor(batch.double())
    assert torch.equal(s64, scores)  # float64 holding float32 values converts back exactly
    s16, _ = detector.score_tensor(batch.half())  # precision lost in the input, not refused
    torch.testing.assert_close(s16, scores, rtol=1e-2, atol=1e-2)


def test_score_tensor_empty_batch_gives_empty_results(detector):
    scores, maps = detector.score_tensor(torch.zeros(0, 3, SIZE, SIZE))
    assert scores.shape == (0,) and maps.shape == (0, SIZE, SIZE)


# --------------------------------------------------------------------------------------------
# predict_files: conversions and per-file refusals
# --------------------------------------------------------------------------------------------


def _rgb(seed: int, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_predict_files_converts_modes_like_their_rgb(detector, tmp_path):
    rgb = _rgb(1)
    gray = rgb[..., 1].copy()
    ramp = np.linspace(0, 65535, SIZE * SIZE).round().astype(np.uint16).reshape(SIZE, SIZE)
    ramp8 = ((ramp.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)
    colour16 = np.random.default_rng(2).integers(0, 65536, (SIZE, SIZE, 3)).astype(np.uint16)
    alpha = np.random.default_rng(3).integers(0, 256, (SIZE, SIZE, 1), dtype=np.uint8)
    files = {
        "rgb.png": png_bytes(rgb),
        "rgba.png": png_bytes(np.concatenate([rgb, alpha], axis=-1)),  # alpha dropped: scores as rgb.png
        "gray.png": png_bytes(gray),
        "gray_as_rgb.png": png_bytes(np.repeat(gray[..., None], 3, axis=-1)),
        "ramp16.png": png_bytes(ramp),  # PIL mode I;16
        "ramp8_as_rgb.png": png_bytes(np.repeat(ramp8[..., None], 3, axis=-1)),
        "colour16.png": raw_png16(colour16),  # 48-bit colour
        "colour16_as_rgb.png": png_bytes((colour16 >> 8).astype(np.uint8)),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    preds = {
        p.path.rsplit("/", 1)[-1]: p
        for p in detector.predict_files([tmp_path / n for n in files], batch_size=3, progress=False)
    }
    assert all(p.error is None and np.isfinite(p.score) for p in preds.values()), preds
    for converted, plain in [
        ("rgba.png", "rgb.png"),
        ("gray.png", "gray_as_rgb.png"),
        ("ramp16.png", "ramp8_as_rgb.png"),
        ("colour16.png", "colour16_as_rgb.png"),
    ]:
        # same decoded pixels; batch composition only moves the last float bits
        assert preds[converted].score == pytest.approx(preds[plain].score, rel=1e-5), converted
        np.testing.assert_allclose(preds[converted].anomaly_map, preds[plain].anomaly_map, rtol=1e-5, atol=1e-4)
    assert ramp8.max() == 255 and np.abs(ramp8.astype(int) - (ramp >> 8)).max() <= 1  # a ramp, not clipped white


def test_predict_files_refuses_tiny_and_huge_images_per_file(detector, tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes(_rgb(4)))
    edge = tmp_path / "edge.png"
    edge.write_bytes(png_bytes(_rgb(5, size=MIN_IMAGE_SIDE)))
    files = [good, tmp_path / "one.png", tmp_path / "thin.png", tmp_path / "bomb.png", edge]
    files[1].write_bytes(png_bytes(np.zeros((1, 1, 3), np.uint8)))
    files[2].write_bytes(png_bytes(np.zeros((2, 3), np.uint8)))  # 3 wide, 2 high
    files[3].write_bytes(declared_size_png(20000, 20000))
    preds = detector.predict_files(files, batch_size=2, progress=False)
    assert [p.path for p in preds] == [str(f) for f in files]
    alone = detector.predict_files([good, edge], progress=False)
    assert preds[0].score == pytest.approx(alone[0].score, rel=1e-5)  # unaffected by the bad ones
    assert preds[4].score == pytest.approx(alone[1].score, rel=1e-5)
    assert preds[0].error is None and preds[4].error is None
    assert preds[1].score is None and preds[1].error == (
        f"image {str(files[1])!r}: 1x1 pixels is too small, expected at least 8 pixels on each side "
        "(small images are refused, not upscaled)"
    )
    assert preds[2].score is None and preds[2].error.startswith(f"image {str(files[2])!r}: 3x2 pixels is too small")
    assert preds[3].score is None and preds[3].anomaly_map is None
    assert preds[3].error.startswith(f"image {str(files[3])!r} refused, too large: Image size (400000000 pixels)")
