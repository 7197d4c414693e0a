"""Calibrating thresholds: the held-out split, labelled validation data, the class histograms, the thresholds.

``vpdm train`` holds out a seeded fraction of each class's ``train/good`` images
(:func:`holdout_split`), trains on the rest and calibrates on the held-out ones
(:func:`calibrate`); ``vpdm calibrate`` does the same for an existing checkpoint. With a labelled
validation set (``--val-data SPEC``: the test split of an MVTec-layout spec, normal and defect images
with masks, the model's classes) both calibrate on it instead (:func:`check_validation_samples`
before any work, then :func:`calibrate_labelled`). The rules (quantile, F1, recall, normalisation,
class choice) live in :mod:`vpdm.decision.postprocess`.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict

import numpy as np
import torch
from torch import Tensor

from vpdm.config.schema import VPDMConfig
from vpdm.data.layouts import Sample
from vpdm.decision.postprocess import LABELLED_METHODS, Calibration, ClassThresholds, settings_of
from vpdm.errors import ConfigError, DataError
from vpdm.model.vpdm_model import VPDM

MIN_CALIBRATION_IMAGES = 2  # per class: below this a quantile says nothing
MIN_TRAIN_IMAGES = 2  # per class left to train on


def holdout_count(n: int, fraction: float) -> int:
    """Images of a class held out for calibration: ``ceil(fraction * n)``, at least 2; 0 when fraction is 0."""
    if fraction <= 0:
        return 0
    return max(MIN_CALIBRATION_IMAGES, math.ceil(fraction * n))


def calibration_picks(samples: list[Sample], fraction: float, seed: int) -> dict[str, tuple[list[int], list[int]]]:
    """Per class: (positions in ``samples`` of its images, the seeded ``holdout_count`` of them picked).

    The pick depends only on the class's images, ``fraction`` and ``seed``, so ``vpdm calibrate
    --fraction F`` with the training data and seed picks the images ``vpdm train`` held out.
    """
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        by_class[s.category].append(i)
    out = {}
    for category, index in sorted(by_class.items()):
        k = min(len(index), holdout_count(len(index), fraction))
        out[category] = (index, random.Random(f"{seed}:{category}").sample(index, k))
    return out


def holdout_split(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """``(train, calibration)``: per class a seeded random ``holdout_count`` of its images for calibration.

    Order within each list follows ``samples``. A class too small to leave :data:`MIN_TRAIN_IMAGES` for
    training is refused by name (set ``train.calibration_fraction=0`` and use ``vpdm calibrate`` instead).
    """
    if fraction <= 0:
        return list(samples), []
    held: set[int] = set()
    for category, (index, picked) in calibration_picks(samples, fraction, seed).items():
        if len(index) - len(picked) < MIN_TRAIN_IMAGES:
            raise ConfigError(
                f"class {category!r} has {len(index)} training image(s): holding out {len(picked)} for calibration "
                f"(train.calibration_fraction={fraction}) leaves fewer than {MIN_TRAIN_IMAGES} to train on; "
                "set train.calibration_fraction=0 and calibrate later with 'vpdm calibrate'"
            )
        held.update(picked)
    return ([s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held])


def holdout_index(samples: list[Sample], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Positions in ``samples`` of :func:`holdout_split`'s ``(train, calibration)`` lists."""
    train, held = holdout_split(samples, fraction, seed)
    held_paths = {s.image_path for s in held}
    return (
        [i for i, s in enumerate(samples) if s.image_path not in held_paths],
        [i for i, s in enumerate(samples) if s.image_path in held_paths],
    )


def subset(split, index: list[int]):
    """The :class:`vpdm.training.engine.SplitFeatures` of ``split``'s images at ``index`` (features already extracted)."""
    import dataclasses

    from vpdm.data.dataset import AnomalyDataset

    samples = [split.dataset.samples[i] for i in index]
    dataset = AnomalyDataset(samples, image_size=split.dataset.image_size, mask_size=split.dataset.mask_size)
    position = torch.tensor(index, dtype=torch.long)
    class_index = torch.tensor([dataset.categories.index(s.category) for s in samples], dtype=torch.long)
    return dataclasses.replace(split, features=split.features[position], dataset=dataset, class_index=class_index)


@torch.no_grad()
def assignment_histograms(model: VPDM, features: Tensor, batch_size: int = 32) -> Tensor:
    """B x K: each image's mean prototype-assignment weights (eval mode: per image, batch-independent).

    For whole-image prototypes (``level="image"``) that is the image's own assignment; for local
    prototypes the average over its vague positions: which kinds of local structure it is made of.
    """
    protos = model.prototypes
    was_training = protos.training
    protos.eval()
    device = next(model.parameters()).device
    out = []
    try:
        for start in range(0, len(features), batch_size):
            f = features[start : start + batch_size].to(device)
            out.append(protos(model.normalise(f), with_loss=False, histogram=True)["histogram"].float().cpu())
    finally:
        protos.train(was_training)
    if not out:
        return torch.zeros(0, protos.count)
    return torch.cat(out)


def calibrate(
    model: VPDM,
    config: VPDMConfig,
    features: Tensor,
    categories: list[str],
    *,
    source: str = "",
    progress: bool = False,
    model_classes: list[str] | None = None,
) -> Calibration:
    """Score normal images' ``features`` (one class name per image in ``categories``) and calibrate.

    Every class needs :data:`MIN_CALIBRATION_IMAGES` images. First the term statistics of their classes move
    toward these unseen images' (:func:`refit_term_statistics`; ``model_classes``, the model's classes in
    training order, name its rows), then the thresholds are set on the scores they give.
    """
    from vpdm.evaluation.evaluator import score_with_config

    if len(categories) != len(features):
        raise ConfigError(f"{len(features)} calibration images but {len(categories)} class names")
    counts: dict[str, int] = defaultdict(int)
    for c in categories:
        counts[c] += 1
    few = {c: n for c, n in counts.items() if n < MIN_CALIBRATION_IMAGES}
    if few or not counts:
        raise ConfigError(
            f"calibration needs at least {MIN_CALIBRATION_IMAGES} normal images per class; got {dict(few) or 'none'}"
        )
    moved = refit_term_statistics(model, config, features, categories, model_classes)
    if moved:  # in the source, which every summary of the thresholds prints and the checkpoint keeps
        source = f"{source}; {moved}"
    scores, maps = score_with_config(model, features, config, progress)
    hist = assignment_histograms(model, features, config.train.batch_size)
    rate = config.calibration.false_alarm_rate
    classes, histograms = {}, {}
    for c in sorted(counts):
        idx = torch.tensor([i for i, x in enumerate(categories) if x == c])
        classes[c] = ClassThresholds.from_scores(scores[idx], maps[idx], rate)
        histograms[c] = hist[idx].mean(dim=0)
    return Calibration(rate, classes, histograms, source, settings_of(config))


def refit_term_statistics(
    model: VPDM,
    config: VPDMConfig,
    features: Tensor,
    categories: list[str],
    model_classes: list[str] | None,
) -> str:
    """Move the term statistics of the classes in ``categories`` ``calibration.statistics_weight`` of the way
    from the training images' fit to these normal images' (:meth:`VPDM.refit_statistics`); the model's
    classes (``model_classes``) name its rows, a class it does not know moves nothing. Returns what was done
    for the calibration's source, "" when nothing moved: a model without term statistics, a score that does not
    read them (``scoring.combine=weighted``, as the ``paper`` preset), or a model whose map weights were chosen
    on labelled defects with its present statistics (they stay, said in the note)."""
    weight = config.calibration.statistics_weight
    rows = int(model.term_mean.shape[0])
    if rows == 0 or config.scoring.combine != "standardised":  # no statistics, or a score that does not read them
        return ""
    if model.map_weight.numel():
        return "term statistics kept (the model's map weights were chosen with them)"
    if rows == 1:
        index = [0] * len(categories)
    elif model_classes is not None and len(model_classes) == rows:
        index = [model_classes.index(c) if c in model_classes else -1 for c in categories]
    else:
        return (
            f"term statistics kept (the model has {rows} rows of them but its classes are not known here, so "
            "an image's row cannot be told)"
        )
    moved = model.refit_statistics(
        features,
        torch.tensor(index, dtype=torch.long),
        config.sampling,
        config.scoring,
        weight,
        batch_size=config.train.batch_size,
    )
    if not moved:
        return ""
    names = ", ".join(model_classes[r] for r in moved) if rows > 1 and model_classes else "all classes"
    if weight == 0:
        return f"term statistics: the training images' fit ({names})"
    return f"term statistics moved {weight:g} of the way from the training images' to these images' ({names})"


def check_validation_samples(samples: list[Sample], model_classes: list[str], spec: str) -> None:
    """Refuse a labelled validation set that cannot calibrate every class of the model, before any work.

    Its classes must be the model's (a class the model does not know is named; one of the model's that it
    lacks is :func:`check_partial`'s to judge); each needs a normal image, an anomalous one, and an anomalous one with a mask
    (the pixel threshold; with ``data.missing_masks=image_only`` the others count for the image
    threshold only).
    """
    found = sorted({s.category for s in samples})
    unknown = [c for c in found if c not in model_classes]
    if unknown:
        raise DataError(
            f"--val-data {spec!r} has class(es) the model does not know: {', '.join(unknown)}; the model's "
            f"classes are {', '.join(model_classes)} (a class is '<kind>/<folder>', so the validation "
            "data must use the same spec kind and category folder names)"
        )
    for c in found:
        mine = [s for s in samples if s.category == c]
        if not any(s.label == 0 for s in mine):
            raise DataError(
                f"--val-data {spec!r}, class {c!r}: no normal image (test/good); a labelled threshold "
                "needs normal and defect images"
            )
        if not any(s.label == 1 for s in mine):
            raise DataError(
                f"--val-data {spec!r}, class {c!r}: no defect image (test/<defect>); a labelled threshold "
                "needs normal and defect images"
            )
        if not any(s.label == 1 and s.has_mask for s in mine):
            raise DataError(
                f"--val-data {spec!r}, class {c!r}: no defect image with a mask (ground_truth/); the "
                "pixel threshold needs defect pixels"
            )


# The coarse weights calibration.choose_map_weights chooses among (EXPERIMENTS #132, #136).
MAP_WEIGHT_GRID: tuple[float, ...] = (0.0, 0.2, 0.35, 0.5, 0.65, 0.8, 1.0)


def check_map_weights_possible(model: VPDM, model_classes: list[str]) -> None:
    """Refuse calibration.choose_map_weights for a model without a row of term statistics per class (the
    scoring it needs is checked with the config, :meth:`VPDMConfig.validate`)."""
    rows = int(model.term_mean.shape[0])
    if rows != len(model_classes):
        raise ConfigError(
            f"calibration.choose_map_weights needs the model's term statistics per class ({rows} row(s) for "
            f"{len(model_classes)} class(es)): a model whose fine prototypes do not know their classes cannot "
            "tell an image's class, so it has no per-class weight to choose"
        )


def choose_map_weights(
    model: VPDM,
    config: VPDMConfig,
    split,
    model_classes: list[str],
    truth: tuple[np.ndarray, np.ndarray, list[str]],
    *,
    progress: bool = False,
) -> dict[str, float]:
    """For each class of a labelled validation split, the coarse map weight (:attr:`VPDM.map_weight`) of
    :data:`MAP_WEIGHT_GRID` with the highest pixel AUROC on its images with masks (ties: the one nearest the
    plain mean's); set in ``model``. Classes the split lacks keep their weight (the plain mean's if none was
    chosen before). The map is linear in the weight, so two scoring passes (all coarse, all fine) serve every
    weight. ``truth``: the split's masks, whether each is known, and each image's class. Returns the chosen weight
    per class of the split."""
    from vpdm.evaluation.evaluator import score_with_config
    from vpdm.evaluation.metrics import pixel_auroc

    check_map_weights_possible(model, model_classes)
    masks, known, categories = truth
    rows = len(model_classes)
    plain = len(config.scoring.pools) / (len(config.scoring.pools) + len(config.scoring.fine_pools))
    weights = (
        model.map_weight.detach().cpu().clone() if model.map_weight.numel() == rows else torch.full((rows,), plain)
    )
    maps = {}
    for w in (0.0, 1.0):
        model.set_map_weights(torch.full((rows,), w))
        maps[w] = score_with_config(model, split.features, config, progress)[1].numpy()
    chosen = {}
    for c in sorted(set(categories)):
        idx = [i for i, x in enumerate(categories) if x == c and known[i]]
        values = [pixel_auroc(masks[idx], w * maps[1.0][idx] + (1 - w) * maps[0.0][idx]) for w in MAP_WEIGHT_GRID]
        best = max(values)
        chosen[c] = min((w for w, v in zip(MAP_WEIGHT_GRID, values) if v >= best), key=lambda w: abs(w - plain))
        weights[model_classes.index(c)] = chosen[c]
    model.set_map_weights(weights)
    return chosen


def calibrate_labelled(
    model: VPDM,
    config: VPDMConfig,
    split,
    method: str,
    *,
    source: str = "",
    progress: bool = False,
    model_classes: list[str] | None = None,
) -> Calibration:
    """Score a labelled validation split (:class:`vpdm.training.engine.SplitFeatures` of normal and defect images
    with masks) and choose each class's thresholds by ``method`` (``"f1"`` or ``"recall"``); with
    ``calibration.choose_map_weights``, first each class's map weight (:func:`choose_map_weights`; the model's
    classes, ``model_classes``, name its rows)."""
    from vpdm.evaluation.evaluator import ground_truth, pixel_known, score_with_config

    if method not in LABELLED_METHODS:
        raise ConfigError(f"labelled calibration method must be one of {', '.join(LABELLED_METHODS)}, got {method!r}")
    labels, masks, categories = ground_truth(split.dataset)  # the masks decoded once, for the weights too
    known = pixel_known(split.dataset)
    if config.calibration.choose_map_weights:
        if model_classes is None:
            raise ConfigError("calibration.choose_map_weights: the model's classes are needed to name its rows")
        chosen = choose_map_weights(model, config, split, model_classes, (masks, known, categories), progress=progress)
        # in the source, which every summary of the thresholds prints and the checkpoint keeps
        source = f"{source}; map weights (coarse) chosen on it: " + ", ".join(f"{c} {w:g}" for c, w in chosen.items())
    scores, maps = score_with_config(model, split.features, config, progress)
    if maps.shape[-2:] != masks.shape[-2:]:
        raise DataError(f"validation masks are {tuple(masks.shape[-2:])} px but the maps {tuple(maps.shape[-2:])}")
    hist = assignment_histograms(model, split.features, config.train.batch_size)
    classes, histograms = {}, {}
    for c in sorted(set(categories)):
        idx = [i for i, x in enumerate(categories) if x == c]
        classes[c] = ClassThresholds.from_labelled(
            scores[idx],
            labels[idx],
            maps[idx],
            masks[idx],
            known[idx],
            method,
            target_recall=config.calibration.target_recall,
            category=c,
        )
        histograms[c] = hist[torch.tensor(idx)].mean(dim=0)
    return Calibration(
        config.calibration.false_alarm_rate,
        classes,
        histograms,
        source,
        settings_of(config),
        method=method,
        target_recall=config.calibration.target_recall if method == "recall" else None,
    )


def validation_samples(spec: str, config: VPDMConfig, model_classes: list[str]) -> list[Sample]:
    """List and check the labelled validation set ``spec`` (its test split) for a model of ``model_classes``:
    paths, masks and mask sizes (:func:`vpdm.data.layouts.list_samples`), :func:`check_validation_samples`, then every
    image and mask decoded."""
    from vpdm.data.dataset import check_images
    from vpdm.data.layouts import list_samples

    samples = list_samples(spec, "test", config.data.missing_masks)
    check_validation_samples(samples, list(model_classes), spec)
    check_images(samples)  # every image and mask decoded before any forward pass
    return samples


def check_partial(
    previous: Calibration | None,
    classes: list[str],
    model_classes: list[str],
    method: str,
    config: VPDMConfig,
    data: str,
) -> list[str]:
    """Before any work: the classes a calibration of ``classes`` (from ``data``, as named in messages) keeps
    from ``previous`` (the checkpoint's): every other class of the model, or of the previous calibration.

    A class left without thresholds would be judged by another class's without a word, so the kept
    classes need a previous calibration by the same rule (method, false-alarm rate or target recall,
    and the same sampling and scoring settings); otherwise :class:`ConfigError` naming them and why.
    """
    from vpdm.decision.postprocess import settings_differ

    universe = list(dict.fromkeys([*model_classes, *(previous.classes if previous else [])]))
    rest = [c for c in universe if c not in classes]
    if not rest:
        return []
    lacking = f"{data} lacks class(es) of the model: {', '.join(rest)}"
    if previous is None:
        raise ConfigError(
            f"{lacking}, and the checkpoint has no thresholds to keep for them: give data of every "
            f"class ({', '.join(universe)}), or they would be judged by another class's thresholds"
        )
    unknown = [c for c in rest if c not in previous.classes]
    if unknown:
        raise ConfigError(
            f"{lacking}, and the checkpoint's calibration has none for {', '.join(unknown)}: give data "
            "of those classes too"
        )
    rate, recall = config.calibration.false_alarm_rate, config.calibration.target_recall
    same = previous.method == method and (
        (method == "quantile" and previous.false_alarm_rate == rate)
        or (method == "recall" and previous.target_recall == recall)
        or method == "f1"
    )
    differ = settings_differ(previous, config)
    if not same or differ:
        now = {"quantile": f"quantile at false-alarm rate {rate:g}", "recall": f"recall {recall:g}", "f1": "f1"}[method]
        why = (
            f"settings {', '.join(differ)} differ"
            if same
            else f"they were made by {previous.describe()}, this calibration by {now}"
        )
        raise ConfigError(
            f"{lacking}; their thresholds can be kept only beside ones made the same way, but {why}: "
            f"give data of every class ({', '.join(universe)}), or use the same rule"
        )
    return rest


def merge_calibration(new: Calibration, previous: Calibration, kept: list[str]) -> Calibration:
    """``new``'s classes recalibrated, ``kept`` ones (:func:`check_partial`) as ``previous`` had them; the source
    says which images made which."""
    classes = {c: new.classes[c] if c in new.classes else previous.classes[c] for c in sorted({*new.classes, *kept})}
    histograms = {
        c: new.histograms[c] if c in new.histograms else previous.histograms[c]
        for c in classes
        if c in new.histograms or c in previous.histograms
    }
    source = (
        f"{new.source or 'unrecorded images'} for {', '.join(sorted(new.classes))}; kept from the previous "
        f"calibration ({previous.source or 'unrecorded images'}) for {', '.join(kept)}"
    )
    return Calibration(new.false_alarm_rate, classes, histograms, source, new.settings, new.method, new.target_recall)
