"""The PatchCore-style baseline, scored through the same post-processing and image score as VPDM."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from vpdm.bench.patchcore import PatchCore, PatchCoreConfig
from vpdm.model.scoring import ScoringConfig, postprocess_maps, score_maps

# PatchCore's own post-processing (its paper and anomalib): a Gaussian of sigma 4 px on the 224 px map. The bench
# scores PatchCore through VPDM's blur so that the comparison isolates the model; where the two differ it also
# reports PatchCore at this blur, so that a change of VPDM's blur can never flatter the comparison.
PATCHCORE_PUBLISHED_BLUR_SIGMA = 4.0


def fit_baseline(config: PatchCoreConfig, features: Tensor, device: torch.device) -> PatchCore:
    """A PatchCore memory bank of the training features."""
    pc = PatchCore(config, device=device)
    pc.fit(features)
    return pc


def _postprocess_batch(raw: Tensor, map_size: int, scoring: ScoringConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Image scores (VPDM's method), maps at ``map_size`` and the plain-max image scores of raw distance maps."""
    maps = postprocess_maps(raw, map_size, scoring.blur_sigma)
    return score_maps(maps, scoring), maps, maps.flatten(1).amax(dim=1)


def baseline_batch(
    pc: PatchCore, features: Tensor, map_size: int, scoring: ScoringConfig
) -> tuple[Tensor, Tensor, Tensor]:
    """Image scores (VPDM's method), maps at ``map_size`` and the plain-max image scores of one batch."""
    return _postprocess_batch(pc.anomaly_maps(features), map_size, scoring)


@torch.no_grad()
def baseline_raw_maps(pc: PatchCore, features: Tensor, batch: int) -> Tensor:
    """PatchCore's nearest-neighbour distance maps at the features' resolution (the costly part), batch by
    batch, so that several post-processings can share one search."""
    return torch.cat([pc.anomaly_maps(features[start : start + batch]) for start in range(0, len(features), batch)])


@torch.no_grad()
def score_baseline_maps(
    raw: Tensor, map_size: int, scoring: ScoringConfig, batch: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image scores, maps and plain-max scores of :func:`baseline_raw_maps`' maps, as numpy arrays."""
    scores, maps, plain = [], [], []
    for start in range(0, len(raw), batch):
        s, m, p = _postprocess_batch(raw[start : start + batch], map_size, scoring)
        scores.append(s.cpu())
        maps.append(m.cpu())
        plain.append(p.cpu())
    return torch.cat(scores).numpy(), torch.cat(maps).numpy(), torch.cat(plain).numpy()


def score_baseline(
    pc: PatchCore, features: Tensor, map_size: int, scoring: ScoringConfig, batch: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`baseline_batch` over all features, as numpy arrays."""
    return score_baseline_maps(baseline_raw_maps(pc, features, batch), map_size, scoring, batch)
