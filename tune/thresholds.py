"""Decision thresholds for a sweep trial's model, from the dataset's held-out normal images.

A sweep has no labelled validation data, so a trial calibrates as ``vpdm train`` does without
``--val-data``: the ``quantile`` method (:mod:`vpdm.decision.postprocess`) on normal images the model was not
trained on. Those are the bundle's validation images (:mod:`tune.features`), whose features are
already in the object store: calibrating costs one scoring pass over them, no backbone forward. The
thresholds go into the checkpoint, so the logged MLflow model (and a registered champion) answers
with ``pred_label`` / ``pred_mask`` of calibrated thresholds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vpdm.decision.postprocess import Calibration
from vpdm.errors import ConfigError

__all__ = ["calibrate_checkpoint", "decisions_on_test"]


def calibrate_checkpoint(path: str | Path, bundle: Any) -> tuple[Calibration | None, str]:
    """Calibrate the checkpoint at ``path`` on ``bundle``'s held-out normal images and store the thresholds in it.

    Returns ``(calibration, "")``, or ``(None, why)`` when it cannot be done (a class with fewer held-out
    images than a threshold needs, or a ``calibration.method`` that needs labelled data); the file is
    then left as it was.
    """
    from tune.features import as_tensor
    from vpdm.decision.calibration import calibrate
    from vpdm.inference.checkpoint import load_checkpoint, with_calibrated_buffers
    from vpdm.io import atomic_torch_save

    model, config, payload = load_checkpoint(path)
    try:
        config.calibration.resolve(labelled=False)
        categories = [bundle.categories[int(i)] for i in bundle.val_class]
        calibration = calibrate(
            model,
            config,
            as_tensor(bundle.val_features),
            categories,
            source=f"sweep validation hold-out {bundle.val_fraction:g} of train/good (seed {bundle.val_seed})",
            model_classes=list(bundle.categories),
        )
    except ConfigError as exc:
        return None, str(exc)
    payload = with_calibrated_buffers(payload, model)  # the term statistics the thresholds were set with
    payload["calibration"] = calibration.to_payload()
    payload["extra"] = {**(payload.get("extra") or {}), "calibration_images": int(len(bundle.val_features))}
    atomic_torch_save(payload, Path(path), what="checkpoint")
    return calibration, ""


def decisions_on_test(calibration: Calibration, bundle: Any, scores: np.ndarray) -> dict[str, Any]:
    """Precision, recall, F1 and false-alarm rate of the calibrated image thresholds on the test split
    (``scores``: the bundle's test images), per class and mean (:func:`vpdm.evaluation.metrics.decision_metrics`)."""
    from vpdm.decision.postprocess import PostProcessor
    from vpdm.evaluation.metrics import decision_metrics

    post = PostProcessor(calibration)
    thresholds = {c: post.image_threshold_for(c) for c in sorted(set(bundle.test_categories))}
    predicted = post.image_labels(scores, bundle.test_categories)
    doc = decision_metrics(bundle.test_labels, predicted, bundle.test_categories)
    doc["thresholds"] = thresholds
    return doc
