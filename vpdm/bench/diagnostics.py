"""Diagnostics that explain a VPDM result: how pure the condition is, how well the model reconstructs
normal features, how its x0 error grows with t, and how much of a defect passes into the
reconstruction.

Every function works on cached features and a trained :class:`~vpdm.model.vpdm_model.VPDM`; none trains or
changes the model. ``python -m vpdm.bench --diagnose`` writes their output beside the metrics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vpdm.model.config import SamplingConfig
from vpdm.model.scoring import ScoringConfig
from vpdm.model.vpdm_model import VPDM


@torch.no_grad()
def prototype_owners(
    model: VPDM, train_features: Tensor, train_class: Tensor, neighbours: int = 5, batch_size: int = 256
) -> Tensor:
    """Class of each prototype: the majority class of its ``neighbours`` nearest training samples
    (images, or vague positions for local prototypes; the OT cost); ties go to the nearest one's class.
    Shape (K,)."""
    protos = model.prototypes
    costs, sample_class = [], []
    for start in range(0, len(train_features), batch_size):
        x = model.normalise(train_features[start : start + batch_size])
        flat = protos.samples(x)
        costs.append(protos.cost(flat))
        per_image = flat.shape[0] // x.shape[0]
        sample_class.append(train_class[start : start + batch_size].repeat_interleave(per_image))
    cost = torch.cat(costs)  # samples x K
    train_class = torch.cat(sample_class)
    k = min(neighbours, cost.shape[0])
    nearest = cost.topk(k, dim=0, largest=False).indices  # k x K, nearest first
    classes = train_class[nearest]  # k x K
    owners = []
    for j in range(classes.shape[1]):
        counts = torch.bincount(classes[:, j])
        best = torch.nonzero(counts == counts.max()).flatten()
        owners.append(int(classes[0, j]) if int(classes[0, j]) in best.tolist() else int(best[0]))
    return torch.tensor(owners, dtype=torch.long)


@torch.no_grad()
def assignment_weights(model: VPDM, features: Tensor, batch_size: int = 64) -> Tensor:
    """Assignment weights over the prototypes as inference computes them: N x P x K, P = 1 for
    whole-image prototypes and the number of vague positions for local ones."""
    was = model.prototypes.training
    model.prototypes.eval()
    try:
        out = []
        for s in range(0, len(features), batch_size):
            chunk = features[s : s + batch_size]
            protos = model.prototypes
            out.append(protos.weights(protos.samples(model.normalise(chunk))).reshape(chunk.shape[0], -1, protos.count))
    finally:
        model.prototypes.train(was)
    return torch.cat(out)


@torch.no_grad()
def condition_report(
    model: VPDM,
    train_features: Tensor,
    train_class: Tensor,
    features: Tensor,
    classes: Tensor,
    categories: Sequence[str],
) -> dict[str, dict[str, float]]:
    """Per class: purity (share of the assignment weight on prototypes owned by the image's own
    class), entropy of the assignment (nats; uniform = log K), weight of the top prototype, and how
    many prototypes the class owns."""
    owners = prototype_owners(model, train_features, train_class)
    weights = assignment_weights(model, features)  # N x P x K
    k = weights.shape[-1]
    entropy = -(weights * weights.clamp_min(1e-30).log()).sum(-1).mean(1)
    purity = (weights * (owners.view(1, 1, -1) == classes.view(-1, 1, 1))).sum(-1).mean(1)
    report: dict[str, dict[str, float]] = {}
    for c, name in enumerate(categories):
        idx = classes == c
        if not bool(idx.any()):
            continue
        report[name] = {
            "purity": float(purity[idx].mean()),
            "entropy_nats": float(entropy[idx].mean()),
            "max_entropy_nats": math.log(k),
            "top_weight": float(weights[idx].max(-1).values.mean()),
            "prototypes_owned": int((owners == c).sum()),
        }
    return report


@torch.no_grad()
def x0_error_by_t(
    model: VPDM, features: Tensor, timesteps: Sequence[int], seed: int = 0, batch_size: int = 64
) -> dict[int, float]:
    """Mean squared x0-prediction error per feature value (normalised space) of one denoiser call at
    each paper step t (1-based), with fixed noise, on ``features`` (held-out normal images). For
    reference, predicting x0 = yhat scores the condition's own error (reported as t = 0)."""
    out: dict[int, float] = {}
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(features.shape, generator=g)
    cond_err, total = 0.0, 0
    errs = {t: 0.0 for t in timesteps}
    for s in range(0, len(features), batch_size):
        x0 = model.normalise(features[s : s + batch_size])
        yhat = model.condition(features[s : s + batch_size])
        copy = model.inference_copy(x0)
        cond_err += float((x0 - yhat).pow(2).sum())
        total += x0.numel()
        for t in timesteps:
            tt = torch.full((x0.shape[0],), t - 1, dtype=torch.long)
            x_t = model.diffusion.q_sample(x0, yhat, tt, noise[s : s + batch_size])
            errs[t] += float((model.predict_x0(x_t, yhat, tt, copy=copy) - x0).pow(2).sum())
    out[0] = cond_err / total
    out.update({t: v / total for t, v in errs.items()})
    return out


def leak_report(
    maps: np.ndarray, masks: np.ndarray, labels: np.ndarray, categories: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Per class, on the anomalous test images: mean map value inside the defect masks, outside them,
    and their ratio (high = the defect is not reconstructed; near 1 = it passes through, the
    "identical shortcut"); also the mean map value of normal test images."""
    cats = np.asarray(categories)
    out: dict[str, dict[str, float]] = {}
    for name in sorted(set(categories)):
        idx = cats == name
        bad = idx & (labels == 1)
        good = idx & (labels == 0)
        inside = float(maps[bad][masks[bad]].mean()) if masks[bad].any() else math.nan
        outside = float(maps[bad][~masks[bad]].mean()) if bad.any() else math.nan
        out[name] = {
            "inside_defects": inside,
            "outside_defects": outside,
            "inside_over_outside": inside / outside if outside and not math.isnan(outside) else math.nan,
            "normal_images": float(maps[good].mean()) if good.any() else math.nan,
        }
    return out


@torch.no_grad()
def normal_reconstruction_error(
    model: VPDM,
    features: Tensor,
    sampling: SamplingConfig,
    scoring: ScoringConfig,
    classes: Tensor,
    categories: Sequence[str],
    batch_size: int = 32,
) -> dict[str, dict[str, float]]:
    """Feature-resolution anomaly map of normal images, per class: mean and 99th percentile."""
    maps = torch.cat(
        [
            model.anomaly_maps(features[s : s + batch_size], sampling, scoring)
            for s in range(0, len(features), batch_size)
        ]
    )
    out: dict[str, dict[str, float]] = {}
    for c, name in enumerate(categories):
        m = maps[classes == c]
        if m.numel():
            out[name] = {"mean": float(m.mean()), "p99": float(m.flatten().quantile(0.99))}
    return out


def summarise(report: dict[str, dict[str, Any]], key: str) -> float:
    """Mean of ``key`` over the classes of a per-class report (NaN skipped)."""
    values = [v[key] for v in report.values() if not (isinstance(v[key], float) and math.isnan(v[key]))]
    return float(np.mean(values)) if values else math.nan
