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
from vpdm.runtime.tracing import untraced

DISTANCES = ("l2", "cosine")
IMAGE_SCORES = ("max_pool", "top_k")
FEATURE_SPACES = ("normalised", "raw")
COMBINES = ("standardised", "weighted")
# Block sides whose normal statistics a model with standardised scores keeps, for the reconstruction and
# for the fine condition (those that divide the feature size), so every pools setting can be scored.
STAT_POOLS: tuple[int, ...] = (1, 2, 4, 8)


@dataclass
class ScoringConfig:
    """How a reconstruction becomes an anomaly map and an image score.

    The paper: L2 over all channels of the (standardised) features, image score = max of the
    average-pooled map. ``distance="cosine"`` is ``1 - cos`` over channels, as Dinomaly, UniAD and
    most feature-reconstruction detectors score. ``feature_space="raw"`` compares the backbone's
    own features (the reconstruction mapped back through the training-set standardisation).
    ``image_score="top_k"`` is the mean of the ``top_k_percent`` largest map pixels (Dinomaly: 1 %).
    """

    # Gaussian blur of the upsampled map, in output pixels; 0 = off. Common practice (and the paper preset) is
    # 4 at 224 px; 2 keeps more of the fine term's sharpness: AUPRO +0.4-0.5, pixel AP +0.4, small-defect
    # recall +0.9-1.2 over three seeds, no category's image or pixel AUROC below -0.2 (EXPERIMENTS #128).
    blur_sigma: float = 2.0
    pool_size: int = 16  # image score = max of the map average-pooled with this window (output pixels)
    map_size: int | None = None  # output map size; None = the image size
    distance: str = "l2"
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
    pools: tuple[int, ...] = (4,)
    # The block sides the image score is taken from, when it should not come from the map itself
    # (None): the image decision wants the scale at which the condition says what is normal (the
    # vague step's N: a whole block must look abnormal), localisation wants finer blocks. The map
    # and the image score share one reconstruction; only the distance is computed twice.
    image_pools: tuple[int, ...] | None = (4,)
    # The same for the distance between the features and the fine prototypes' condition (model.fine):
    # block sides in the map, and in the image score (None: the map's). [] = not used.
    fine_pools: tuple[int, ...] = (1,)
    fine_image_pools: tuple[int, ...] | None = (1, 4)
    # How the terms (one distance map per block side) become one map: "standardised" (each term minus the
    # mean and over the std of its values on normal training images of the image's class, then averaged:
    # the terms of the reconstruction and of the fine condition live on different scales, and a class of
    # textured parts is noisier than a class of plain ones) or "weighted" (the p-weighted mean of the raw
    # distances: under independent per-position noise a block mean's distance shrinks as 1/p).
    combine: str = "standardised"

    def validate(self) -> None:
        if not (self.blur_sigma >= 0 and math.isfinite(self.blur_sigma)):
            raise ConfigError(f"scoring.blur_sigma must be a finite number >= 0, got {self.blur_sigma!r}")
        if not isinstance(self.pool_size, int) or self.pool_size < 1:
            raise ConfigError(f"scoring.pool_size must be an integer >= 1, got {self.pool_size!r}")
        if self.map_size is not None and (not isinstance(self.map_size, int) or self.map_size < 1):
            raise ConfigError(f"scoring.map_size must be a positive integer or null, got {self.map_size!r}")
        if self.distance not in DISTANCES:
            raise ConfigError(f"scoring.distance must be one of {DISTANCES}, got {self.distance!r}")
        if self.feature_space not in FEATURE_SPACES:
            raise ConfigError(f"scoring.feature_space must be one of {FEATURE_SPACES}, got {self.feature_space!r}")
        if self.image_score not in IMAGE_SCORES:
            raise ConfigError(f"scoring.image_score must be one of {IMAGE_SCORES}, got {self.image_score!r}")
        if not (
            isinstance(self.top_k_percent, (int, float))
            and math.isfinite(self.top_k_percent)
            and 0 < self.top_k_percent <= 100
        ):
            raise ConfigError(f"scoring.top_k_percent must be a number in (0, 100], got {self.top_k_percent!r}")
        if (
            not isinstance(self.aggregate, int)
            or isinstance(self.aggregate, bool)
            or self.aggregate < 1
            or self.aggregate % 2 == 0
        ):
            raise ConfigError(f"scoring.aggregate must be an odd integer >= 1, got {self.aggregate!r}")
        for name in ("pools", "image_pools", "fine_pools", "fine_image_pools"):
            value = getattr(self, name)
            if value is None and name.endswith("image_pools"):
                continue
            if (
                not isinstance(value, (tuple, list))
                or any(not isinstance(p, int) or isinstance(p, bool) or p < 1 for p in value)
                or len(set(value)) != len(value)
            ):
                allowed = "null (the map's own) or a list" if name.endswith("image_pools") else "a list"
                raise ConfigError(f"scoring.{name} must be {allowed} of distinct integers >= 1, got {value!r}")
        if self.combine not in COMBINES:
            raise ConfigError(f"scoring.combine must be one of {COMBINES}, got {self.combine!r}")
        if not self.pools and not self.fine_pools:
            raise ConfigError("scoring.pools and scoring.fine_pools are both empty: the map needs at least one term")
        if not self.image_terms()[0] and not self.image_terms()[1]:
            raise ConfigError("scoring.image_pools and scoring.fine_image_pools leave the image score without a term")

    def image_terms(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Block sides of the image score's terms: (of the reconstruction, of the fine condition)."""
        coarse = self.pools if self.image_pools is None else self.image_pools
        fine = self.fine_pools if self.fine_image_pools is None else self.fine_image_pools
        return tuple(coarse), tuple(fine)


def local_average(features: Tensor, window: int) -> Tensor:
    """Mean over a ``window`` x ``window`` neighbourhood (odd, stride 1, same size; borders average
    the positions that exist)."""
    if window <= 1:
        return features
    return F.avg_pool2d(features, window, stride=1, padding=window // 2, count_include_pad=False)


def feature_distance(x0: Tensor, x0_rec: Tensor, distance: str = "l2") -> Tensor:
    """Anomaly map from B x C x H x W features and their reconstruction -> B x H x W: over all channels,
    ``||x0 - x0_rec||_2`` (the paper) or ``1 - cos``."""
    if distance not in DISTANCES:
        raise ConfigError(f"distance must be one of {DISTANCES}, got {distance!r}")
    if distance == "l2":
        # sqrt of the channel sum of squares: the same norm, several times faster than vector_norm over
        # the channel dimension of a channels-first map on a CPU
        return (x0 - x0_rec).square_().sum(dim=1).sqrt_()
    return 1.0 - F.cosine_similarity(x0, x0_rec, dim=1, eps=1e-8)


def term_map(features: Tensor, reconstruction: Tensor, p: int, config: ScoringConfig) -> Tensor:
    """One term of a map: after the local averages (``aggregate``), the distance between the p x p block
    means of B x C x H x W features and their reconstruction, upsampled bilinearly back to B x H x W
    (p = 1: every position on its own)."""
    size = features.shape[-2:]
    if p > 1 and (size[0] % p or size[1] % p):
        raise ConfigError(f"scoring.pools: {p} must divide the feature size {tuple(size)}")
    if config.distance == "l2":
        return l2_block_term(local_average(features - reconstruction, config.aggregate), p)
    a, b = local_average(features, config.aggregate), local_average(reconstruction, config.aggregate)
    if p <= 1:
        return feature_distance(a, b, config.distance)
    d = feature_distance(F.avg_pool2d(a, p), F.avg_pool2d(b, p), config.distance)
    return F.interpolate(d.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


def l2_block_term(difference: Tensor, p: int) -> Tensor:
    """:func:`term_map` for the L2 distance over all channels, from the (locally averaged) difference of the
    features and their reconstruction: block means are linear, so the difference is averaged once instead
    of both operands, and several terms of one reconstruction share it (``difference`` is not modified)."""
    if p <= 1:
        return difference.square().sum(dim=1).sqrt_()
    d = F.avg_pool2d(difference, p).square_().sum(dim=1).sqrt_()
    return F.interpolate(d.unsqueeze(1), size=difference.shape[-2:], mode="bilinear", align_corners=False).squeeze(1)


def distance_map(
    features: Tensor,
    reconstruction: Tensor,
    config: ScoringConfig,
    pools: tuple[int, ...] | None = None,
) -> Tensor:
    """B x C x H x W features and reconstruction -> B x H x W map: the :func:`term_map` of each block side p
    of ``pools`` (default: ``config.pools``), averaged with weights p (the ``weighted`` combination)."""
    pools = tuple(config.pools if pools is None else pools)
    return sum(p * term_map(features, reconstruction, p, config) for p in pools) / len(pools)


class TermMaps:
    """The term maps of one batch, each computed once when first asked for: ``terms(branch, p)`` is the
    :func:`term_map` of block side ``p`` against the reconstruction (``branch="coarse"``) or the fine
    prototypes' condition (``"fine"``). For L2 over all channels each branch's (locally averaged)
    difference is also computed once and shared by its block sides (:func:`l2_block_term`)."""

    def __init__(
        self,
        features: Tensor,
        reconstruction: Tensor,
        fine: Tensor | None,
        config: ScoringConfig,
    ) -> None:
        self.features, self.config = features, config
        self.others = {"coarse": reconstruction, "fine": fine}
        self.maps: dict[tuple[str, int], Tensor] = {}
        self.differences: dict[str, Tensor] = {}

    def __call__(self, branch: str, p: int) -> Tensor:
        if (branch, p) not in self.maps:
            other = self.others[branch]
            if self.config.distance == "l2":
                if branch not in self.differences:
                    self.differences[branch] = local_average(self.features - other, self.config.aggregate)
                self.maps[(branch, p)] = l2_block_term(self.differences[branch], p)
            else:
                self.maps[(branch, p)] = term_map(self.features, other, p, self.config)
        return self.maps[(branch, p)]


# The statistics of one term for each image of a batch: (mean, std), each of shape (B,).
TermStatistics = Callable[[str, int], tuple[Tensor, Tensor]]


def scores_and_maps(
    features: Tensor,
    reconstruction: Tensor,
    config: ScoringConfig,
    size: int,
    fine: Tensor | None = None,
    statistics: TermStatistics | None = None,
    map_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Image scores (B,) and post-processed anomaly maps (B x size x size).

    Terms are :func:`term_map` s of the reconstruction (``pools``) and, when the model has fine
    prototypes, of their condition ``fine`` (``fine_pools``). The map combines the map terms, the image
    score the image terms (:meth:`ScoringConfig.image_terms`; when they are the map's, the map itself):
    ``weighted`` as :func:`distance_map`, ``standardised`` as the mean of (term - mean) / std with the
    ``statistics(branch, p)`` of each image's class (``branch`` "coarse" or "fine"). ``map_weights`` ((B,) or
    (1,), standardised only): the map is ``w * mean(coarse z) + (1 - w) * mean(fine z)`` instead of the mean of
    all its terms, where it has terms of both (the image score's own terms keep their mean)."""
    postprocess = functools.partial(postprocess_maps, size=size, blur_sigma=config.blur_sigma)
    if fine is None and (config.fine_pools or config.image_terms()[1]):
        raise ConfigError(
            "scoring.fine_pools / fine_image_pools need the fine prototypes' condition "
            "(model.fine.num_prototypes > 0); set them to [] for a model without"
        )
    if config.combine == "standardised" and statistics is None:
        raise ConfigError(
            "scoring.combine=standardised needs the model's normal statistics of every term "
            "(fitted after training); use scoring.combine=weighted for a model without them"
        )
    term = TermMaps(features, reconstruction, fine, config)

    def standardised(branch: str, pools: tuple[int, ...]) -> Tensor:
        total = None
        for p in pools:
            mean, std = statistics(branch, p)
            z = (term(branch, p) - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
            total = z if total is None else total + z
        return total

    def combined(coarse: tuple[int, ...], fine_pools: tuple[int, ...], weights: Tensor | None = None) -> Tensor:
        keys = [("coarse", p) for p in coarse] + [("fine", p) for p in fine_pools]
        if config.combine == "weighted":
            return sum(p * term(branch, p) for branch, p in keys) / len(keys)
        if weights is not None and coarse and fine_pools:
            w = weights.view(-1, 1, 1)
            coarse_mean = standardised("coarse", coarse) / len(coarse)
            return w * coarse_mean + (1 - w) * standardised("fine", fine_pools) / len(fine_pools)
        parts = [standardised(branch, pools) for branch, pools in (("coarse", coarse), ("fine", fine_pools)) if pools]
        return sum(parts) / len(keys)

    map_terms = (tuple(config.pools), tuple(config.fine_pools))
    raw = combined(*map_terms, weights=map_weights)
    maps = postprocess(raw)
    image_terms = config.image_terms()
    if image_terms != map_terms:
        raw = combined(*image_terms)
    elif config.image_score != "max_pool":
        return score_maps(maps, config), maps
    return scores_of_raw_maps(raw, size, config), maps


def scores_of_raw_maps(raw: Tensor, size: int, config: ScoringConfig) -> Tensor:
    """:func:`score_maps` of ``postprocess_maps(raw, size, blur_sigma)`` from the feature-resolution maps (B x h x
    w). ``max_pool`` never makes the full-size map: upsampling, blur and the box mean are all linear and
    separable, so the box-mean map is ``R_h X R_w^T`` with precomputed matrices (:func:`_box_matrix`), the same
    numbers (float rounding aside) for a 4x smaller product and no box pass over size x size pixels."""
    if config.image_score != "max_pool":
        return score_maps(postprocess_maps(raw, size, config.blur_sigma), config)
    if raw.dtype not in (torch.float32, torch.float64):
        raw = raw.float()
    h, w = int(raw.shape[-2]), int(raw.shape[-1])
    k = min(config.pool_size, size)
    with untraced():  # constants of the graph when traced, as in postprocess_maps
        rows = _box_matrix(h, size, float(config.blur_sigma), k, str(raw.device), raw.dtype)
        cols = rows if w == h else _box_matrix(w, size, float(config.blur_sigma), k, str(raw.device), raw.dtype)
    return (rows @ raw @ cols.T).flatten(1).amax(dim=1)


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


@functools.lru_cache(maxsize=64)
def _box_matrix(n_in: int, size: int, sigma: float, k: int, device: str, dtype: torch.dtype) -> Tensor:
    """``(size - k + 1) x n_in``: the rows of :func:`_upsample_blur_matrix` averaged k at a time, a sliding
    window of stride 1 (the k-wide box mean of the post-processed map along one axis)."""
    up = _upsample_blur_matrix(n_in, size, sigma, "cpu", torch.float64)
    return up.unfold(0, k, 1).mean(dim=-1).to(device=device, dtype=dtype)


def postprocess_maps(maps: Tensor, size: int, blur_sigma: float) -> Tensor:
    """Bilinear upsampling of feature-resolution maps (B x h x w) to ``size`` then optional blur.

    Computed as ``M_h X M_w^T`` with precomputed matrices (:func:`_upsample_blur_matrix`): the same
    result as ``F.interpolate`` + :func:`gaussian_blur` (tested), without the full-size convolutions,
    which cost more than a denoiser step on a CPU.
    """
    if maps.dtype not in (torch.float32, torch.float64):
        maps = maps.float()
    h, w = int(maps.shape[-2]), int(maps.shape[-1])
    with untraced():  # traced (ONNX export), the matrices are constants of the graph, not the ops that make them
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
