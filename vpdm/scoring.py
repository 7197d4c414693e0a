"""From feature reconstruction error to anomaly maps and image scores.

Shared by VPDM and any other feature-space detector (the benchmark's PatchCore baseline uses the
same functions), so that differences in the metrics come from the models, not from post-processing.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vpdm.errors import ConfigError


DISTANCES = ("l2", "cosine")
IMAGE_SCORES = ("max_pool", "top_k")
FEATURE_SPACES = ("normalised", "raw")


@dataclass
class ScoringConfig:
    """How a reconstruction becomes an anomaly map and an image score.

    The paper: L2 over all channels of the (standardised) features, image score = max of the
    average-pooled map. ``distance="cosine"`` is ``1 - cos`` over channels, as Dinomaly, UniAD and
    most feature-reconstruction detectors score; ``per_stage`` computes the distance within each
    backbone stage and averages the stage maps (each stage counts once, whatever its width; L2 per
    stage is the root mean square over its channels). ``feature_space="raw"`` compares the backbone's
    own features (the reconstruction mapped back through the training-set standardisation).
    ``image_score="top_k"`` is the mean of the ``top_k_percent`` largest map pixels (Dinomaly: 1 %).
    """

    blur_sigma: float = 4.0  # Gaussian blur of the upsampled map, in output pixels (common practice: 4 at 224px); 0 = off
    pool_size: int = 16  # image score = max of the map average-pooled with this window (output pixels)
    map_size: int | None = None  # output map size; None = the image size
    distance: str = "l2"
    per_stage: bool = False
    feature_space: str = "normalised"
    image_score: str = "max_pool"
    top_k_percent: float = 1.0
    # Average both the features and the reconstruction over this odd local window (stride 1) before the
    # distance, as PatchCore aggregates a patch's neighbourhood: compares local structure, not the
    # pixel-level detail that no model can predict. 1 = off (the paper).
    aggregate: int = 1
    # Compare the means of non-overlapping p x p blocks (stride p) for each p here, upsample each distance
    # map bilinearly back, and average them weighted by p (under independent per-position noise a block
    # mean's distance shrinks as 1/p, so p * d_p puts every scale on the same footing). With p = the vague
    # step's N the comparison is at the condition's own scale, where the prototypes say what is normal;
    # smaller blocks localise. (1,) = the paper: every position on its own.
    pools: tuple[int, ...] = (1, 4)
    # The block sides the image score is taken from, when it should not come from the map itself
    # (None): the image decision wants the scale at which the condition says what is normal (the
    # vague step's N: a whole block must look abnormal), localisation wants finer blocks. The map
    # and the image score share one reconstruction; only the distance is computed twice.
    image_pools: tuple[int, ...] | None = (4,)

    def validate(self) -> None:
        if not (self.blur_sigma >= 0 and math.isfinite(self.blur_sigma)):
            raise ConfigError(f"scoring.blur_sigma must be a finite number >= 0, got {self.blur_sigma!r}")
        if not isinstance(self.pool_size, int) or self.pool_size < 1:
            raise ConfigError(f"scoring.pool_size must be an integer >= 1, got {self.pool_size!r}")
        if self.map_size is not None and (not isinstance(self.map_size, int) or self.map_size < 1):
            raise ConfigError(f"scoring.map_size must be a positive integer or null, got {self.map_size!r}")
        if self.distance not in DISTANCES:
            raise ConfigError(f"scoring.distance must be one of {DISTANCES}, got {self.distance!r}")
        if not isinstance(self.per_stage, bool):
            raise ConfigError(f"scoring.per_stage must be true or false, got {self.per_stage!r}")
        if self.feature_space not in FEATURE_SPACES:
            raise ConfigError(f"scoring.feature_space must be one of {FEATURE_SPACES}, got {self.feature_space!r}")
        if self.image_score not in IMAGE_SCORES:
            raise ConfigError(f"scoring.image_score must be one of {IMAGE_SCORES}, got {self.image_score!r}")
        if not (isinstance(self.top_k_percent, (int, float)) and math.isfinite(self.top_k_percent)
                and 0 < self.top_k_percent <= 100):
            raise ConfigError(f"scoring.top_k_percent must be a number in (0, 100], got {self.top_k_percent!r}")
        if not isinstance(self.aggregate, int) or isinstance(self.aggregate, bool) or self.aggregate < 1 \
                or self.aggregate % 2 == 0:
            raise ConfigError(f"scoring.aggregate must be an odd integer >= 1, got {self.aggregate!r}")
        if (not isinstance(self.pools, (tuple, list)) or not self.pools
                or any(not isinstance(p, int) or isinstance(p, bool) or p < 1 for p in self.pools)
                or len(set(self.pools)) != len(self.pools)):
            raise ConfigError(f"scoring.pools must be a non-empty list of distinct integers >= 1, got {self.pools!r}")
        if self.image_pools is not None and (
                not isinstance(self.image_pools, (tuple, list)) or not self.image_pools
                or any(not isinstance(p, int) or isinstance(p, bool) or p < 1 for p in self.image_pools)
                or len(set(self.image_pools)) != len(self.image_pools)):
            raise ConfigError("scoring.image_pools must be null (the map's own pools) or a non-empty list of distinct "
                              f"integers >= 1, got {self.image_pools!r}")


def local_average(features: Tensor, window: int) -> Tensor:
    """Mean over a ``window`` x ``window`` neighbourhood (odd, stride 1, same size; borders average
    the positions that exist)."""
    if window <= 1:
        return features
    return F.avg_pool2d(features, window, stride=1, padding=window // 2, count_include_pad=False)


def feature_distance(
    x0: Tensor, x0_rec: Tensor, distance: str = "l2", groups: tuple[int, ...] | None = None
) -> Tensor:
    """Anomaly map from B x C x H x W features and their reconstruction -> B x H x W.

    ``groups=None``: over all channels at once, ``||x0 - x0_rec||_2`` (the paper) or ``1 - cos``.
    ``groups`` (channel counts summing to C, one per backbone stage): the distance within each group
    (L2 as the root mean square over the group's channels), averaged over the groups.
    """
    if distance not in DISTANCES:
        raise ConfigError(f"distance must be one of {DISTANCES}, got {distance!r}")
    if groups is None:
        if distance == "l2":
            return torch.linalg.vector_norm(x0 - x0_rec, dim=1)
        return 1.0 - F.cosine_similarity(x0, x0_rec, dim=1, eps=1e-8)
    if sum(groups) != x0.shape[1] or any(g < 1 for g in groups):
        raise ConfigError(f"channel groups {groups} do not add up to the {x0.shape[1]} feature channels")
    maps = []
    for a, b in zip(torch.split(x0, list(groups), dim=1), torch.split(x0_rec, list(groups), dim=1)):
        if distance == "l2":
            maps.append((a - b).pow(2).mean(dim=1).sqrt())
        else:
            maps.append(1.0 - F.cosine_similarity(a, b, dim=1, eps=1e-8))
    return torch.stack(maps).mean(dim=0)


def distance_map(features: Tensor, reconstruction: Tensor, config: ScoringConfig,
                 groups: tuple[int, ...] | None = None, pools: tuple[int, ...] | None = None) -> Tensor:
    """B x C x H x W features and reconstruction -> B x H x W map: local averages (``aggregate``), then
    for each block side p of ``pools`` (default: ``config.pools``) the distance between p x p block
    means, upsampled bilinearly to H x W; the maps are averaged with weights p (p = 1: every position
    on its own, unweighted)."""
    pools = tuple(config.pools if pools is None else pools)
    a, b = local_average(features, config.aggregate), local_average(reconstruction, config.aggregate)
    size = a.shape[-2:]
    total = None
    for p in pools:
        if p <= 1:
            d = feature_distance(a, b, config.distance, groups)
        else:
            if size[0] % p or size[1] % p:
                raise ConfigError(f"scoring.pools: {p} must divide the feature size {tuple(size)}")
            d = feature_distance(F.avg_pool2d(a, p), F.avg_pool2d(b, p), config.distance, groups)
            d = p * F.interpolate(d.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
        total = d if total is None else total + d
    return total / len(pools)


def scores_and_maps(features: Tensor, reconstruction: Tensor, config: ScoringConfig, size: int,
                    groups: tuple[int, ...] | None = None,
                    postprocess: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Image scores (B,) and post-processed anomaly maps (B x size x size): the map from ``pools``; the
    image score from the map itself, or, with ``image_pools`` set (and different), from the distance
    at those block sides, post-processed the same way. ``postprocess`` replaces
    :func:`postprocess_maps` (the ONNX export passes its precomputed matrices)."""
    if postprocess is None:
        postprocess = functools.partial(postprocess_maps, size=size, blur_sigma=config.blur_sigma)
    maps = postprocess(distance_map(features, reconstruction, config, groups))
    if config.image_pools is None or tuple(config.image_pools) == tuple(config.pools):
        return score_maps(maps, config), maps
    image_maps = distance_map(features, reconstruction, config, groups, pools=tuple(config.image_pools))
    return score_maps(postprocess(image_maps), config), maps


def gaussian_kernel1d(sigma: float, device=None) -> Tensor:
    radius = max(1, int(4.0 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of B x H x W maps, reflect padding (no darkening at the borders)."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma, maps.device)
    r = k.numel() // 2
    x = maps.unsqueeze(1)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
    return x.squeeze(1)


@functools.lru_cache(maxsize=64)
def _upsample_blur_matrix(n_in: int, size: int, sigma: float, device: str, dtype: torch.dtype) -> Tensor:
    """``size x n_in`` matrix M of 1-D linear upsampling (align_corners=False) followed by the
    reflect-padded Gaussian blur: both are linear and separable, so a map X becomes M X M^T."""
    eye = torch.eye(n_in, dtype=torch.float64)
    up = F.interpolate(eye.unsqueeze(1), size=size, mode="linear", align_corners=False).squeeze(1).T  # size x n_in
    if sigma > 0:
        k = gaussian_kernel1d(sigma).double()
        r = k.numel() // 2
        basis = F.pad(torch.eye(size, dtype=torch.float64).unsqueeze(1), (r, r), mode="reflect")
        blur = F.conv1d(basis, k.view(1, 1, -1)).squeeze(1).T  # column j = blurred unit vector e_j
        up = blur @ up
    return up.to(device=device, dtype=dtype)


def postprocess_maps(maps: Tensor, size: int, blur_sigma: float) -> Tensor:
    """Bilinear upsampling of feature-resolution maps (B x h x w) to ``size`` then optional blur.

    Computed as ``M_h X M_w^T`` with precomputed matrices (:func:`_upsample_blur_matrix`): the same
    result as ``F.interpolate`` + :func:`gaussian_blur` (tested), without the full-size convolutions,
    which cost more than a denoiser step on a CPU.
    """
    if maps.dtype not in (torch.float32, torch.float64):
        maps = maps.float()
    h, w = maps.shape[-2], maps.shape[-1]
    rows = _upsample_blur_matrix(h, size, float(blur_sigma), str(maps.device), maps.dtype)
    cols = rows if w == h else _upsample_blur_matrix(w, size, float(blur_sigma), str(maps.device), maps.dtype)
    return rows @ maps @ cols.T


def image_scores(maps: Tensor, pool_size: int, method: str = "max_pool", top_k_percent: float = 1.0) -> Tensor:
    """Image score from B x H x W maps: ``"max_pool"``, the max of the average-pooled map (robust to
    single hot pixels), or ``"top_k"``, the mean of the ``top_k_percent`` % largest pixels (at least one)."""
    if method == "top_k":
        flat = maps.flatten(1)
        k = max(1, int(round(int(flat.shape[1]) * top_k_percent / 100.0)))  # int(): a constant when traced (ONNX)
        return flat.topk(k, dim=1).values.mean(dim=1)
    if method != "max_pool":
        raise ConfigError(f"image score method must be one of {IMAGE_SCORES}, got {method!r}")
    k = min(pool_size, maps.shape[-1], maps.shape[-2])
    # The k x k box mean as a row mean then a column mean: the same numbers (float rounding aside)
    # for 2k instead of k^2 additions per pixel (at k = 16 on 224 px maps the 2-D pool cost more than
    # the denoiser step on a CPU).
    pooled = F.avg_pool2d(F.avg_pool2d(maps.unsqueeze(1), kernel_size=(1, k), stride=1), kernel_size=(k, 1), stride=1)
    return pooled.flatten(1).amax(dim=1)


def score_maps(maps: Tensor, config: ScoringConfig) -> Tensor:
    """Image scores of post-processed maps with the configured method."""
    return image_scores(maps, config.pool_size, config.image_score, config.top_k_percent)
