"""From raw scores to decisions: calibrated thresholds, normalised scores, labels and masks.

The counterpart of anomalib's ``PostProcessor``. A model gives a raw image ``score`` and a float
``anomaly_map`` per image; a production line needs a good/defective decision. Here:

* **thresholds** are calibrated on *normal* images only (a held-out part of ``train/good``, or
  ``vpdm calibrate``): per class, the image threshold is the ``1 - false_alarm_rate`` quantile of the
  held-out images' scores and the pixel threshold the same quantile of all their map pixels
  (:func:`quantile_threshold`: numpy's quantile, method ``"higher"``, so the threshold is always an
  observed score; with fewer than ``1 / false_alarm_rate + 1`` images it is their maximum);
* **normalisation** (:func:`normalise`) is anomalib's min-max normalisation around the threshold:
  ``pred_score = clip((score - threshold) / (max - min) + 0.5, 0, 1)`` with ``min``/``max`` the
  calibration images' score range: monotone, the threshold maps to 0.5, clipped to [0, 1];
* **decisions**: ``pred_label = score > image_threshold`` (the same as ``pred_score > 0.5`` below
  the clip), ``pred_mask = anomaly_map > pixel_threshold``;
* **the class of an image** (thresholds are per class): the caller's label if given, otherwise the
  class whose calibration images' mean prototype-assignment histogram is nearest by cosine
  (:func:`nearest_class`; the histograms come from :mod:`vpdm.calibration`).

Everything is stored in the checkpoint as plain containers (:meth:`Calibration.to_payload`), so a
checkpoint still loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vpdm.errors import CheckpointError, ConfigError

__all__ = ["Calibration", "ClassThresholds", "Decisions", "PostProcessor", "check_threshold", "nearest_class",
           "normalise", "not_calibrated_message", "quantile_threshold"]

QUANTILE_METHOD = "higher"  # numpy's quantile method: the threshold is always one of the observed scores


def quantile_threshold(values: np.ndarray | Tensor | Sequence[float], false_alarm_rate: float) -> float:
    """The ``1 - false_alarm_rate`` quantile of normal ``values`` (numpy, method ``"higher"``).

    At most a fraction ``false_alarm_rate`` of the values is strictly above it. With ``n`` values and
    ``(1 - rate) * (n - 1) > n - 2`` (fewer than ``1 / rate + 1`` values) it is their maximum.
    """
    if not (isinstance(false_alarm_rate, (int, float)) and not isinstance(false_alarm_rate, bool)
            and math.isfinite(false_alarm_rate) and 0 <= false_alarm_rate < 1):
        raise ConfigError(f"false alarm rate must be a number in [0, 1), got {false_alarm_rate!r}")
    array = values.detach().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values)
    array = array.astype(np.float64, copy=False).ravel()
    if array.size == 0:
        raise ConfigError("cannot calibrate a threshold on no scores")
    if not np.isfinite(array).all():
        raise ConfigError("cannot calibrate a threshold: the calibration scores contain NaN or infinity")
    return float(np.quantile(array, 1.0 - false_alarm_rate, method=QUANTILE_METHOD))


def normalise(scores: np.ndarray | Tensor | float, threshold: float, low: float, high: float) -> Any:
    """anomalib's min-max normalisation around ``threshold``: ``clip((s - t) / (high - low) + 0.5, 0, 1)``.

    Monotone non-decreasing in ``s`` and ``threshold`` maps to 0.5. ``high - low`` is the score range
    of the calibration images; when it is not positive (one image, or all equal) the scale is
    ``|threshold|`` (or 1 for a zero threshold), so the function stays defined and monotone.
    Tensors stay tensors, arrays and floats become float64 arrays / floats.
    """
    scale = float(high) - float(low)
    if not (scale > 0 and math.isfinite(scale)):
        scale = abs(float(threshold)) or 1.0
    if isinstance(scores, Tensor):
        return ((scores.double() - threshold) / scale + 0.5).clamp(0.0, 1.0)
    out = np.clip((np.asarray(scores, dtype=np.float64) - threshold) / scale + 0.5, 0.0, 1.0)
    return float(out) if out.ndim == 0 else out


def check_threshold(value: Any, name: str) -> float | None:
    """A threshold override: None (use the calibrated one) or a finite real number; ConfigError naming ``name``.

    Scores and map values are distances (>= 0), so a negative threshold would flag every image: refused.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def not_calibrated_message(checkpoint: str) -> str:
    return (f"checkpoint {checkpoint!r} has no calibrated thresholds (it predates them, or was trained with "
            f"train.calibration_fraction=0); make them from normal images with: vpdm calibrate --checkpoint "
            f"{checkpoint} --data SPEC (train/good of SPEC is used), or pass --image-threshold/--pixel-threshold")


@dataclass(frozen=True)
class ClassThresholds:
    """One class's calibration: thresholds and the score ranges the normalisation divides by."""

    image_threshold: float
    pixel_threshold: float
    image_min: float
    image_max: float
    pixel_min: float
    pixel_max: float
    num_images: int

    @classmethod
    def from_scores(cls, scores: np.ndarray | Tensor, maps: np.ndarray | Tensor, false_alarm_rate: float) -> ClassThresholds:
        """Thresholds of one class from its normal calibration images' scores (N,) and maps (N x H x W)."""
        s = np.asarray(scores.detach().cpu() if isinstance(scores, Tensor) else scores, dtype=np.float64).ravel()
        m = np.asarray(maps.detach().cpu() if isinstance(maps, Tensor) else maps, dtype=np.float64).ravel()
        return cls(image_threshold=quantile_threshold(s, false_alarm_rate),
                   pixel_threshold=quantile_threshold(m, false_alarm_rate),
                   image_min=float(s.min()), image_max=float(s.max()),
                   pixel_min=float(m.min()), pixel_max=float(m.max()), num_images=int(s.size))


@dataclass
class Calibration:
    """Per-class thresholds plus what picks the class of an unlabelled image."""

    false_alarm_rate: float
    classes: dict[str, ClassThresholds]
    # Mean prototype-assignment histogram (K,) of each class's calibration images (nearest_class).
    histograms: dict[str, Tensor] = field(default_factory=dict)
    source: str = ""  # how it was made: "train holdout 10%", "vpdm calibrate --data ...", for the record
    # The sampling and scoring settings the scores were made with: thresholds hold for those only.
    settings: dict[str, Any] = field(default_factory=dict)

    def to_payload(self) -> dict[str, Any]:
        """Plain containers and tensors (``torch.load(weights_only=True)`` reads them)."""
        return {
            "false_alarm_rate": float(self.false_alarm_rate),
            "class_rule": "cosine to the mean prototype-assignment histogram",
            "source": self.source,
            "classes": {c: {k: (int(v) if k == "num_images" else float(v)) for k, v in vars(t).items()}
                        for c, t in self.classes.items()},
            "histograms": {c: h.detach().cpu().float().clone() for c, h in self.histograms.items()},
            "settings": dict(self.settings),
        }

    @classmethod
    def from_payload(cls, data: Any, where: str = "checkpoint") -> Calibration:
        try:
            classes = {str(c): ClassThresholds(**{k: v for k, v in t.items()}) for c, t in data["classes"].items()}
            histograms = {str(c): torch.as_tensor(h, dtype=torch.float32) for c, h in (data.get("histograms") or {}).items()}
            return cls(float(data["false_alarm_rate"]), classes, histograms, str(data.get("source", "")),
                       dict(data.get("settings") or {}))
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise CheckpointError(f"{where} holds a damaged calibration ({type(exc).__name__}: {exc})") from None


def settings_of(config: Any) -> dict[str, Any]:
    """The settings a calibration depends on (sampling and scoring), as plain dicts."""
    from vpdm.config import to_dict

    return {"sampling": to_dict(config.sampling), "scoring": to_dict(config.scoring)}


def settings_differ(calibration: Calibration | None, config: Any) -> list[str]:
    """Settings (``section.key``) that differ from those the thresholds were calibrated with."""
    if calibration is None or not calibration.settings:
        return []
    now = settings_of(config)
    return [f"{sec}.{k}" for sec in ("sampling", "scoring") for k in now[sec]
            if k in calibration.settings.get(sec, {}) and calibration.settings[sec][k] != now[sec][k]]


def nearest_class(histograms: Tensor, prototypes: Mapping[str, Tensor]) -> list[str]:
    """For each row of ``histograms`` (B x K), the class whose mean histogram is nearest by cosine."""
    if not prototypes:
        raise ConfigError("no class histograms to pick a class from")
    names = list(prototypes)
    table = torch.stack([prototypes[n].float() for n in names])  # C x K
    sims = torch.nn.functional.cosine_similarity(histograms.float().unsqueeze(1), table.unsqueeze(0), dim=-1)
    return [names[i] for i in sims.argmax(dim=1).tolist()]


@dataclass
class Decisions:
    """The answer for a batch: class used, normalised score, label and binary mask per image."""

    category: list[str]
    pred_score: np.ndarray  # (B,) float64 in [0, 1]
    pred_label: np.ndarray  # (B,) int64 0/1
    pred_mask: np.ndarray  # (B, H, W) bool
    image_threshold: np.ndarray  # (B,) the threshold used for each image
    pixel_threshold: np.ndarray  # (B,)


class PostProcessor:
    """Applies a :class:`Calibration` (or threshold overrides) to raw scores and maps.

    ``image_threshold`` / ``pixel_threshold`` replace the calibrated thresholds of every class (the
    calibrated score range is still the normalisation's scale; without a calibration the scale is
    ``|threshold|``). Without a calibration and without both overrides, :meth:`decide` raises.
    """

    def __init__(self, calibration: Calibration | None, *, image_threshold: float | None = None,
                 pixel_threshold: float | None = None, checkpoint: str = "checkpoint") -> None:
        self.calibration = calibration
        self.image_override = check_threshold(image_threshold, "image threshold")
        self.pixel_override = check_threshold(pixel_threshold, "pixel threshold")
        self.checkpoint = checkpoint

    @property
    def ready(self) -> bool:
        """Can :meth:`decide` answer: a calibration, or both thresholds given."""
        return self.calibration is not None or (self.image_override is not None and self.pixel_override is not None)

    def category(self, histograms: Tensor | None, given: Sequence[str | None] | None, n: int) -> list[str]:
        """The class of each image: the caller's, else the nearest by assignment histogram, else ``""``."""
        known = list(self.calibration.classes) if self.calibration else []
        given = list(given) if given is not None else [None] * n
        out: list[str] = []
        guessed = None
        for i, c in enumerate(given):
            if c is not None and (isinstance(c, float) and math.isnan(c)):
                c = None
            if c is not None and c != "":
                if known and c not in known:
                    raise ConfigError(f"class {c!r} is not one the model was calibrated for: {', '.join(known)}")
                out.append(str(c))
                continue
            if self.calibration is not None and self.calibration.histograms and histograms is not None:
                if guessed is None:
                    guessed = nearest_class(histograms, self.calibration.histograms)
                out.append(guessed[i])
            elif len(known) == 1:
                out.append(known[0])
            else:
                out.append("")
        return out

    def _class(self, category: str) -> ClassThresholds | None:
        if self.calibration is None:
            return None
        if category in self.calibration.classes:
            return self.calibration.classes[category]
        # Unknown class (no histograms to pick one): the most conservative calibrated threshold.
        return max(self.calibration.classes.values(), key=lambda t: t.image_threshold)

    def image_threshold_for(self, category: str) -> float:
        """The image threshold a ``category`` image is judged by (the override, else its calibrated one)."""
        if self.image_override is not None:
            return self.image_override
        t = self._class(category)
        if t is None:
            raise CheckpointError(not_calibrated_message(self.checkpoint))
        return t.image_threshold

    def decide(self, scores: np.ndarray | Tensor, maps: np.ndarray | Tensor, categories: Sequence[str]) -> Decisions:
        if not self.ready:
            raise CheckpointError(not_calibrated_message(self.checkpoint))
        s = np.asarray(scores.detach().cpu() if isinstance(scores, Tensor) else scores, dtype=np.float64)
        m = np.asarray(maps.detach().cpu() if isinstance(maps, Tensor) else maps, dtype=np.float64)
        n = s.shape[0]
        pred_score = np.zeros(n)
        it, pt = np.zeros(n), np.zeros(n)
        for i, c in enumerate(categories):
            t = self._class(c)
            image_t = self.image_override if self.image_override is not None else t.image_threshold  # type: ignore[union-attr]
            pixel_t = self.pixel_override if self.pixel_override is not None else t.pixel_threshold  # type: ignore[union-attr]
            low, high = (t.image_min, t.image_max) if t is not None else (0.0, 0.0)
            pred_score[i] = normalise(float(s[i]), image_t, low, high)
            it[i], pt[i] = image_t, pixel_t
        return Decisions(category=list(categories), pred_score=pred_score, pred_label=(s > it).astype(np.int64),
                         pred_mask=m > pt.reshape(-1, *([1] * (m.ndim - 1))), image_threshold=it,
                         pixel_threshold=pt)
