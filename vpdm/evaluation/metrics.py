"""Anomaly-detection metrics with the definitions of anomalib / the MVTec AD benchmark.

All curves are exact (one point per distinct score, ties as in scikit-learn), built from a
value-only sort of the negatives and an argsort of the positives, so ~15 M pixels take well under
a second per metric on a CPU, without sklearn. Counts accumulate in int64/float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from vpdm.errors import ConfigError, DataError

__all__ = [
    "image_auroc",
    "pixel_auroc",
    "pixel_ap",
    "image_f1_max",
    "aupro",
    "compute_metrics",
    "roc_curve",
    "pro_curve",
    "METRIC_KEYS",
    "IMAGE_METRICS",
    "PIXEL_METRICS",
]

IMAGE_METRICS: tuple[str, ...] = ("image_auroc", "image_f1_max")
PIXEL_METRICS: tuple[str, ...] = ("pixel_auroc", "aupro", "pixel_ap")
METRIC_KEYS: tuple[str, ...] = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "image_f1_max")

FloatArray = npt.NDArray[np.float64]


# ----------------------------------------------------------------------------- input checks


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """Accept numpy arrays, torch tensors and sequences; torch stays an optional import."""
    if x is None:
        raise DataError(f"{name} is None; expected an array")
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _scores(x: Any, name: str) -> np.ndarray:
    """Flatten scores to float32/float64 (kept as given: float32 sorts twice as fast)."""
    arr = _to_numpy(x, name)
    if arr.dtype not in (np.float32, np.float64):
        if arr.dtype.kind not in "biuf":
            raise DataError(f"{name} has dtype {arr.dtype}; expected real numbers")
        arr = arr.astype(np.float64)
    arr = arr.reshape(-1)
    if np.isnan(arr).any():
        raise DataError(f"{name} contains NaN; expected finite scores")
    return arr


def _binary(x: Any, name: str) -> npt.NDArray[np.bool_]:
    """Flatten 0/1 labels or masks to bool, refusing e.g. 0/255 masks instead of guessing."""
    arr = _to_numpy(x, name)
    if arr.dtype == np.bool_:
        return arr.reshape(-1)
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{name} has dtype {arr.dtype}; expected 0/1 values or bool")
    flat = arr.reshape(-1)
    if not ((flat == 0) | (flat == 1)).all():
        bad = flat[(flat != 0) & (flat != 1)][:5]
        raise DataError(f"{name} contains values {bad.tolist()}; expected only 0 and 1 (divide 0/255 masks by 255)")
    return flat == 1


def _pixel_stack(x: Any, name: str) -> np.ndarray:
    """Bring N x H x W or N x 1 x H x W to N x H x W."""
    arr = _to_numpy(x, name)
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 3:
        raise DataError(f"{name} has shape {tuple(arr.shape)}; expected N x H x W or N x 1 x H x W")
    return arr


def _same_size(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise DataError(
            f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}; expected the same shape"
        )


# ----------------------------------------------------------------------------- ranking core


@dataclass(frozen=True)
class _Ranked:
    """Counts at each distinct score of the positives, t_0 > t_1 > ... (descending).

    Every curve used here (ROC, PR, PRO) only bends at positive scores: between two of them only
    negatives are passed, which moves the ROC/PRO curve horizontally and only lowers precision.
    So ``tps`` (#pos >= t_k) with ``fps_ge`` (#neg >= t_k) and ``fps_gt`` (#neg > t_k) give the
    same areas as sklearn's one-point-per-distinct-score curves, ties included, while only the
    negatives' *values* need sorting (fast) and only the few positives need an argsort.
    """

    n_pos: int
    n_neg: int
    tps: npt.NDArray[np.int64]
    fps_ge: npt.NDArray[np.int64]
    fps_gt: npt.NDArray[np.int64]
    pos_order: npt.NDArray[np.intp]  # positives by descending score
    pos_ends: npt.NDArray[np.intp]  # last index (in pos_order) of each tie group

    def cumulative(self, pos_weights: np.ndarray) -> FloatArray:
        """Sum of per-positive ``pos_weights`` over positives scoring >= each t_k (float64)."""
        return np.cumsum(pos_weights[self.pos_order], dtype=np.float64)[self.pos_ends]

    def corners(self, pos_values: FloatArray, pos_end: float) -> tuple[FloatArray, FloatArray]:
        """Curve (#neg passed, value) from (0, 0): a horizontal step to (fps_gt[k], value[k-1]),
        then a (possibly diagonal) step to (fps_ge[k], value[k]); ends at (n_neg, pos_end)."""
        k = pos_values.size
        x = np.empty(2 * k + 2, dtype=np.float64)
        y = np.empty(2 * k + 2, dtype=np.float64)
        x[0] = y[0] = 0.0
        x[1:-1:2], x[2:-1:2] = self.fps_gt, self.fps_ge
        y[1:-1:2] = np.concatenate(([0.0], pos_values[:-1]))
        y[2:-1:2] = pos_values
        x[-1], y[-1] = self.n_neg, pos_end
        return x, y


def _rank(y: npt.NDArray[np.bool_], s: np.ndarray) -> _Ranked:
    if y.size != s.size:
        raise DataError(f"got {y.size} labels but {s.size} scores; expected the same number")
    if y.size == 0:
        raise DataError("got 0 samples; expected at least one")
    pos, neg = s[y], np.sort(s[~y])
    pos_order = np.argsort(pos)[::-1]  # descending; order within ties is irrelevant
    pos_sorted = pos[pos_order]
    pos_ends = np.append(np.flatnonzero(pos_sorted[1:] != pos_sorted[:-1]), pos.size - 1)
    if pos.size == 0:
        pos_ends = pos_ends[:0]
    t_asc = pos_sorted[pos_ends][::-1]  # ascending needles let searchsorted reuse its bounds
    fps_ge = (neg.size - np.searchsorted(neg, t_asc, side="left"))[::-1].astype(np.int64)
    fps_gt = (neg.size - np.searchsorted(neg, t_asc, side="right"))[::-1].astype(np.int64)
    return _Ranked(
        n_pos=int(pos.size),
        n_neg=int(neg.size),
        tps=pos_ends.astype(np.int64) + 1,
        fps_ge=fps_ge,
        fps_gt=fps_gt,
        pos_order=pos_order,
        pos_ends=pos_ends,
    )


def _trapezoid(x: FloatArray, y: FloatArray) -> float:
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0)


def _need(ranked: _Ranked, what: str, pos: bool = True, neg: bool = True) -> None:
    if pos and ranked.n_pos == 0:
        raise DataError(f"{what} is undefined: the ground truth has no positive (anomalous) entries")
    if neg and ranked.n_neg == 0:
        raise DataError(f"{what} is undefined: the ground truth has no negative (normal) entries")


def _roc_points(r: _Ranked) -> tuple[FloatArray, FloatArray]:
    _need(r, "AUROC")
    x, y = r.corners(r.tps / r.n_pos, 1.0)
    return x / r.n_neg, y


def _auroc(r: _Ranked) -> float:
    return _trapezoid(*_roc_points(r))


def _ap(r: _Ranked) -> float:
    """Step-wise AP, sum_k (R_k - R_{k-1}) P_k, as sklearn.average_precision_score."""
    _need(r, "average precision", neg=False)
    precision = r.tps / (r.tps + r.fps_ge)
    recall = r.tps / r.n_pos
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def _f1_max(r: _Ranked) -> float:
    _need(r, "F1 max", neg=False)
    precision = r.tps / (r.tps + r.fps_ge)
    recall = r.tps / r.n_pos
    return float(np.max(2 * precision * recall / (precision + recall)))  # recall > 0 at every t_k


def _region_weights(masks: npt.NDArray[np.bool_]) -> tuple[FloatArray, int]:
    """1/|region| on every GT pixel (in mask order), regions = 8-connected components per image."""
    from scipy import ndimage  # lazy: only AUPRO needs scipy

    structure = np.ones((3, 3), dtype=bool)  # 8-connectivity, as MVTec's reference code
    parts: list[FloatArray] = []
    n_regions = 0
    for m in masks:
        if not m.any():
            continue
        labeled, n = ndimage.label(m, structure=structure)
        sizes = np.bincount(labeled.ravel())
        parts.append(1.0 / sizes[labeled[m]])  # row-major, same order as masks.reshape(-1)
        n_regions += n
    return np.concatenate(parts), n_regions


def _pro_points(r: _Ranked, masks: npt.NDArray[np.bool_]) -> tuple[FloatArray, FloatArray]:
    _need(r, "AUPRO")
    weights, n_regions = _region_weights(masks)
    pro = np.minimum(r.cumulative(weights) / n_regions, 1.0)  # rounding may overshoot by an ulp
    x, y = r.corners(pro, 1.0)
    return x / r.n_neg, y


def _check_limit(fpr_limit: float) -> float:
    if not isinstance(fpr_limit, (int, float)) or not 0.0 < float(fpr_limit) <= 1.0:
        raise ConfigError(f"fpr_limit={fpr_limit!r}; expected a number in (0, 1]")
    return float(fpr_limit)


def _area_up_to(fpr: FloatArray, pro: FloatArray, limit: float) -> float:
    """Trapezoid area for fpr <= limit, closing the curve with a point interpolated at limit."""
    cut = int(np.searchsorted(fpr, limit, side="right"))  # fpr is non-decreasing
    x, y = fpr[:cut], pro[:cut]
    if cut < fpr.size:
        x0, x1, y0, y1 = fpr[cut - 1], fpr[cut], pro[cut - 1], pro[cut]
        y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        x, y = np.append(x, limit), np.append(y, y_lim)
    return _trapezoid(x, y)


def _aupro(r: _Ranked, masks: npt.NDArray[np.bool_], fpr_limit: float) -> float:
    fpr, pro = _pro_points(r, masks)
    return _area_up_to(fpr, pro, fpr_limit) / fpr_limit


# ----------------------------------------------------------------------------- public API


def _image_inputs(labels: Any, scores: Any) -> _Ranked:
    y = _binary(labels, "labels")
    s = _scores(scores, "scores")
    return _rank(y, s)


def _pixel_inputs(masks: Any, maps: Any) -> tuple[_Ranked, npt.NDArray[np.bool_]]:
    m = _pixel_stack(masks, "masks")
    a = _pixel_stack(maps, "maps")
    _same_size(m, a, "masks", "maps")
    mb = _binary(m, "masks").reshape(m.shape)
    return _rank(mb.reshape(-1), _scores(a, "maps")), mb


def image_auroc(labels: Any, scores: Any) -> float:
    """Image-level AUROC (labels: 1 = anomalous). Equals sklearn.roc_auc_score, ties included."""
    return _auroc(_image_inputs(labels, scores))


def pixel_auroc(masks: Any, maps: Any) -> float:
    """Pixel-level AUROC over all pixels of all images (anomalib pixel_AUROC)."""
    return _auroc(_pixel_inputs(masks, maps)[0])


def pixel_ap(masks: Any, maps: Any) -> float:
    """Pixel-level average precision, as sklearn.average_precision_score."""
    return _ap(_pixel_inputs(masks, maps)[0])


def image_f1_max(labels: Any, scores: Any) -> float:
    """Best image-level F1 over all thresholds (anomalib F1Max)."""
    return _f1_max(_image_inputs(labels, scores))


def aupro(masks: Any, maps: Any, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, divided by it (MVTec AUPRO).

    PRO(t) is the mean over ground-truth regions (8-connected components of each mask) of the
    fraction of the region scoring >= t; FPR(t) is over all normal pixels. The curve has one point
    per distinct score, as in MVTec's reference code, so a perfect map scores 1.0.
    """
    limit = _check_limit(fpr_limit)
    ranked, m = _pixel_inputs(masks, maps)
    return _aupro(ranked, m, limit)


def roc_curve(labels: Any, scores: Any) -> tuple[FloatArray, FloatArray]:
    """(fpr, tpr) from (0, 0) to (1, 1); the trapezoid area under it is :func:`image_auroc`."""
    return _roc_points(_image_inputs(labels, scores))


def pro_curve(masks: Any, maps: Any) -> tuple[FloatArray, FloatArray]:
    """(fpr, pro) points of the full PRO curve, from (0, 0) to (1, 1)."""
    ranked, m = _pixel_inputs(masks, maps)
    return _pro_points(ranked, m)


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(sum(finite) / len(finite)) if finite else math.nan


def compute_metrics(
    labels: Any,
    scores: Any,
    masks: Any,
    maps: Any,
    categories: Sequence[str],
    fpr_limit: float = 0.3,
    pixel_known: Sequence[bool] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per-class and mean-over-classes metrics, the way MVTec / VisA results are reported.

    Returns ``{"per_class": {cat: {metric: value}}, "mean": {metric: value}}`` with the keys of
    ``METRIC_KEYS``. Image metrics are NaN for a class whose labels take one value only, pixel
    metrics are NaN for a class without anomalous (or without normal) pixels, and when ``masks``
    and ``maps`` are None; the mean skips NaN. Classes are reported in sorted order.
    ``pixel_known`` (one bool per image) leaves the images whose mask is unknown out of the pixel
    metrics; they still count in the image metrics.
    """
    limit = _check_limit(fpr_limit)
    y = _binary(labels, "labels")
    s = _scores(scores, "scores")
    cats = np.asarray([str(c) for c in categories])
    n = len(cats)
    if y.size != n or s.size != n:
        raise DataError(f"got {y.size} labels, {s.size} scores and {n} categories; expected one of each per image")
    pixel = masks is not None or maps is not None
    if pixel:
        m = _pixel_stack(masks, "masks")
        a = _pixel_stack(maps, "maps")
        _same_size(m, a, "masks", "maps")
        if m.shape[0] != n:
            raise DataError(f"got {m.shape[0]} masks/maps but {n} labels; expected one per image")
        mb = _binary(m, "masks").reshape(m.shape)
        a_flat = _scores(a, "maps").reshape(a.shape)
    known = np.ones(n, dtype=bool) if pixel_known is None else np.asarray(pixel_known, dtype=bool).reshape(-1)
    if known.size != n:
        raise DataError(f"got {known.size} pixel_known flags but {n} labels; expected one per image")

    per_class: dict[str, dict[str, float]] = {}
    for cat in sorted(set(cats.tolist())):
        idx = np.flatnonzero(cats == cat)
        res = dict.fromkeys(METRIC_KEYS, math.nan)
        yc = y[idx]
        if yc.any() and not yc.all():
            r = _rank(yc, s[idx])
            res["image_auroc"] = _auroc(r)
            res["image_f1_max"] = _f1_max(r)
        pix = idx[known[idx]]
        if pixel and pix.size:
            mc = mb[pix]
            n_pos = int(np.count_nonzero(mc))
            if 0 < n_pos < mc.size:
                r = _rank(mc.reshape(-1), a_flat[pix].reshape(-1))  # one sort for all three
                res["pixel_auroc"] = _auroc(r)
                res["pixel_ap"] = _ap(r)
                res["aupro"] = _aupro(r, mc, limit)
        per_class[cat] = res
    mean = {k: _nanmean([res[k] for res in per_class.values()]) for k in METRIC_KEYS}
    return {"per_class": per_class, "mean": mean}


DECISION_KEYS = ("image_precision", "image_recall", "image_f1", "image_false_alarm_rate")


def decision_metrics(labels: Any, predicted: Any, categories: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Precision, recall, F1 and false-alarm rate of 0/1 decisions, per class and their mean over classes.

    Same shape as :func:`compute_metrics` (keys ``DECISION_KEYS``). Precision and F1 are 0 when nothing
    is predicted anomalous (sklearn's ``zero_division=0``); recall is NaN for a class without anomalous
    images and the false-alarm rate (FP / (FP + TN)) NaN for one without normal images; the mean skips NaN.
    """
    y = _binary(labels, "labels")
    p = _binary(predicted, "predicted labels")
    cats = np.asarray([str(c) for c in categories])
    if y.size != cats.size or p.size != cats.size:
        raise DataError(
            f"got {y.size} labels, {p.size} decisions and {cats.size} categories; expected one of each per image"
        )
    per_class: dict[str, dict[str, float]] = {}
    for cat in sorted(set(cats.tolist())):
        idx = cats == cat
        yc, pc = y[idx], p[idx]
        tp = int(np.count_nonzero(yc & pc))
        fp = int(np.count_nonzero(~yc & pc))
        fn = int(np.count_nonzero(yc & ~pc))
        tn = int(np.count_nonzero(~yc & ~pc))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else math.nan
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
        far = fp / (fp + tn) if fp + tn else math.nan
        per_class[cat] = {
            "image_precision": precision,
            "image_recall": recall,
            "image_f1": f1,
            "image_false_alarm_rate": far,
        }
    mean = {k: _nanmean([res[k] for res in per_class.values()]) for k in DECISION_KEYS}
    return {"per_class": per_class, "mean": mean}


# ----------------------------------------------------------------------------- metrics by defect size

# Region area as a fraction of the image: below 0.2 % "small" (under 100 pixels at 224 x 224: pits,
# pin-holes, thin scratches of a few pixels), up to 2 % "medium", above "large".
DEFECT_SIZE_BOUNDS: tuple[float, float] = (0.002, 0.02)
DEFECT_SIZES: tuple[str, ...] = ("small", "medium", "large")


def region_sizes(masks: Any) -> tuple[npt.NDArray[np.intp], list[npt.NDArray[np.int64]]]:
    """8-connected ground-truth regions of each mask (as AUPRO counts them): the label image of every
    mask (N x H x W, 0 = normal) and, per image, each region's area in pixels (index = label - 1)."""
    from scipy import ndimage

    m = _binary(_pixel_stack(masks, "masks"), "masks").reshape(np.shape(masks))
    labels = np.zeros(m.shape, dtype=np.intp)
    areas: list[npt.NDArray[np.int64]] = []
    for i, mask in enumerate(m):
        if mask.any():
            labels[i], n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
            areas.append(np.bincount(labels[i].ravel(), minlength=n + 1)[1:].astype(np.int64))
        else:
            areas.append(np.zeros(0, dtype=np.int64))
    return labels, areas


def defect_size_metrics(
    masks: Any,
    maps: Any,
    categories: Sequence[str],
    bounds: tuple[float, float] = DEFECT_SIZE_BOUNDS,
    fpr_limit: float = 0.3,
    recall_fpr: float = 0.01,
) -> dict[str, Any]:
    """What a detector finds of small, medium and large defects, per class and as the mean over classes.

    Each ground-truth region (8-connected, as AUPRO) falls in a size stratum by its area over the image
    area (``bounds``: small below the first, large above the second). Per class and stratum:

    * ``aupro``: AUPRO (up to ``fpr_limit``) with the PRO averaged over that stratum's regions only; the
      FPR is over the class's normal pixels, as for the full AUPRO;
    * ``pixel_recall``: the fraction of that stratum's defect pixels above the threshold that lets
      ``recall_fpr`` of the class's normal pixels through (the same false-alarm budget for every
      detector, whatever the scale of its map);
    * ``regions``: how many regions the figures rest on.

    The mean skips classes without regions of that stratum (``regions`` is the total).
    """
    limit = _check_limit(fpr_limit)
    if not (isinstance(bounds, (tuple, list)) and len(bounds) == 2 and 0 < bounds[0] < bounds[1] < 1):
        raise ConfigError(f"defect size bounds must be two increasing fractions of the image in (0, 1), got {bounds!r}")
    if not 0 < recall_fpr < 1:
        raise ConfigError(f"recall_fpr must be in (0, 1), got {recall_fpr!r}")
    m = _binary(_pixel_stack(masks, "masks"), "masks").reshape(np.shape(masks))
    a = _scores(_pixel_stack(maps, "maps"), "maps").reshape(np.shape(maps))
    _same_size(m, a, "masks", "maps")
    cats = np.asarray([str(c) for c in categories])
    if cats.size != m.shape[0]:
        raise DataError(f"got {m.shape[0]} masks/maps but {cats.size} categories; expected one per image")
    labels, areas = region_sizes(m)
    image_area = float(m.shape[1] * m.shape[2])
    # stratum of every defect pixel: 0 normal, 1 small, 2 medium, 3 large
    stratum = np.zeros(m.shape, dtype=np.int8)
    region_strata = [1 + np.searchsorted(np.asarray(bounds) * image_area, r, side="right") for r in areas]
    for i, strata in enumerate(region_strata):
        if strata.size:
            stratum[i] = np.concatenate(([0], strata))[labels[i]]
    per_class: dict[str, dict[str, dict[str, float]]] = {}
    for cat in sorted(set(cats.tolist())):
        idx = np.flatnonzero(cats == cat)
        s_c, a_c, m_c = stratum[idx], a[idx], m[idx]
        normal = a_c[~m_c]
        rows: dict[str, dict[str, float]] = {}
        threshold = np.quantile(normal, 1.0 - recall_fpr, method="higher") if normal.size else math.nan
        for k, name in enumerate(DEFECT_SIZES, start=1):
            inside = s_c == k
            n_regions = int(sum(np.count_nonzero(region_strata[i] == k) for i in idx))
            row = {"regions": n_regions, "aupro": math.nan, "pixel_recall": math.nan}
            if n_regions and normal.size:
                keep = inside | ~m_c  # this stratum's defect pixels and every normal pixel
                r = _rank(inside[keep], a_c[keep])
                row["aupro"] = _aupro(r, inside, limit)
                row["pixel_recall"] = float(np.mean(a_c[inside] > threshold))
            rows[name] = row
        per_class[cat] = rows
    mean = {
        name: {
            "regions": sum(per_class[c][name]["regions"] for c in per_class),
            "aupro": _nanmean([per_class[c][name]["aupro"] for c in per_class]),
            "pixel_recall": _nanmean([per_class[c][name]["pixel_recall"] for c in per_class]),
        }
        for name in DEFECT_SIZES
    }
    return {"bounds": list(bounds), "fpr_limit": limit, "recall_fpr": recall_fpr, "per_class": per_class, "mean": mean}
