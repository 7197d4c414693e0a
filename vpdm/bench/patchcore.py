"""PatchCore-style baseline on cached backbone features (Roth et al., CVPR 2022).

The benchmark's reference detector. It uses the *same* cached features as VPDM (B x C x S x S),
and its maps go through the same upsampling, blur and image-score code (``vpdm.model.scoring``), so a
difference in the metrics is a difference between the two ways of building the map.

* **Patch vectors.** The raw backbone features (optionally standardised per channel with the
  training statistics, as VPDM does), locally aggregated: each position becomes the mean of its
  ``aggregate`` x ``aggregate`` neighbourhood (borders average the neighbours that exist). This is
  PatchCore's neighbourhood aggregation ``f_agg`` (an average pool over the patch neighbourhood);
  the official code also pools each layer to a common dimension, which we skip. On MVTec bottle
  (Lite2 features, bank 2141) raw features gave pixel AUROC 98.2 / AUPRO 93.5 against 98.1 / 93.0
  standardised (image AUROC 100 both), so the default is raw features, as in PatchCore.
* **Memory bank.** All training patch vectors, subsampled by greedy coreset selection
  (:func:`greedy_coreset`): greedy k-center on a Johnson-Lindenstrauss random projection
  (``projection_dim``, the approximation of the official repository). ``max_bank`` caps the bank
  (default 10k) so that the selection and the kNN search stay affordable on a CPU for a multi-class
  bank (1.4M patches for the four-dataset set); on bottle a 2k and a 10k bank scored the same. The
  greedy pass costs time linear in the number of candidate vectors, so with more than
  ``max_candidates`` patch vectors (default 250k, about bottle's 214k) it runs on a seeded uniform
  random subset of that many: without the cap the four-dataset bank (1.39M candidates) was still
  being selected after 25 minutes. The bank size (ratio and cap) is computed from *all* patches,
  and the bank keeps the selected vectors at full dimension.
* **Anomaly map.** Distance of each test patch to its nearest bank vector (mean over the ``k``
  nearest when ``k > 1``; PatchCore uses k = 1), found by chunked ``torch.cdist`` so memory stays
  bounded. Each image is scored on its own: the map never depends on the batch.

The greedy selection is exact farthest-first traversal (Gonzalez 1985), so the coverage radius of
the bank is at most twice the optimal one for its size (in the projected space). The official
"approximate" sampler differs in one detail: it keeps the mean distance to 10 random start points
as an extra column of the running minimum, which caps the distances and breaks that guarantee. We
use that heuristic only to choose the *first* point (the one farthest on average from 10 random
points) and then pick, at every step, the point farthest from the selected set.

Speed on a CPU (the official code runs the loop on a GPU): naively each pick computes N distances
in D dimensions. Two exact shortcuts leave a cheap scalar pass over N and change no pick: (1) triangle
inequality: a row can only come closer to the new center if ``d(its center, new) < 2 d(row, its
center)``, so distances are computed only for those rows; (2) the new center is ``r`` (the current
coverage radius) from every picked row, so rows closer than ``r / 2`` to their center cannot move
and are set aside until ``r`` has shrunk. The loop runs on one thread (thousands of small
memory-bound steps; extra threads only synchronise). Measured: ~4-5 ms per pick for N = 214k
(bottle), so a 10k bank takes under a minute; the cost grows linearly with N.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from vpdm.errors import ConfigError, DataError

__all__ = ["PatchCore", "PatchCoreConfig", "greedy_coreset", "random_projection", "local_aggregate", "nn_distances"]


@dataclass
class PatchCoreConfig:
    coreset_ratio: float = 0.1  # fraction of the training patch vectors kept in the bank (PatchCore: 0.1 / 0.01)
    max_bank: int | None = 10000  # cap on the bank size (CPU budget for multi-class sets); None = no cap
    max_candidates: int | None = (
        250_000  # greedy selection runs on a seeded random subset of this many patch vectors; None = all
    )
    projection_dim: int | None = 128  # JL projection used only for the greedy selection; None = exact distances
    k: int = 1  # nearest neighbours averaged into the map value
    aggregate: int = 3  # local neighbourhood (odd); 1 = no aggregation
    standardise: bool = False  # per-channel standardisation with the training statistics (measured: see docstring)
    num_starts: int = 10  # random points whose mean distance chooses the first coreset point
    seed: int = 0

    def validate(self) -> None:
        if not (0.0 < self.coreset_ratio <= 1.0):
            raise ConfigError(f"patchcore coreset_ratio must be in (0, 1], got {self.coreset_ratio!r}")
        if self.max_bank is not None and (not isinstance(self.max_bank, int) or self.max_bank < 1):
            raise ConfigError(f"patchcore max_bank must be a positive integer or None, got {self.max_bank!r}")
        if self.max_candidates is not None and (not isinstance(self.max_candidates, int) or self.max_candidates < 1):
            raise ConfigError(
                f"patchcore max_candidates must be a positive integer or None, got {self.max_candidates!r}"
            )
        if self.projection_dim is not None and (not isinstance(self.projection_dim, int) or self.projection_dim < 1):
            raise ConfigError(
                f"patchcore projection_dim must be a positive integer or None, got {self.projection_dim!r}"
            )
        if not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"patchcore k must be an integer >= 1, got {self.k!r}")
        if not isinstance(self.aggregate, int) or self.aggregate < 1 or self.aggregate % 2 == 0:
            raise ConfigError(f"patchcore aggregate must be an odd integer >= 1, got {self.aggregate!r}")
        if not isinstance(self.num_starts, int) or self.num_starts < 1:
            raise ConfigError(f"patchcore num_starts must be an integer >= 1, got {self.num_starts!r}")

    def to_dict(self) -> dict:
        return asdict(self)


# -- building blocks ----------------------------------------------------------------------------


def local_aggregate(features: Tensor, size: int) -> Tensor:
    """Mean over each position's ``size`` x ``size`` neighbourhood (B x C x S x S -> same shape).

    At the borders only the positions inside the map are averaged (``count_include_pad=False``),
    so border patches are not pulled towards zero.
    """
    if size <= 1:
        return features
    return F.avg_pool2d(features, kernel_size=size, stride=1, padding=size // 2, count_include_pad=False)


def random_projection(dim: int, projection_dim: int, seed: int, device: torch.device | str = "cpu") -> Tensor:
    """Gaussian Johnson-Lindenstrauss matrix (dim x projection_dim), scaled to keep distances on average."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(dim, projection_dim, generator=generator) / math.sqrt(projection_dim)).to(device)


def _row_distances(vectors: Tensor, point: Tensor) -> Tensor:
    """Euclidean distance of every row to one point, by differences (exact for close points)."""
    return torch.linalg.vector_norm(vectors - point, dim=1)


def _distances_to(vectors: Tensor, sqnorm: Tensor, points: Tensor) -> Tensor:
    """Distances (N x P) of rows with precomputed squared norms to a few points, by one matrix
    product (memory-bound passes over N x D matter here; precision ~1e-3 of the norms is plenty)."""
    d2 = sqnorm.unsqueeze(1) + points.pow(2).sum(dim=1).unsqueeze(0) - 2.0 * (vectors @ points.T)
    return d2.clamp_min_(0.0).sqrt_()


@contextmanager
def _single_thread(device: torch.device) -> Iterator[None]:
    """The greedy loop is thousands of small memory-bound operations: intra-op threads only add
    synchronisation (5x slower with 2 threads on a busy 2-core machine), so run it on one."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def greedy_coreset(
    vectors: Tensor,
    n: int,
    projection_dim: int | None = 128,
    seed: int = 0,
    num_starts: int = 10,
) -> Tensor:
    """Indices of ``n`` rows of ``vectors`` (N x D) chosen by greedy k-center, in pick order.

    The first row is the one with the largest mean distance to ``num_starts`` random rows (the
    official PatchCore start); every later pick is the row farthest from the rows picked so far.
    With ``projection_dim`` < D the distances are measured after a random projection to that many
    dimensions (:func:`random_projection` with ``seed``). Stops early (returning fewer indices) when
    every remaining row coincides with a picked one.
    """
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise DataError(f"greedy_coreset expects a non-empty N x D matrix, got shape {tuple(vectors.shape)}")
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"greedy_coreset needs n >= 1, got {n!r}")
    total, dim = vectors.shape
    if n >= total:
        return torch.arange(total, device=vectors.device)
    x = vectors.float()
    if projection_dim is not None and projection_dim < dim:
        x = x @ random_projection(dim, projection_dim, seed, x.device)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randperm(total, generator=generator)[: min(num_starts, total)].to(x.device)
    sqnorm = x.pow(2).sum(dim=1)
    start_dist = _distances_to(x, sqnorm, x[starts]).mean(dim=1)
    first = int(torch.argmax(start_dist))

    picks = [first]
    centers = x.new_empty(n, x.shape[1])
    centers[0] = x[first]
    min_dist = _distances_to(x, sqnorm, x[first : first + 1]).squeeze(1)  # to the nearest picked row
    min_dist[first] = 0.0
    assigned = torch.zeros(total, dtype=torch.long, device=x.device)  # which picked row that is
    with _single_thread(x.device):
        _farthest_first(x, sqnorm, n, picks, centers, min_dist, assigned)
    return torch.tensor(picks, dtype=torch.long, device=vectors.device)


def _farthest_first(
    x: Tensor, sqnorm: Tensor, n: int, picks: list[int], centers: Tensor, min_dist: Tensor, assigned: Tensor
) -> None:
    """Extend ``picks`` to ``n`` rows by farthest-first traversal (state: see greedy_coreset)."""
    total = x.shape[0]
    gamma = 0.8
    active = torch.arange(total, device=x.device)
    xa, sqa, mda, asa = x, sqnorm, min_dist.clone(), assigned.clone()
    radius_at_compaction = float("inf")
    for j in range(len(picks), n):
        local = int(torch.argmax(mda))
        radius = float(mda[local])
        if radius < gamma * radius_at_compaction:
            # The next pick is `radius` away from every picked row, so a row can only move if its
            # distance exceeds radius / 2: set aside rows below gamma * radius / 2 until the radius
            # falls under gamma times its value now (then compact again).
            min_dist[active], assigned[active] = mda, asa
            active = torch.nonzero(min_dist > gamma * radius / 2.0).squeeze(1)
            xa, sqa, mda, asa = x[active], sqnorm[active], min_dist[active], assigned[active]
            radius_at_compaction = radius
            if active.numel() == 0:
                break
            local = int(torch.argmax(mda))
        if radius <= 0.0:
            break  # everything left coincides with a picked row
        i = int(active[local])
        picks.append(i)
        new = x[i]
        centers[j] = new
        # Every picked row is >= radius from `new`, and a row can only come closer to `new` if
        # d(its center, new) < 2 d(row, its center): test that cheaply, measure only the survivors.
        center_dist = _row_distances(centers[:j], new)
        candidates = torch.nonzero(center_dist[asa] < 2.0 * mda).squeeze(1)
        d = _distances_to(xa[candidates], sqa[candidates], new.unsqueeze(0)).squeeze(1)
        closer = d < mda[candidates]
        rows = candidates[closer]
        mda[rows] = d[closer]
        asa[rows] = j
        mda[local] = 0.0


def nn_distances(queries: Tensor, bank: Tensor, k: int = 1, max_elements: int = 2**24) -> Tensor:
    """Mean distance of each query row (Q x D) to its ``k`` nearest bank rows (M x D), chunked so
    that no more than ``max_elements`` distances are held at once."""
    if bank.shape[0] < k:
        raise ConfigError(f"k={k} nearest neighbours asked for but the bank holds {bank.shape[0]} vectors")
    rows = max(1, max_elements // max(1, bank.shape[0]))
    out = []
    for start in range(0, queries.shape[0], rows):
        d = torch.cdist(queries[start : start + rows], bank)
        out.append(d.min(dim=1).values if k == 1 else d.topk(k, dim=1, largest=False).values.mean(dim=1))
    return torch.cat(out) if out else queries.new_zeros(0)


# -- the detector -------------------------------------------------------------------------------


class PatchCore:
    """Memory bank of normal patch vectors; anomaly map = nearest-neighbour distance."""

    def __init__(self, config: PatchCoreConfig | None = None, device: torch.device | str = "cpu", **kwargs):
        if config is None:
            config = PatchCoreConfig(**kwargs)
        elif kwargs:
            config = replace(config, **kwargs)
        config.validate()
        self.config = config
        self.device = torch.device(device)
        self.mean: Tensor | None = None
        self.std: Tensor | None = None
        self.bank: Tensor | None = None  # M x C
        self.num_patches: int = 0  # training patch vectors the bank was chosen from
        self.feature_shape: tuple[int, int] | None = None  # (C, S)

    # -- embedding --------------------------------------------------------------------------
    def _check(self, features: Tensor) -> None:
        if features.ndim != 4 or features.shape[-1] != features.shape[-2]:
            raise DataError(f"PatchCore expects B x C x S x S features, got shape {tuple(features.shape)}")
        if self.feature_shape is not None and (features.shape[1], features.shape[-1]) != self.feature_shape:
            raise DataError(
                f"features of shape {tuple(features.shape[1:])} do not match the fitted "
                f"{self.feature_shape[0]} x {self.feature_shape[1]} x {self.feature_shape[1]}"
            )

    def embed(self, features: Tensor) -> Tensor:
        """Patch vectors of a feature batch: (B * S * S) x C, row order (image, y, x)."""
        x = features.to(self.device, torch.float32)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        x = local_aggregate(x, self.config.aggregate)
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])

    def _chunks(self, n: int, channels: int, size: int) -> range:
        per_image = channels * size * size
        step = max(1, (2**26) // max(1, per_image))  # ~256 MB of float32 per chunk
        return range(0, n, step)

    # -- fitting ----------------------------------------------------------------------------
    @torch.no_grad()
    def fit(self, features: Tensor) -> PatchCore:
        """Build the memory bank from training features (N x C x S x S)."""
        self.feature_shape = None
        self._check(features)
        if features.shape[0] == 0:
            raise DataError("PatchCore.fit needs at least one training image")
        n_img, channels, size = features.shape[0], features.shape[1], features.shape[-1]
        self.feature_shape = (channels, size)
        if self.config.standardise:
            x = features.to(self.device, torch.float32)
            self.mean = x.mean(dim=(0, 2, 3), keepdim=True)
            several = n_img * size * size > 1
            self.std = x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6) if several else torch.ones_like(self.mean)
        else:
            self.mean = self.std = None
        chunks = self._chunks(n_img, channels, size)
        total = n_img * size * size
        self.num_patches = total
        cfg = self.config
        n_bank = max(1, math.ceil(cfg.coreset_ratio * total))
        if cfg.max_bank is not None:
            n_bank = min(n_bank, cfg.max_bank)
        if n_bank >= total:
            self.bank = torch.cat([self.embed(features[s : s + chunks.step]) for s in chunks])
            return self
        # Select on projected vectors without holding the full-dimension ones (multi-class sets are large).
        proj = None
        if cfg.projection_dim is not None and cfg.projection_dim < channels:
            proj = random_projection(channels, cfg.projection_dim, cfg.seed, self.device)
        reduced = torch.cat(
            [(e @ proj if proj is not None else e) for e in (self.embed(features[s : s + chunks.step]) for s in chunks)]
        )
        pool = None  # candidate rows (indices into all patches); None = every patch is a candidate
        if cfg.max_candidates is not None and total > cfg.max_candidates:
            generator = torch.Generator().manual_seed(cfg.seed + 1)
            pool = torch.sort(torch.randperm(total, generator=generator)[: cfg.max_candidates]).values.to(self.device)
            reduced = reduced[pool]
            n_bank = min(n_bank, cfg.max_candidates)
        picks = greedy_coreset(reduced, n_bank, projection_dim=None, seed=cfg.seed, num_starts=cfg.num_starts)
        if pool is not None:
            picks = pool[picks]
        del reduced
        order = torch.sort(picks).values
        per_chunk = chunks.step * size * size
        bank = []
        for s in chunks:
            lo, hi = s * size * size, s * size * size + per_chunk
            sel = order[(order >= lo) & (order < hi)] - lo
            if sel.numel():
                bank.append(self.embed(features[s : s + chunks.step])[sel.to(self.device)])
        self.bank = torch.cat(bank)
        return self

    # -- scoring ----------------------------------------------------------------------------
    @torch.no_grad()
    def anomaly_maps(self, features: Tensor, batch_size: int = 16) -> Tensor:
        """Feature-resolution maps (B x S x S): distance of each patch to the bank."""
        if self.bank is None:
            raise ConfigError("PatchCore.anomaly_maps called before fit")
        self._check(features)
        size = features.shape[-1]
        maps = []
        for start in range(0, features.shape[0], batch_size):
            chunk = features[start : start + batch_size]
            d = nn_distances(self.embed(chunk), self.bank, self.config.k)
            maps.append(d.view(chunk.shape[0], size, size))
        if not maps:
            return features.new_zeros(0, size, size)
        return torch.cat(maps)

    def summary(self) -> dict:
        return {
            **self.config.to_dict(),
            "bank_size": 0 if self.bank is None else int(self.bank.shape[0]),
            "training_patches": self.num_patches,
            "coreset_candidates": self.num_patches
            if self.config.max_candidates is None
            else min(self.num_patches, self.config.max_candidates),
        }
