"""Figures for inspecting anomaly maps and ROC curves.

matplotlib is imported inside the functions, and only its object-oriented Agg API is used (no
pyplot, no global backend switch), so ``import vpdm`` stays light and plotting works headless
and from worker threads. :func:`overlay_array` needs numpy only.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from vpdm.errors import DataError

__all__ = ["overlay_array", "save_overlay", "save_roc_curves", "OVERLAY_ALPHA"]

OVERLAY_ALPHA = 0.5
_DPI = 100

# matplotlib's "jet" segment data, so overlay_array matches the figures without matplotlib.
_JET: tuple[tuple[tuple[float, float], ...], ...] = (
    ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
)


def _image(image_rgb_uint8: Any) -> npt.NDArray[np.uint8]:
    img = np.asarray(image_rgb_uint8)
    if img.ndim != 3 or img.shape[2] != 3:
        raise DataError(f"image has shape {img.shape}; expected H x W x 3 (RGB)")
    if img.dtype != np.uint8:
        raise DataError(f"image has dtype {img.dtype}; expected uint8 (0-255)")
    return img


def _map(anomaly_map: Any, shape: tuple[int, ...]) -> npt.NDArray[np.float64]:
    amap = np.asarray(anomaly_map, dtype=np.float64)
    if amap.ndim == 3 and amap.shape[0] == 1:
        amap = amap[0]
    if amap.shape != tuple(shape[:2]):
        raise DataError(
            f"anomaly map has shape {amap.shape}; expected {tuple(shape[:2])} like the image "
            "(resize the map to the image first)"
        )
    return amap


def _normalise(amap: npt.NDArray[np.float64], vmax: float | None) -> tuple[npt.NDArray[np.float64], float, float]:
    """Scale to [0, 1]: to [0, vmax] when given (comparable across images), else the map's own range."""
    finite = amap[np.isfinite(amap)]
    if vmax is not None:
        lo, hi = 0.0, float(vmax)
        if not hi > 0.0:
            raise DataError(f"vmax={vmax!r}; expected a positive number")
    elif finite.size:
        lo, hi = float(finite.min()), float(finite.max())
    else:
        lo, hi = 0.0, 1.0
    span = hi - lo if hi > lo else 1.0
    norm = np.clip((np.nan_to_num(amap, nan=lo) - lo) / span, 0.0, 1.0)
    return norm, lo, lo + span


def _jet(norm: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    out = np.empty(norm.shape + (3,), dtype=np.float64)
    for c, segments in enumerate(_JET):
        xs, ys = zip(*segments)
        out[..., c] = np.interp(norm, xs, ys)
    return out


def overlay_array(image_rgb_uint8: Any, anomaly_map: Any, vmax: float | None = None) -> npt.NDArray[np.uint8]:
    """H x W x 3 uint8 blend of the image and the jet-coloured map (alpha 0.5), for plain PNGs.

    The map is scaled to [0, vmax] if ``vmax`` is given, otherwise to its own min..max.
    """
    img = _image(image_rgb_uint8)
    norm, _, _ = _normalise(_map(anomaly_map, img.shape), vmax)
    blend = (1.0 - OVERLAY_ALPHA) * img.astype(np.float64) + OVERLAY_ALPHA * 255.0 * _jet(norm)
    return np.clip(np.rint(blend), 0, 255).astype(np.uint8)


def _new_figure(width_in: float, height_in: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _prepare(path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def save_overlay(
    image_rgb_uint8: Any,
    anomaly_map: Any,
    path: str | Path,
    mask: Any | None = None,
    score: float | None = None,
    vmax: float | None = None,
) -> Path:
    """Save image | heat-map overlay side by side, with the GT outline on the overlay if given.

    The PNG is ``800 x 440`` pixels (fixed size, no tight bbox, so batches tile cleanly).
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    img = _image(image_rgb_uint8)
    amap = _map(anomaly_map, img.shape)
    _, lo, hi = _normalise(amap, vmax)
    fig = _new_figure(8.0, 4.4)
    ax_img, ax_ovl = fig.subplots(1, 2)
    ax_img.imshow(img)
    ax_img.set_title("image")
    ax_ovl.imshow(overlay_array(img, amap, vmax))
    ax_ovl.set_title("anomaly map")
    if mask is not None:
        m = np.asarray(mask)
        if m.ndim == 3 and m.shape[0] == 1:
            m = m[0]
        if m.shape != img.shape[:2]:
            raise DataError(f"mask has shape {m.shape}; expected {img.shape[:2]} like the image")
        if m.any():
            ax_ovl.contour(m > 0, levels=[0.5], colors="white", linewidths=1.0)
    for ax in (ax_img, ax_ovl):
        ax.set_axis_off()
    mappable = ScalarMappable(norm=Normalize(vmin=lo, vmax=hi), cmap=colormaps["jet"])
    fig.colorbar(mappable, ax=ax_ovl, fraction=0.046, pad=0.02)
    if score is not None:
        fig.suptitle(f"score = {score:.4g}")
    out = _prepare(path)
    fig.savefig(out, format="png", dpi=_DPI)
    return out


def save_roc_curves(
    per_class: Mapping[str, tuple[Any, Any]],
    path: str | Path,
    title: str = "Image ROC",
) -> Path:
    """Save one ROC curve per class with its AUROC in the legend (600 x 600 px PNG).

    A class whose labels take one value has no ROC; it is listed in the legend as "n/a".
    """
    from vpdm.evaluation.metrics import _image_inputs, _roc_points, _trapezoid

    fig = _new_figure(6.0, 6.0)
    ax = fig.subplots()
    for name, (labels, scores) in per_class.items():
        ranked = _image_inputs(labels, scores)
        if ranked.n_pos == 0 or ranked.n_neg == 0:
            ax.plot([], [], label=f"{name} (AUROC n/a: one label value)")
            continue
        fpr, tpr = _roc_points(ranked)
        auc = _trapezoid(fpr, tpr)
        ax.plot(fpr, tpr, linewidth=1.2, label=f"{name} (AUROC {auc:.3f})")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=0.8)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)  # keep a perfect curve visible above the frame
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    if per_class:
        ax.legend(loc="lower right", fontsize="small", ncol=1 if len(per_class) <= 12 else 2)
    fig.tight_layout()
    out = _prepare(path)
    fig.savefig(out, format="png", dpi=_DPI)
    return out
