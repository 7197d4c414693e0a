"""From raw scores to decisions: calibrated thresholds, normalised scores, labels and masks.

The counterpart of anomalib's ``PostProcessor``. A model gives a raw image ``score`` and a float
``anomaly_map`` per image; a production line needs a good/defective decision. Here:

* **thresholds** are calibrated per class by one of three methods (:data:`METHODS`):

  - ``quantile``, on *normal* images only (a held-out part of ``train/good``, or ``vpdm calibrate``):
    the image threshold is the ``1 - false_alarm_rate`` quantile of the held-out images' scores and
    the pixel threshold the same quantile of all their map pixels (:func:`quantile_threshold`:
    numpy's quantile, method ``"higher"``, so the threshold is always an observed score; with fewer
    than ``1 / false_alarm_rate + 1`` images it is their maximum);
  - ``f1``, on a *labelled* validation set (normal and defect images with masks): the threshold that
    maximises F1 over the images (image threshold) and over their pixels (pixel threshold), as
    anomalib's ``F1AdaptiveThreshold`` (:func:`f1_threshold`);
  - ``recall``, on the same labelled set: the highest threshold that still flags ``target_recall`` of
    the anomalous images (pixels) (:func:`recall_threshold`);

  a labelled rule picks a cut in the sorted validation scores; the stored threshold is the highest
  validation score below the cut, so ``score > threshold`` flags exactly the cut's images;
* **normalisation** (:func:`normalise`) is anomalib's min-max normalisation around the threshold:
  ``pred_score = clip((score - threshold) / (max - min) + 0.5, 0, 1)`` with ``min``/``max`` the
  calibration images' score range: monotone, the threshold maps to 0.5, clipped to [0, 1];
* **decisions**: ``pred_label = score > image_threshold`` (the same as ``pred_score > 0.5`` below
  the clip), ``pred_mask = anomaly_map > pixel_threshold``;
* **the class of an image** (thresholds are per class): the caller's label if given, otherwise the
  class whose calibration images' mean prototype-assignment histogram is nearest by cosine
  (:func:`nearest_class`; the histograms come from :mod:`vpdm.decision.calibration`).

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
from torch import Tensor, nn

from vpdm.errors import CheckpointError, ConfigError

__all__ = [
    "METHODS",
    "Calibration",
    "ClassThresholds",
    "DecisionTables",
    "Decisions",
    "PostProcessor",
    "check_threshold",
    "image_labels",
    "f1_threshold",
    "nearest_class",
    "normalise",
    "not_calibrated_message",
    "quantile_threshold",
    "recall_threshold",
]

QUANTILE_METHOD = "higher"  # numpy's quantile method: the threshold is always one of the observed scores
# How thresholds are chosen: from normal images only, or from a labelled validation set.
METHODS: tuple[str, ...] = ("quantile", "f1", "recall")
LABELLED_METHODS: tuple[str, ...] = ("f1", "recall")


def quantile_threshold(values: np.ndarray | Tensor | Sequence[float], false_alarm_rate: float) -> float:
    """The ``1 - false_alarm_rate`` quantile of normal ``values`` (numpy, method ``"higher"``).

    At most a fraction ``false_alarm_rate`` of the values is strictly above it. With ``n`` values and
    ``(1 - rate) * (n - 1) > n - 2`` (fewer than ``1 / rate + 1`` values) it is their maximum.
    """
    if not (
        isinstance(false_alarm_rate, (int, float))
        and not isinstance(false_alarm_rate, bool)
        and math.isfinite(false_alarm_rate)
        and 0 <= false_alarm_rate < 1
    ):
        raise ConfigError(f"false alarm rate must be a number in [0, 1), got {false_alarm_rate!r}")
    array = values.detach().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values)
    array = array.astype(np.float64, copy=False).ravel()
    if array.size == 0:
        raise ConfigError("cannot calibrate a threshold on no scores")
    if not np.isfinite(array).all():
        raise ConfigError("cannot calibrate a threshold: the calibration scores contain NaN or infinity")
    return float(np.quantile(array, 1.0 - false_alarm_rate, method=QUANTILE_METHOD))


def _labelled(
    labels: np.ndarray | Tensor | Sequence[int], scores: np.ndarray | Tensor | Sequence[float], what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Flat bool labels and float64 scores of the same size, with both a normal and an anomalous entry."""
    y = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    s = scores.detach().cpu().numpy() if isinstance(scores, Tensor) else np.asarray(scores)
    y, s = y.astype(bool).ravel(), s.astype(np.float64, copy=False).ravel()
    if y.size != s.size:
        raise ConfigError(f"{what}: {y.size} labels but {s.size} scores; expected one label per score")
    if not np.isfinite(s).all():
        raise ConfigError(f"cannot calibrate {what}: the validation scores contain NaN or infinity")
    if y.all() or not y.any():
        kind = "normal" if y.all() else "anomalous"
        raise ConfigError(
            f"cannot calibrate {what} on labelled data without {kind} entries; "
            "a labelled threshold needs both normal and anomalous ones"
        )
    return y, s


def _cuts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each distinct score v, descending, with the anomalous and normal counts of ``s >= v``."""
    order = np.argsort(s, kind="stable")[::-1]
    ranked, hits = s[order], y[order]
    last = np.append(np.flatnonzero(ranked[1:] != ranked[:-1]), ranked.size - 1)  # end of each tie group
    tp = np.cumsum(hits, dtype=np.int64)[last]
    return ranked[last], tp, (last + 1) - tp


def _just_below(value: float) -> float:
    """The float32 number below ``value``: below it in float64 too, so ``score > threshold`` holds for ``value``
    whether scores are compared as float32 (numpy keeps a float32 array's precision) or as float64."""
    return float(np.nextafter(np.float32(value), np.float32(-np.inf)))


def _below(values: np.ndarray, k: int) -> float:
    """The threshold that flags ``values[:k + 1]`` (distinct scores, descending) with ``score > threshold``:
    the next lower observed score, or just below the lowest one."""
    if k + 1 < values.size:
        return float(values[k + 1])
    return _just_below(values[k])


def f1_threshold(
    labels: np.ndarray | Tensor | Sequence[int],
    scores: np.ndarray | Tensor | Sequence[float],
    what: str = "a threshold",
) -> float:
    """The threshold maximising F1 of ``score > threshold`` on labelled validation scores.

    anomalib's ``F1AdaptiveThreshold``: over the precision-recall curve (a cut at every distinct score
    ``v``, flagging ``score >= v``) the cut of highest F1, the lowest such cut on a tie (its ``argmax``
    over ascending thresholds). Returned as the highest score below the cut (see the module docstring),
    so the validation decisions are the cut's. Needs normal and anomalous entries.
    """
    y, s = _labelled(labels, scores, what)
    values, tp, fp = _cuts(y, s)
    f1 = (2.0 * tp) / (tp + fp + int(y.sum()))  # = 2PR / (P + R); equal ratios give equal floats
    k = values.size - 1 - int(np.argmax(f1[::-1]))  # the lowest cut among the best
    return _below(values, k)


def recall_threshold(
    labels: np.ndarray | Tensor | Sequence[int],
    scores: np.ndarray | Tensor | Sequence[float],
    target_recall: float,
    what: str = "a threshold",
) -> float:
    """The highest threshold at which ``score > threshold`` flags at least ``target_recall`` of the anomalous
    entries: the highest validation score below the ``ceil(target_recall * P)``-th largest anomalous one."""
    if not (
        isinstance(target_recall, (int, float))
        and not isinstance(target_recall, bool)
        and math.isfinite(target_recall)
        and 0 < target_recall <= 1
    ):
        raise ConfigError(f"target recall must be a number in (0, 1], got {target_recall!r}")
    y, s = _labelled(labels, scores, what)
    positives = np.sort(s[y])[::-1]
    needed = max(1, math.ceil(round(target_recall * positives.size, 9)))  # 0.9 * 10 is 9.000000000000002
    cut = positives[needed - 1]
    lower = s[s < cut]
    return float(lower.max()) if lower.size else _just_below(cut)


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


def image_labels(
    scores: np.ndarray | Tensor | Sequence[float], categories: Sequence[str], thresholds: Mapping[str, float]
) -> np.ndarray:
    """``pred_label`` of each image: 1 where its score is above its class's image threshold (``score >
    threshold``, in float64). The one place the rule is written; :meth:`PostProcessor.decide` and every
    decision metric use it."""
    return _above(_float64(scores), np.array([thresholds[c] for c in categories], dtype=np.float64))


def _above(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """1 where ``score > threshold`` (float64 arrays of the same length), else 0: the decision rule."""
    return (scores > thresholds).astype(np.int64)


def not_calibrated_message(checkpoint: str) -> str:
    return (
        f"checkpoint {checkpoint!r} has no calibrated thresholds (it predates them, or was trained with "
        f"train.calibration_fraction=0); make them from normal images with: vpdm calibrate --checkpoint "
        f"{checkpoint} --data SPEC (train/good of SPEC is used), or pass --image-threshold/--pixel-threshold"
    )


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
    num_anomalous: int = 0  # anomalous images among them (labelled validation data; 0 for normal images only)

    @classmethod
    def from_scores(
        cls, scores: np.ndarray | Tensor, maps: np.ndarray | Tensor, false_alarm_rate: float
    ) -> ClassThresholds:
        """Thresholds of one class from its normal calibration images' scores (N,) and maps (N x H x W)."""
        s = _float64(scores).ravel()
        m = _float64(maps).ravel()
        return cls(
            image_threshold=quantile_threshold(s, false_alarm_rate),
            pixel_threshold=quantile_threshold(m, false_alarm_rate),
            image_min=float(s.min()),
            image_max=float(s.max()),
            pixel_min=float(m.min()),
            pixel_max=float(m.max()),
            num_images=int(s.size),
        )

    @classmethod
    def from_labelled(
        cls,
        scores: np.ndarray | Tensor,
        labels: np.ndarray | Sequence[int],
        maps: np.ndarray | Tensor,
        masks: np.ndarray | Tensor,
        pixel_known: np.ndarray | Sequence[bool],
        method: str,
        *,
        target_recall: float = 1.0,
        category: str = "",
    ) -> ClassThresholds:
        """Thresholds of one class from labelled validation images: scores (N,), labels (N,), maps and masks
        (N x H x W); ``pixel_known`` (N,) is False for an anomalous image without a mask (left out of the
        pixel threshold). ``method``: ``"f1"`` or ``"recall"`` (:data:`LABELLED_METHODS`)."""
        if method not in LABELLED_METHODS:
            raise ConfigError(
                f"labelled calibration method must be one of {', '.join(LABELLED_METHODS)}, got {method!r}"
            )
        s, m = _float64(scores).ravel(), _float64(maps)
        y = np.asarray(labels).astype(bool).ravel()
        known = np.asarray(pixel_known, dtype=bool).ravel()
        gt = np.asarray(masks.detach().cpu() if isinstance(masks, Tensor) else masks).astype(bool)
        name = f"class {category!r}: " if category else ""

        def rule(lab: np.ndarray, val: np.ndarray, what: str) -> float:
            if method == "f1":
                return f1_threshold(lab, val, what=f"{name}{what}")
            return recall_threshold(lab, val, target_recall, what=f"{name}{what}")

        image_t = rule(y, s, "the image threshold")
        pixel_t = rule(gt[known], m[known], "the pixel threshold (pixels of images with known masks)")
        return cls(
            image_threshold=image_t,
            pixel_threshold=pixel_t,
            image_min=float(s.min()),
            image_max=float(s.max()),
            pixel_min=float(m.min()),
            pixel_max=float(m.max()),
            num_images=int(s.size),
            num_anomalous=int(y.sum()),
        )


def _float64(values: np.ndarray | Tensor) -> np.ndarray:
    return np.asarray(values.detach().cpu() if isinstance(values, Tensor) else values, dtype=np.float64)


@dataclass
class Calibration:
    """Per-class thresholds plus what picks the class of an unlabelled image."""

    false_alarm_rate: float  # the quantile method's target (recorded, unused, for the labelled methods)
    classes: dict[str, ClassThresholds]
    # Mean prototype-assignment histogram (K,) of each class's calibration images (nearest_class).
    histograms: dict[str, Tensor] = field(default_factory=dict)
    source: str = ""  # which images: "train holdout 0.1 (seed 0)", "--val-data mvtec:/val", for the record
    # The sampling and scoring settings the scores were made with: thresholds hold for those only.
    settings: dict[str, Any] = field(default_factory=dict)
    method: str = "quantile"  # how the thresholds were chosen (METHODS)
    target_recall: float | None = None  # the recall method's target

    def describe(self) -> str:
        """How the thresholds were chosen, in words (for outputs)."""
        if self.method == "quantile":
            rule = (
                f"{1 - self.false_alarm_rate:g} quantile of normal images (target false-alarm rate "
                f"{self.false_alarm_rate:g})"
            )
        elif self.method == "recall":
            rule = f"highest threshold reaching recall {self.target_recall:g} on labelled images"
        else:
            rule = "F1-maximising on labelled images"
        return f"{rule}, from {self.source or 'unrecorded images'}"

    def to_payload(self) -> dict[str, Any]:
        """Plain containers and tensors (``torch.load(weights_only=True)`` reads them)."""
        return {
            "method": self.method,
            "false_alarm_rate": float(self.false_alarm_rate),
            "target_recall": None if self.target_recall is None else float(self.target_recall),
            "class_rule": "cosine to the mean prototype-assignment histogram",
            "source": self.source,
            "classes": {
                c: {k: (int(v) if k.startswith("num_") else float(v)) for k, v in vars(t).items()}
                for c, t in self.classes.items()
            },
            "histograms": {c: h.detach().cpu().float().clone() for c, h in self.histograms.items()},
            "settings": dict(self.settings),
        }

    @classmethod
    def from_payload(cls, data: Any, where: str = "checkpoint") -> Calibration:
        """Read :meth:`to_payload`'s dict; a calibration stored before the method was recorded is ``quantile``."""
        try:
            classes = {str(c): ClassThresholds(**{k: v for k, v in t.items()}) for c, t in data["classes"].items()}
            histograms = {
                str(c): torch.as_tensor(h, dtype=torch.float32) for c, h in (data.get("histograms") or {}).items()
            }
            method = str(data.get("method") or "quantile")
            if method not in METHODS:
                raise ValueError(f"unknown method {method!r}")
            recall = data.get("target_recall")
            if method == "recall" and recall is None:
                raise ValueError("method 'recall' without its target_recall")
            return cls(
                float(data["false_alarm_rate"]),
                classes,
                histograms,
                str(data.get("source", "")),
                dict(data.get("settings") or {}),
                method,
                None if recall is None else float(recall),
            )
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise CheckpointError(f"{where} holds a damaged calibration ({type(exc).__name__}: {exc})") from None


def settings_of(config: Any) -> dict[str, Any]:
    """The settings a calibration depends on (sampling, scoring and the inference precision), as plain dicts."""
    from vpdm.config.values import to_dict

    return {
        "sampling": to_dict(config.sampling),
        "scoring": to_dict(config.scoring),
        "inference": to_dict(config.inference),
    }


def settings_differ(calibration: Calibration | None, config: Any) -> list[str]:
    """Settings (``section.key``) that differ from those the thresholds were calibrated with (a section the
    calibration predates, such as ``inference``, is not compared)."""
    if calibration is None or not calibration.settings:
        return []
    now = settings_of(config)
    return [
        f"{sec}.{k}"
        for sec in ("sampling", "scoring", "inference")
        for k in now[sec]
        if k in calibration.settings.get(sec, {}) and calibration.settings[sec][k] != now[sec][k]
    ]


def nearest_index(histograms: Tensor, table: Tensor) -> Tensor:
    """For each row of ``histograms`` (B x K), the row of ``table`` (C x K class mean histograms) nearest by cosine."""
    sims = torch.nn.functional.cosine_similarity(histograms.float().unsqueeze(1), table.unsqueeze(0), dim=-1)
    return sims.argmax(dim=1)


def nearest_class(histograms: Tensor, prototypes: Mapping[str, Tensor]) -> list[str]:
    """For each row of ``histograms`` (B x K), the class whose mean histogram is nearest by cosine."""
    if not prototypes:
        raise ConfigError("no class histograms to pick a class from")
    names = list(prototypes)
    table = torch.stack([prototypes[n].float() for n in names])  # C x K
    return [names[i] for i in nearest_index(histograms, table).tolist()]


class DecisionTables(nn.Module):
    """A :class:`PostProcessor`'s thresholds as a module, as anomalib's post-processor holds them: per class
    (in the order of :attr:`names`) the image and pixel thresholds and the normalisation's divisor, float64
    buffers, and how an image without a given class gets one (:attr:`rule`). ``forward(scores, maps, index)``
    gives ``pred_score``, ``pred_label``, ``pred_mask``: :meth:`PostProcessor.decide` and the exported graph
    both run it.

    ``rule``: ``"histogram"`` (the class mean histogram nearest by cosine, :func:`nearest_index`), ``"single"``
    (the one calibrated class), ``"most_conservative"`` (no histograms, several classes: the largest image
    threshold, for both thresholds) or ``"none"`` (no calibration, both thresholds given: one class ``""``).
    """

    def __init__(self, post: PostProcessor) -> None:
        super().__init__()
        calibration = post.calibration
        if calibration is None:
            if not post.ready:
                raise CheckpointError(not_calibrated_message(post.checkpoint))
            it, pt = float(post.image_override), float(post.pixel_override)  # type: ignore[arg-type]
            names, image_t, pixel_t, scale, rule = [""], [it], [pt], [abs(it) or 1.0], "none"
            self.conservative = 0
        else:
            names = list(calibration.classes)
            image_t, pixel_t, scale = [], [], []
            for name in names:
                t = calibration.classes[name]
                i = post.image_override if post.image_override is not None else t.image_threshold
                p = post.pixel_override if post.pixel_override is not None else t.pixel_threshold
                divisor = float(t.image_max) - float(t.image_min)  # normalise()'s scale
                if not (divisor > 0 and math.isfinite(divisor)):
                    divisor = abs(float(i)) or 1.0
                image_t.append(float(i))
                pixel_t.append(float(p))
                scale.append(divisor)
            # an unknown class: the largest calibrated image threshold, for both thresholds
            self.conservative = max(range(len(names)), key=lambda k: calibration.classes[names[k]].image_threshold)
            if calibration.histograms:
                missing = [n for n in names if n not in calibration.histograms]
                if missing:
                    raise CheckpointError(
                        f"the calibration has no assignment histogram for class(es) {', '.join(missing)}; "
                        "re-run 'vpdm calibrate' on this checkpoint"
                    )
                rule = "histogram"
                self.register_buffer(
                    "class_histograms", torch.stack([calibration.histograms[n].float() for n in names])
                )
            else:
                rule = "single" if len(names) == 1 else "most_conservative"
        self.names: list[str] = names
        self.rule = rule
        self.register_buffer("image_threshold", torch.tensor(image_t, dtype=torch.float64))
        self.register_buffer("pixel_threshold", torch.tensor(pixel_t, dtype=torch.float64))
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float64))

    @property
    def fixed_index(self) -> int:
        """The class of every image when the rule does not look at histograms."""
        return 0 if self.rule in ("none", "single", "histogram") else self.conservative

    def index_of(self, category: str) -> int:
        """The table row a ``category`` image is judged by (an unknown class: :attr:`conservative`)."""
        return self.names.index(category) if category in self.names else self.conservative

    def class_index(self, histograms: Tensor | None, scores: Tensor) -> Tensor:
        """Each image's class by :attr:`rule` (``histograms``: the images' assignment histograms, for that rule;
        ``scores`` (B,): their scores, for the batch size)."""
        if self.rule == "histogram" and histograms is not None:
            return nearest_index(histograms, self.class_histograms)
        return torch.zeros_like(scores, dtype=torch.long) + self.fixed_index

    def forward(self, scores: Tensor, maps: Tensor, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        s = scores.double()
        image_t = self.image_threshold[index]
        pred_score = ((s - image_t) / self.scale[index] + 0.5).clamp(0.0, 1.0)  # normalise()
        pred_label = (s > image_t).long()  # the decision rule (_above)
        pred_mask = maps.double() > self.pixel_threshold[index].view(-1, *([1] * (maps.dim() - 1)))
        return pred_score, pred_label, pred_mask


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

    def __init__(
        self,
        calibration: Calibration | None,
        *,
        image_threshold: float | None = None,
        pixel_threshold: float | None = None,
        checkpoint: str = "checkpoint",
        classes: Sequence[str] = (),
    ) -> None:
        self.calibration = calibration
        self.image_override = check_threshold(image_threshold, "image threshold")
        self.pixel_override = check_threshold(pixel_threshold, "pixel threshold")
        self.checkpoint = checkpoint
        self.classes = list(classes)  # the model's classes: what a caller's class must be without a calibration

    def require_complete(self) -> None:
        """Refuse one threshold override alone on a model without calibrated thresholds: it could decide
        nothing, and ignoring it would be silent (:class:`ConfigError` naming what is missing)."""
        if self.calibration is None and (self.image_override is None) != (self.pixel_override is None):
            given, missing = ("image", "pixel") if self.image_override is not None else ("pixel", "image")
            article = "an" if given == "image" else "a"
            raise ConfigError(
                f"{article} {given} threshold was given without a {missing} threshold, but checkpoint "
                f"{self.checkpoint!r} has no calibrated thresholds: decisions need both "
                "(--image-threshold and --pixel-threshold; params image_threshold and pixel_threshold), "
                f"or calibrate it: vpdm calibrate --checkpoint {self.checkpoint} --data SPEC"
            )

    @property
    def ready(self) -> bool:
        """Can :meth:`decide` answer: a calibration, or both thresholds given."""
        return self.calibration is not None or (self.image_override is not None and self.pixel_override is not None)

    def category(self, histograms: Tensor | None, given: Sequence[str | None] | None, n: int) -> list[str]:
        """The class of each image: the caller's, else the nearest by assignment histogram, else ``""``."""
        known = list(self.calibration.classes) if self.calibration else list(self.classes)
        given = list(given) if given is not None else [None] * n
        out: list[str] = []
        guessed = None
        for i, c in enumerate(given):
            if c is not None and (isinstance(c, float) and math.isnan(c)):
                c = None
            if c is not None and c != "":
                if known and c not in known:
                    kind = "calibrated" if self.calibration else "trained"
                    raise ConfigError(f"class {c!r} is not one the model was {kind} for: {', '.join(known)}")
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

    def image_labels(self, scores: np.ndarray | Tensor | Sequence[float], categories: Sequence[str]) -> np.ndarray:
        """``pred_label`` of each image, as :meth:`decide` gives it, without the maps."""
        return image_labels(scores, categories, {c: self.image_threshold_for(c) for c in set(categories)})

    def tables(self) -> DecisionTables:
        """The thresholds as a :class:`DecisionTables` module (what :meth:`decide` runs, and the export traces)."""
        return DecisionTables(self)

    def decide(self, scores: np.ndarray | Tensor, maps: np.ndarray | Tensor, categories: Sequence[str]) -> Decisions:
        if not self.ready:
            raise CheckpointError(not_calibrated_message(self.checkpoint))
        tables = self.tables()
        index = torch.tensor([tables.index_of(c) for c in categories], dtype=torch.long)
        s, m = torch.from_numpy(_float64(scores)), torch.from_numpy(_float64(maps))
        pred_score, pred_label, pred_mask = tables(s, m, index)
        return Decisions(
            category=list(categories),
            pred_score=pred_score.numpy(),
            pred_label=pred_label.numpy(),
            pred_mask=pred_mask.numpy(),
            image_threshold=tables.image_threshold[index].numpy(),
            pixel_threshold=tables.pixel_threshold[index].numpy(),
        )
