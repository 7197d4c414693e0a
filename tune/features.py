"""Backbone features once per sweep: one extraction per (backbone, weights, image size, dataset).

The sweep driver extracts (or loads from the on-disk cache) the train and test features of every
dataset with a single :class:`vpdm.features.backbone.FeatureExtractor` and packs them, with everything a
trial needs to train, validate and evaluate, into a :class:`DatasetBundle` of numpy arrays. The
bundle goes into the Ray object store once (numpy arrays are shared zero-copy by every trial and
Ray Train worker on a node), so trials never build a backbone and never read an image to train or
evaluate. :class:`FeatureStats` counts what the backbone did.

Validation data (what ASHA and Optuna see; the test split is only for final metrics)
-------------------------------------------------------------------------------------
``val_fraction`` of each class's *training* images is held out: at least two per class with four or
more images (what the decision thresholds need, :mod:`tune.thresholds`), at least one per class with
two or three. After training, each trial calibrates its thresholds on these held-out normal images
(their features are already in the bundle). Two metrics are computed on them each epoch, both
independent of the batch and of the number of workers (fixed timesteps, noise and sampling seeds):

* ``val_loss``: the held-out eps-MSE (+ lambda_OT x OT loss), lower is better. Cheap, but its scale
  depends on the noise schedule and T, so it does not compare trials that tune the schedule.
* ``val_pseudo_auroc`` (default sweep metric), higher is better: image AUROC between the held-out
  good images and *pseudo-anomalies* made from them in feature space: a square of side
  ``feature_size // 4`` is cut from another held-out image (another class when there is one: the
  typical multi-class confusion) and pasted at a random place. It needs no labels and scores the
  detector with its own inference path.
* ``val_same_class_auroc`` (the ``default`` preset's metric), higher is better: the same AUROC against
  pseudo-defects that stay within the image's own class (:func:`same_class_pseudo_anomalies`: local
  shuffles, noise, intensity changes, self-pastes, from a quarter of the map down to one position, so
  that small defects count). With local prototypes a patch of *another* class is
  normal for a unified model (its blocks match that class's prototypes), so the cut-paste metric
  misses what the test split asks. ``benchmarks/proxy_study.py`` measures both against the test
  metrics (``benchmarks/EXPERIMENTS.md``, lever 8): over the local-prototype settings the ``default``
  preset searches, Spearman's rho with test image / pixel AUROC / AUPRO is +0.67 / +0.76 / +0.90 for
  this metric and +0.83 / +0.67 / -0.21 for ``val_pseudo_auroc``; across prototype levels and scoring
  settings neither ranks configurations correctly, so compare trials only within one scoring setting.
  (That study predates the small squares, added with the fine prototypes in section 16.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vpdm.config.schema import VPDMConfig
from vpdm.data.dataset import AnomalyDataset
from vpdm.decision.calibration import MIN_CALIBRATION_IMAGES, MIN_TRAIN_IMAGES
from vpdm.errors import DataError
from vpdm.evaluation import evaluator
from vpdm.features.backbone import FeatureExtractor
from vpdm.training import engine

__all__ = [
    "DatasetBundle",
    "FeatureStats",
    "OverlayItem",
    "build_bundle",
    "split_validation",
    "pseudo_anomalies",
    "same_class_pseudo_anomalies",
]


@dataclass
class OverlayItem:
    index: int  # into the test split
    name: str  # file name for the overlay PNG
    image: np.ndarray  # uint8 M x M x 3 at the map size


@dataclass
class FeatureStats:
    """What the backbone did for one dataset (train + test)."""

    dataset: str
    num_images: int
    backbone_forwards: int  # images run through the backbone for this dataset (0 when both splits were cached)
    cache_hits: int  # splits served from the on-disk feature cache (0, 1 or 2)
    seconds: float
    cache_paths: list[str] = field(default_factory=list)


@dataclass
class DatasetBundle:
    """Everything a trial needs for one dataset, as numpy arrays (zero-copy in the Ray object store)."""

    name: str
    spec: str
    categories: list[str]
    train_features: np.ndarray  # float32 N x C x S x S (the training part, validation held out)
    train_class: np.ndarray  # int64 N, index into categories
    val_features: np.ndarray  # float32 V x C x S x S, held-out good training images
    val_class: np.ndarray  # int64 V
    val_anomalous: np.ndarray  # float32 V x C x S x S, pseudo-anomalies of val_features
    val_t_uniform: np.ndarray  # float64 V in [0, 1): the validation timestep of image i is floor(u_i * T)
    val_noise: np.ndarray  # float32 V x C x S x S, the validation noise
    test_features: np.ndarray  # float32 M x C x S x S
    test_labels: np.ndarray  # int64 M
    test_masks: np.ndarray  # bool M x H x H at the map size
    test_categories: list[str]
    test_paths: list[str]
    overlays: list[OverlayItem]
    num_images: int  # train + test images (each needed exactly one backbone forward)
    backbone: str  # the extractor's fingerprint
    # bool M: False for an anomalous image without a mask (data.missing_masks=image_only), left out of pixel metrics
    test_pixel_known: np.ndarray | None = None
    # float32 V x C x S x S: same-class pseudo-defects of val_features (val_same_class_auroc); None = not computed
    val_same_class: np.ndarray | None = None
    val_fraction: float = 0.0  # how the held-out images were drawn (split_validation), for the record
    val_seed: int = 0

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        c, s1, s2 = self.train_features.shape[1:]
        return int(c), int(s1), int(s2)


def validation_count(n: int, fraction: float) -> int:
    """Held-out images of a class of ``n``: ``round(fraction * n)``, at least 2 when that leaves 2 to train on
    (the threshold calibration needs 2), at least 1 when ``n >= 2``, and never all of them."""
    k = int(round(fraction * n))
    floor = MIN_CALIBRATION_IMAGES if n >= MIN_CALIBRATION_IMAGES + MIN_TRAIN_IMAGES else (1 if n >= 2 else 0)
    return min(max(k, floor), max(n - 1, 0))


def split_validation(class_index: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified hold-out: ``(train_idx, val_idx)``, :func:`validation_count` images per class."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"validation fraction must be in (0, 1), got {fraction!r}")
    rng = np.random.default_rng([seed, 7])
    train, val = [], []
    for c in np.unique(class_index):
        idx = rng.permutation(np.flatnonzero(class_index == c))
        k = validation_count(len(idx), fraction)
        val.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def pseudo_anomalies(features: np.ndarray, class_index: np.ndarray, seed: int) -> np.ndarray:
    """Feature-space cut-paste: each image gets a square from another image (of another class if any)."""
    n, _, s, _ = features.shape
    out = features.copy()
    if n < 2:
        return out + np.random.default_rng([seed, 11]).normal(0, 1, out.shape).astype(out.dtype)
    rng = np.random.default_rng([seed, 13])
    side = max(1, s // 4)
    for i in range(n):
        others = np.flatnonzero(class_index != class_index[i])
        if len(others) == 0:
            others = np.array([j for j in range(n) if j != i])
        j = int(rng.choice(others))
        ys, xs = rng.integers(0, s - side + 1, 2)  # where it comes from
        yd, xd = rng.integers(0, s - side + 1, 2)  # where it goes
        out[i, :, yd : yd + side, xd : xd + side] = features[j, :, ys : ys + side, xs : xs + side]
    return out


SAME_CLASS_KINDS = ("shuffle", "noise", "intensity", "self_paste")


def same_class_sides(feature_size: int) -> tuple[int, ...]:
    """Sides of the same-class pseudo-defects at ``feature_size``: a quarter of the map, a sixteenth, one
    position (10 px at 320 px / 32 features: the small defects of ``metrics.defect_size_metrics``)."""
    return tuple(dict.fromkeys((max(1, feature_size // 4), max(1, feature_size // 16), 1)))


def same_class_pseudo_anomalies(features: np.ndarray, seed: int) -> np.ndarray:
    """Feature-space pseudo-defects that stay within the image's own class: in a square at a random place,
    one of (by image index, in turn) a local shuffle of the positions, added Gaussian noise of the image's
    own per-channel spread, an intensity change (deviations from the image's channel means scaled by 0.3
    or 2.0), or a square pasted from another place of the same image. The square's side cycles (per round
    of the four kinds) through ``S // 4``, ``S // 16`` and one position (at least 2 for a shuffle), so
    defects of a few pixels, which block-level settings average away, count as much as large ones
    (:data:`SAME_CLASS_SIDES`).

    Unlike a cut-paste from another class, none of these is normal for some other class of a unified
    model, so a detector must judge the image in its own context to find them.
    """
    n, c, s, _ = features.shape
    out = features.copy()
    rng = np.random.default_rng([seed, 19])
    sides = same_class_sides(s)
    for i in range(n):
        kind = SAME_CLASS_KINDS[i % len(SAME_CLASS_KINDS)]
        side = sides[(i // len(SAME_CLASS_KINDS)) % len(sides)]
        if kind == "shuffle":
            side = min(max(side, 2), s)
        y, x = rng.integers(0, s - side + 1, 2)
        patch = out[i, :, y : y + side, x : x + side]
        if kind == "shuffle":
            flat = patch.reshape(c, -1)
            order = rng.permutation(flat.shape[1])
            if np.array_equal(order, np.arange(order.size)):  # 1 in 24 for a 2x2 square: no defect at all
                order = np.roll(order, 1)
            patch[...] = flat[:, order].reshape(patch.shape)
        elif kind == "noise":
            spread = features[i].reshape(c, -1).std(axis=1).reshape(c, 1, 1)
            patch += (rng.standard_normal(patch.shape) * spread).astype(out.dtype)
        elif kind == "intensity":
            mean = features[i].reshape(c, -1).mean(axis=1).reshape(c, 1, 1)
            factor = 0.3 if rng.random() < 0.5 else 2.0
            patch[...] = mean + factor * (patch - mean)
        else:
            ys, xs = rng.integers(0, s - side + 1, 2)
            while side < s and abs(int(ys) - int(y)) < side and abs(int(xs) - int(x)) < side:
                ys, xs = rng.integers(0, s - side + 1, 2)
            patch[...] = features[i, :, ys : ys + side, xs : xs + side]
    return out


def _overlay_picks(dataset: AnomalyDataset, map_size: int, per_class: int) -> list[OverlayItem]:
    """A few test images per class (defects first, then one good one) as uint8 at the map size."""
    picks: list[OverlayItem] = []
    by_class: dict[str, list[int]] = {}
    for i, s in enumerate(dataset.samples):
        by_class.setdefault(s.category, []).append(i)
    for cat, idx in sorted(by_class.items()):
        bad = [i for i in idx if dataset.samples[i].label == 1]
        good = [i for i in idx if dataset.samples[i].label == 0]
        chosen = bad[: max(per_class - 1, 1)] + good[:1]
        for i in chosen[:per_class]:
            s = dataset.samples[i]
            image = AnomalyDataset([s], image_size=map_size, mask_size=map_size).raw_image(0)
            name = f"{cat.replace('/', '_')}_{s.defect}_{Path(s.image_path).stem}.png"
            picks.append(OverlayItem(i, name, image))
    return picks


def build_bundle(
    name: str,
    config: VPDMConfig,
    extractor: FeatureExtractor,
    *,
    val_fraction: float = 0.15,
    seed: int = 0,
    overlays_per_class: int = 3,
    progress: bool = False,
) -> tuple[DatasetBundle, FeatureStats]:
    """Extract (or load cached) features of ``config.data.spec`` once and pack them for the trials.

    Extraction runs where ``extractor`` is (the sweep driver moves it to cuda when the sweep uses GPUs
    and the driver has one, :func:`tune.cluster.driver_device`); the features are brought back to the CPU."""
    start = time.perf_counter()
    before = extractor.images_seen
    train = engine.load_split(config, "train", extractor=extractor, progress=progress)
    test = engine.load_split(config, "test", extractor=extractor, progress=progress)
    forwards = extractor.images_seen - before
    map_size = config.scoring.map_size or config.backbone.image_size

    features = train.features.numpy().astype(np.float32, copy=False)
    class_index = train.class_index.numpy().astype(np.int64)
    train_idx, val_idx = split_validation(class_index, val_fraction, seed)
    if len(val_idx) == 0:
        raise DataError(f"dataset {name!r}: too few training images to hold out a validation set ({len(features)})")
    val = features[val_idx]
    val_class = class_index[val_idx]
    rng = np.random.default_rng([seed, 17])
    # Categories of the test split can be fewer than the training ones (never more for valid specs).
    test_cats = [s.category for s in test.dataset.samples]
    masks = np.stack([test.dataset.mask_array(i) for i in range(len(test.dataset))]).astype(bool)
    if masks.shape[-1] != map_size:
        raise DataError(f"dataset {name!r}: masks are {masks.shape[-1]} px, expected the map size {map_size}")
    bundle = DatasetBundle(
        name=name,
        spec=config.data.spec,
        categories=list(train.dataset.categories),
        train_features=np.ascontiguousarray(features[train_idx]),
        train_class=class_index[train_idx],
        val_features=np.ascontiguousarray(val),
        val_class=val_class,
        val_anomalous=pseudo_anomalies(val, val_class, seed),
        val_same_class=same_class_pseudo_anomalies(val, seed),
        val_t_uniform=rng.random(len(val_idx)),
        val_noise=rng.standard_normal(val.shape).astype(np.float32),
        test_features=test.features.numpy().astype(np.float32, copy=False),
        test_labels=np.array([s.label for s in test.dataset.samples], dtype=np.int64),
        test_masks=masks,
        test_categories=test_cats,
        test_paths=[str(s.image_path) for s in test.dataset.samples],
        overlays=_overlay_picks(test.dataset, map_size, overlays_per_class),
        num_images=len(train.dataset) + len(test.dataset),
        backbone=extractor.fingerprint(),
        test_pixel_known=evaluator.pixel_known(test.dataset),
        val_fraction=float(val_fraction),
        val_seed=int(seed),
    )
    stats = FeatureStats(
        dataset=name,
        num_images=bundle.num_images,
        backbone_forwards=int(forwards),
        cache_hits=int(train.cache_hit) + int(test.cache_hit),
        seconds=time.perf_counter() - start,
        cache_paths=[p for p in (train.cache_path, test.cache_path) if p],
    )
    return bundle, stats


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A torch view of a (possibly read-only, object-store) array without copying; never written to."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable"
        return torch.from_numpy(array)


def describe(bundle: DatasetBundle) -> dict[str, Any]:
    return {
        "dataset": bundle.name,
        "spec": bundle.spec,
        "classes": len(bundle.categories),
        "train_images": int(len(bundle.train_features)),
        "val_images": int(len(bundle.val_features)),
        "test_images": int(len(bundle.test_features)),
        "feature_shape": list(bundle.feature_shape),
    }
