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


def baseline_batch(
    pc: PatchCore, features: Tensor, map_size: int, scoring: ScoringConfig
) -> tuple[Tensor, Tensor, Tensor]:
    """Image scores (VPDM's method), maps at ``map_size`` and the plain-max image scores of one batch."""
    maps = postprocess_maps(pc.anomaly_maps(features), map_size, scoring.blur_sigma)
    return score_maps(maps, scoring), maps, maps.flatten(1).amax(dim=1)


@torch.no_grad()
def score_baseline(
    pc: PatchCore, features: Tensor, map_size: int, scoring: ScoringConfig, batch: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`baseline_batch` over all features, as numpy arrays."""
    scores, maps, plain = [], [], []
    for start in range(0, len(features), batch):
        s, m, p = baseline_batch(pc, features[start : start + batch], map_size, scoring)
        scores.append(s.cpu())
        maps.append(m.cpu())
        plain.append(p.cpu())
    return torch.cat(scores).numpy(), torch.cat(maps).numpy(), torch.cat(plain).numpy()
