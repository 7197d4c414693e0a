"""Metrics against independent truth: sklearn, hand-computed curves and a slow numpy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from vpdm.errors import ConfigError, DataError
from vpdm.evaluation.metrics import (
    METRIC_KEYS,
    aupro,
    compute_metrics,
    image_auroc,
    image_f1_max,
    pixel_ap,
    pixel_auroc,
    pro_curve,
    roc_curve,
)


def _blobs(rng: np.random.Generator, n: int = 4, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Masks with a few rectangles of different sizes and a noisy map that partly finds them."""
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(1, n):  # image 0 stays normal
        for _ in range(rng.integers(1, 4)):
            h, w = rng.integers(2, 9, size=2)
            y, x = rng.integers(0, size - 8, size=2)
            masks[i, y : y + h, x : x + w] = True
    noise = ndimage.gaussian_filter(rng.normal(size=masks.shape), sigma=(0, 1.5, 1.5))
    maps = noise + 0.6 * ndimage.gaussian_filter(masks.astype(float), sigma=(0, 1, 1))
    return masks, maps


# ----------------------------------------------------------------------------- sklearn parity


@pytest.mark.parametrize("seed", range(5))
def test_image_metrics_match_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=200)
    scores = rng.integers(0, 12, size=200).astype(float) + 0.5 * labels * rng.random(200).round(1)
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    p, r, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nanmax(2 * p * r / (p + r))
    assert image_f1_max(labels, scores) == pytest.approx(f1, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_pixel_metrics_match_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks, maps = _blobs(rng, n=5)
    maps = maps.round(1).astype(np.float32)[:, None]  # N x 1 x H x W, many ties, float32
    y, s = masks.ravel(), maps.ravel().astype(np.float64)
    assert pixel_auroc(masks[:, None], maps) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert pixel_ap(masks, maps) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_extreme_cases() -> None:
    y = np.array([0, 1, 0, 1, 1])
    assert image_auroc(y, np.zeros(5)) == pytest.approx(0.5)  # all tied
    assert image_auroc(y, [-np.inf, np.inf, -np.inf, np.inf, np.inf]) == pytest.approx(1.0)
    assert image_auroc(y, -y) == pytest.approx(0.0)
    assert image_f1_max(y, y) == pytest.approx(1.0)
    assert image_f1_max(y, np.zeros(5)) == pytest.approx(2 * 0.6 / 1.6)  # everything flagged


def test_accepts_torch_and_lists() -> None:
    labels, scores = [0, 1, 1, 0], [0.1, 0.8, 0.4, 0.5]
    ref = roc_auc_score(labels, scores)
    assert image_auroc(torch.tensor(labels), torch.tensor(scores)) == pytest.approx(ref)
    assert image_auroc(labels, scores) == pytest.approx(ref)


def test_roc_curve_area_is_auroc() -> None:
    rng = np.random.default_rng(7)
    labels, scores = rng.integers(0, 2, 50), rng.integers(0, 5, 50)
    fpr, tpr = roc_curve(labels, scores)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


# ----------------------------------------------------------------------------- AUPRO by hand


def test_aupro_perfect_map_is_one() -> None:
    rng = np.random.default_rng(0)
    masks, _ = _blobs(rng)
    for limit in (0.3, 0.05, 1.0):
        assert aupro(masks, masks.astype(float), fpr_limit=limit) == pytest.approx(1.0)
    assert pixel_auroc(masks, masks.astype(float)) == pytest.approx(1.0)


def test_aupro_finds_one_of_two_equal_regions() -> None:
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, 1:3, 1:3] = True  # region A: found
    masks[1, 4:6, 4:6] = True  # region B: same size, missed
    maps = np.full(masks.shape, 0.5)
    maps[0, 1:3, 1:3] = 1.0
    maps[1, 4:6, 4:6] = 0.0  # below every normal pixel: PRO stays 0.5 over the whole range
    assert aupro(masks, maps) == pytest.approx(0.5)
    # B tied with the normals: the curve rises linearly from (0, .5) to (1, 1) -> mean .575 on [0, .3]
    maps[1, 4:6, 4:6] = 0.5
    assert aupro(masks, maps) == pytest.approx((0.5 * 0.3 + 0.5 * 0.3**2 / 2) / 0.3)


def test_aupro_weighs_regions_not_pixels() -> None:
    masks = np.zeros((1, 10, 10), dtype=bool)
    masks[0, 0, 0] = True  # 1-pixel region, found
    masks[0, 5:8, 5:8] = True  # 9-pixel region, missed
    maps = np.full(masks.shape, 0.5)
    maps[0, 0, 0] = 1.0
    maps[0, 5:8, 5:8] = 0.0
    assert aupro(masks, maps) == pytest.approx(0.5)  # PRO 1/2 although only 1/10 of the pixels found
    assert pixel_auroc(masks, maps) == pytest.approx(0.1)


def test_aupro_uses_8_connectivity() -> None:
    masks = np.zeros((1, 6, 6), dtype=bool)
    masks[0, 1, 1:3] = True  # two pixels ...
    masks[0, 2, 3] = True  # ... and one touching them diagonally: one region under 8-connectivity
    maps = np.full(masks.shape, 0.5)
    maps[0, 1, 1:3] = 1.0
    maps[0, 2, 3] = 0.0
    assert aupro(masks, maps) == pytest.approx(2 / 3)  # 4-connectivity would give (1 + 0) / 2


def test_aupro_hand_computed_curve() -> None:
    # one 2-pixel region (0.9, 0.5) among six normals (0.7, 0.6, 0.4, 0.3, 0.2, 0.1):
    # PRO curve (0,0) -> (0,.5) -> (2/6,.5) -> (2/6,1) -> (1,1)
    masks = np.array([[[1, 1, 0, 0], [0, 0, 0, 0]]])
    maps = np.array([[[0.9, 0.5, 0.7, 0.3], [0.1, 0.2, 0.4, 0.6]]])
    fpr, pro = pro_curve(masks, maps)
    assert np.interp(0.2, fpr, pro) == pytest.approx(0.5) and np.interp(0.5, fpr, pro) == 1.0
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(5 / 6)
    assert aupro(masks, maps, fpr_limit=0.5) == pytest.approx((0.5 / 3 + 1 * (0.5 - 1 / 3)) / 0.5)
    assert aupro(masks, maps, fpr_limit=0.3) == pytest.approx(0.5)
    assert pixel_auroc(masks, maps) == pytest.approx(10 / 12)  # one region: PRO curve == ROC


def test_monotone_transform_invariance() -> None:
    rng = np.random.default_rng(3)
    masks, maps = _blobs(rng)
    moved = np.exp(2.0 * maps) + 5.0  # strictly increasing
    assert aupro(masks, moved) == pytest.approx(aupro(masks, maps), abs=1e-12)
    assert pixel_auroc(masks, moved) == pytest.approx(pixel_auroc(masks, maps), abs=1e-12)
    assert pixel_ap(masks, moved) == pytest.approx(pixel_ap(masks, maps), abs=1e-12)


# ----------------------------------------------------------------------------- slow reference


def _reference_aupro(masks: np.ndarray, maps: np.ndarray, thresholds: np.ndarray, limit: float) -> float:
    """Threshold loop in plain numpy: mean region overlap vs. FPR on normal pixels, trapezoid to limit."""
    regions = []
    for i, m in enumerate(masks):
        labeled, n = ndimage.label(m, structure=np.ones((3, 3)))
        regions += [(i, labeled == k) for k in range(1, n + 1)]
    normal = ~masks
    xs, ys = [0.0], [0.0]
    for t in sorted(thresholds, reverse=True):
        pred = maps >= t
        xs.append((pred & normal).sum() / normal.sum())
        ys.append(np.mean([(pred[i] & r).sum() / r.sum() for i, r in regions]))
    xs.append(1.0)
    ys.append(1.0)
    area = 0.0
    for x0, x1, y0, y1 in zip(xs[:-1], xs[1:], ys[:-1], ys[1:]):
        if x0 >= limit:
            break
        if x1 > limit:
            y1, x1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0), limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


@pytest.mark.parametrize("seed", range(3))
def test_aupro_matches_slow_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks, maps = _blobs(rng)
    grid = np.linspace(maps.min(), maps.max(), 1500)
    for limit in (0.3, 0.1):
        assert aupro(masks, maps, limit) == pytest.approx(_reference_aupro(masks, maps, grid, limit), abs=1e-2)
    # on a quantised map the grid of all distinct values is exact, so the two must agree tightly
    q = np.round(maps * 20) / 20
    assert aupro(masks, q) == pytest.approx(_reference_aupro(masks, q, np.unique(q), 0.3), abs=1e-9)


# ----------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(DataError, match="3 labels but 4 scores"):
        image_auroc([0, 1, 0], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(DataError, match=r"\(2, 4, 4\).*\(2, 4, 5\)"):
        pixel_auroc(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    with pytest.raises(DataError, match="255"):
        pixel_auroc(np.full((1, 2, 2), 255), np.zeros((1, 2, 2)))
    with pytest.raises(DataError, match="NaN"):
        image_auroc([0, 1], [0.1, np.nan])
    with pytest.raises(DataError, match="no positive"):
        image_auroc([0, 0], [0.1, 0.2])
    with pytest.raises(DataError, match="no positive"):
        aupro(np.zeros((1, 3, 3)), np.zeros((1, 3, 3)))
    with pytest.raises(DataError, match=r"shape \(3, 3\)"):
        aupro(np.zeros((3, 3)), np.zeros((3, 3)))
    with pytest.raises(ConfigError, match="fpr_limit=0"):
        aupro(np.ones((1, 3, 3)), np.zeros((1, 3, 3)), fpr_limit=0)
    assert issubclass(DataError, ValueError)


# ----------------------------------------------------------------------------- compute_metrics


def test_compute_metrics_per_class_and_mean() -> None:
    rng = np.random.default_rng(11)
    masks_a, maps_a = _blobs(rng, n=6)
    masks_c, maps_c = _blobs(rng, n=4)
    masks_c, maps_c = masks_c[1:], maps_c[1:]  # class "c": anomalous images only
    masks_b, maps_b = np.zeros((3, 32, 32), bool), rng.normal(size=(3, 32, 32))  # "b": normal only
    masks = np.concatenate([masks_a, masks_b, masks_c])
    maps = np.concatenate([maps_a, maps_b, maps_c])
    labels = masks.any(axis=(1, 2)).astype(int)
    scores = maps.max(axis=(1, 2))
    cats = ["a"] * 6 + ["b"] * 3 + ["c"] * 3
    order = rng.permutation(len(cats))  # classes interleaved
    out = compute_metrics(labels[order], scores[order], masks[order], maps[order], [cats[i] for i in order])

    assert list(out["per_class"]) == ["a", "b", "c"]
    for res in out["per_class"].values():
        assert set(res) == set(METRIC_KEYS)
    a = out["per_class"]["a"]
    assert a["image_auroc"] == pytest.approx(roc_auc_score(labels[:6], scores[:6]))
    assert a["image_f1_max"] == pytest.approx(image_f1_max(labels[:6], scores[:6]))
    assert a["pixel_auroc"] == pytest.approx(roc_auc_score(masks_a.ravel(), maps_a.ravel()))
    assert a["pixel_ap"] == pytest.approx(average_precision_score(masks_a.ravel(), maps_a.ravel()))
    assert a["aupro"] == pytest.approx(aupro(masks_a, maps_a))
    b, c = out["per_class"]["b"], out["per_class"]["c"]
    assert all(math.isnan(v) for v in b.values())  # one label value, no anomalous pixels
    assert math.isnan(c["image_auroc"]) and math.isnan(c["image_f1_max"])
    assert c["aupro"] == pytest.approx(aupro(masks_c, maps_c))
    for key in METRIC_KEYS:
        vals = [r[key] for r in out["per_class"].values() if not math.isnan(r[key])]
        assert out["mean"][key] == pytest.approx(np.mean(vals))


def test_compute_metrics_without_masks_and_all_nan_mean() -> None:
    out = compute_metrics([0, 1, 0, 0], [0.1, 0.9, 0.2, 0.3], None, None, ["x", "x", "y", "y"])
    assert out["per_class"]["x"]["image_auroc"] == 1.0
    assert math.isnan(out["per_class"]["y"]["image_auroc"])
    assert out["mean"]["image_auroc"] == 1.0
    assert math.isnan(out["mean"]["pixel_auroc"])  # NaN everywhere stays NaN, without a warning


def test_compute_metrics_rejects_mismatched_lengths() -> None:
    with pytest.raises(DataError, match="3 labels, 3 scores and 2 categories"):
        compute_metrics([0, 1, 0], [0.1, 0.2, 0.3], None, None, ["a", "a"])
    with pytest.raises(DataError, match="2 masks/maps but 3 labels"):
        compute_metrics([0, 1, 0], [0.1, 0.2, 0.3], np.zeros((2, 4, 4)), np.zeros((2, 4, 4)), "abc")


def test_pixel_metrics_at_benchmark_size_match_the_closed_form() -> None:
    """~300 x 224 x 224 pixels: uniform noise plus a shift of 0.3 on defect pixels has the closed-form
    AUROC P(U + 0.3 > V) = 1 - 0.7^2 / 2 = 0.755 (speed is the benchmark's business, not a test's)."""
    rng = np.random.default_rng(0)
    masks = np.zeros((300, 224, 224), dtype=bool)
    masks[::3, 60:110, 80:140] = True
    maps = rng.random(masks.shape, dtype=np.float32) + 0.3 * masks
    out = compute_metrics(masks.any(axis=(1, 2)), maps.max(axis=(1, 2)), masks, maps, ["z"] * 300)
    assert out["mean"]["pixel_auroc"] == pytest.approx(0.755, abs=2e-3)


# ----------------------------------------------------------------------------- by defect size


def _slow_stratum_aupro(masks: np.ndarray, maps: np.ndarray, keep_region, limit: float = 0.3) -> float:
    """Reference: sweep every distinct map value as a threshold; FPR over normal pixels, PRO over the
    regions that ``keep_region(area)`` accepts; trapezoid up to ``limit`` with an interpolated end."""
    regions = []
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=np.ones((3, 3), dtype=bool))
        for r in range(1, n + 1):
            region = lab == r
            if keep_region(int(region.sum())):
                regions.append((i, region))
    normal = maps[~masks]
    fpr, pro = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fpr.append(float(np.mean(normal >= t)))
        pro.append(float(np.mean([np.mean(maps[i][r] >= t) for i, r in regions])))
    fpr, pro = np.array(fpr + [1.0]), np.array(pro + [1.0])
    cut = np.searchsorted(fpr, limit, side="right")
    x, y = fpr[:cut], pro[:cut]
    if cut < fpr.size:
        y_lim = np.interp(limit, fpr[cut - 1 : cut + 1], pro[cut - 1 : cut + 1])
        x, y = np.append(x, limit), np.append(y, y_lim)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2 / limit)


def test_defect_size_strata_follow_region_area_and_match_a_slow_reference() -> None:
    from vpdm.evaluation.metrics import defect_size_metrics

    rng = np.random.default_rng(0)
    size = 40  # 1600 pixels: small < 3.2 px (0.2 %), medium < 32 px (2 %), large above
    masks = np.zeros((6, size, size), dtype=bool)
    masks[1, 5:6, 5:8] = True  # 3 px: small
    masks[1, 20:26, 20:25] = True  # 30 px: medium
    masks[2, 2:3, 30:31] = True  # 1 px: small
    masks[2, 10:20, 10:20] = True  # 100 px: large
    masks[3, 30:34, 4:12] = True  # 32 px: large (2 % exactly is not below the bound)
    masks[4, 33:35, 33:34] = True  # 2 px: small
    maps = rng.normal(size=masks.shape) + 1.2 * masks + 0.3 * ndimage.uniform_filter(masks.astype(float), 3)
    cats = ["a"] * 6
    doc = defect_size_metrics(masks, maps, cats)
    got = doc["per_class"]["a"]
    assert {k: got[k]["regions"] for k in got} == {"small": 3, "medium": 1, "large": 2}
    bounds = {"small": lambda a: a < 3.2, "medium": lambda a: 3.2 <= a < 32, "large": lambda a: a >= 32}
    normal = maps[~masks]
    threshold = np.quantile(normal, 0.99, method="higher")
    for name, keep in bounds.items():
        assert got[name]["aupro"] == pytest.approx(_slow_stratum_aupro(masks, maps, keep), abs=1e-9), name
        inside = np.zeros_like(masks)
        for i, m in enumerate(masks):
            lab, n = ndimage.label(m, structure=np.ones((3, 3), dtype=bool))
            for r in range(1, n + 1):
                if keep(int((lab == r).sum())):
                    inside[i] |= lab == r
        assert got[name]["pixel_recall"] == pytest.approx(np.mean(maps[inside] > threshold)), name
    # one stratum only: its AUPRO is the ordinary AUPRO
    only_small = masks & False
    only_small[1, 5:6, 5:8] = only_small[4, 33:35, 33:34] = True
    small_doc = defect_size_metrics(only_small, maps, cats)["per_class"]["a"]
    assert small_doc["small"]["aupro"] == pytest.approx(aupro(only_small, maps))
    assert math.isnan(small_doc["large"]["aupro"]) and small_doc["large"]["regions"] == 0


def test_defect_size_mean_skips_classes_without_the_stratum_and_refuses_bad_bounds() -> None:
    from vpdm.evaluation.metrics import defect_size_metrics

    rng = np.random.default_rng(1)
    masks = np.zeros((4, 40, 40), dtype=bool)
    masks[1, 2:12, 2:12] = True  # class a: large only (100 of 1600 pixels)
    masks[3, 5, 5] = True  # class b: small only (1 pixel)
    maps = rng.normal(size=masks.shape) + masks
    doc = defect_size_metrics(masks, maps, ["a", "a", "b", "b"])
    assert doc["mean"]["large"]["aupro"] == doc["per_class"]["a"]["large"]["aupro"]
    assert doc["mean"]["small"]["pixel_recall"] == doc["per_class"]["b"]["small"]["pixel_recall"]
    assert doc["mean"]["small"]["regions"] == 1 and math.isnan(doc["mean"]["medium"]["aupro"])
    with pytest.raises(ConfigError, match="bounds"):
        defect_size_metrics(masks, maps, ["a"] * 4, bounds=(0.1, 0.01))
    with pytest.raises(DataError, match="categories"):
        defect_size_metrics(masks, maps, ["a"])
