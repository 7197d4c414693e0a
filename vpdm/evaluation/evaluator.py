"""Scoring a test split with a trained model and computing its metrics."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from vpdm.config.schema import ScoringConfig, VPDMConfig
from vpdm.data.dataset import AnomalyDataset
from vpdm.evaluation.metrics import compute_metrics
from vpdm.model.config import SamplingConfig
from vpdm.model.vpdm_model import VPDM
from vpdm.training.engine import SplitFeatures

# -- evaluation ----------------------------------------------------------------------------------


@torch.no_grad()
def score_features(
    model: VPDM,
    features: Tensor,
    *,
    sampling: SamplingConfig,
    scoring: ScoringConfig,
    map_size: int,
    batch_size: int = 32,
    progress: bool = True,
    precision: str = "fp32",
) -> tuple[Tensor, Tensor]:
    """Image scores (N,) and anomaly maps (N x map_size x map_size) for cached features, on the model's
    device; ``precision`` (``inference.precision``) is the denoiser's autocast."""
    model.eval()
    device = next(model.parameters()).device
    scores, maps = [], []
    for start in tqdm(range(0, len(features), batch_size), desc="scoring", disable=not progress, unit="batch"):
        batch_scores, up = model.detect(
            features[start : start + batch_size].to(device), sampling, scoring, map_size, precision=precision
        )
        scores.append(batch_scores.cpu())
        maps.append(up.cpu())
    return torch.cat(scores), torch.cat(maps)


def score_with_config(
    model: VPDM, features: Tensor, config: VPDMConfig, progress: bool = True
) -> tuple[Tensor, Tensor]:
    """:func:`score_features` with a run's own sampling, scoring, map size, batch size and precision."""
    return score_features(
        model,
        features,
        sampling=config.sampling,
        scoring=config.scoring,
        map_size=config.scoring.map_size or config.backbone.image_size,
        batch_size=config.train.batch_size,
        progress=progress,
        precision=config.inference.precision,
    )


@dataclass
class Evaluation:
    metrics: dict[str, Any]
    scores: np.ndarray
    maps: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    categories: list[str]
    seconds: float
    # Anomalous images without a mask (data.missing_masks=image_only): in the image metrics only.
    pixel_left_out: list[str] = field(default_factory=list)


def ground_truth(dataset: AnomalyDataset) -> tuple[np.ndarray, np.ndarray, list[str]]:
    labels = np.array([s.label for s in dataset.samples], dtype=np.int64)
    masks = np.stack([dataset.mask_array(i) for i in range(len(dataset))]).astype(bool)
    return labels, masks, [s.category for s in dataset.samples]


def pixel_known(dataset: AnomalyDataset) -> np.ndarray:
    """Per image: is its pixel ground truth known? False for an anomalous image without a mask."""
    return np.array([s.has_mask for s in dataset.samples], dtype=bool)


def evaluate_maps(scores: np.ndarray, maps: np.ndarray, dataset: AnomalyDataset, seconds: float = 0.0) -> Evaluation:
    """Field metrics of any detector's scores/maps against the dataset's labels and masks.

    Images whose mask is unknown count in the image metrics only; ``pixel_left_out`` names them.
    """
    labels, masks, cats = ground_truth(dataset)
    known = pixel_known(dataset)
    metrics = compute_metrics(labels, scores, masks, maps, cats, pixel_known=known)
    left_out = [str(s.image_path) for s, k in zip(dataset.samples, known) if not k]
    return Evaluation(metrics, scores, maps, labels, masks, cats, seconds, left_out)


def evaluate(model: VPDM, config: VPDMConfig, test: SplitFeatures, progress: bool = True) -> Evaluation:
    from vpdm.training.preflight import apply_threads

    apply_threads(config)
    start = time.perf_counter()
    scores, maps = score_with_config(model, test.features, config, progress)
    seconds = time.perf_counter() - start
    return evaluate_maps(scores.numpy(), maps.numpy(), test.dataset, seconds)


def format_metrics(metrics: dict[str, Any]) -> str:
    """A fixed-width table: one row per class and the mean, in percent."""
    keys = ["image_auroc", "pixel_auroc", "aupro", "pixel_ap", "image_f1_max"]
    if "image_precision" in metrics["mean"]:  # decisions at the calibrated threshold (vpdm.decision.postprocess)
        keys += ["image_precision", "image_recall", "image_f1", "image_false_alarm_rate"]
    rows = list(metrics["per_class"].items()) + [("mean", metrics["mean"])]
    width = max(12, *(len(name) for name, _ in rows))
    short = {
        "image_precision": "precision",
        "image_recall": "recall",
        "image_f1": "f1@thr",
        "image_false_alarm_rate": "false_alarm",
    }
    lines = [f"{'class':<{width}} " + " ".join(f"{short.get(k, k):>12}" for k in keys)]
    for name, values in rows:
        cells = []
        for key in keys:
            v = values.get(key, float("nan"))
            cells.append(f"{'-':>12}" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:>12.2f}")
        lines.append(f"{name:<{width}} " + " ".join(cells))
    return "\n".join(lines)
