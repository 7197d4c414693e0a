"""Vague prototypes matched by entropic optimal transport (VPOT).

The image's features are low-pass filtered ("vague": average-pooled by a factor N), flattened, and
matched to K learnable prototypes by entropic OT. The condition ``yhat`` handed to the diffusion
model is the plan-weighted mix of prototypes, upsampled back to the feature resolution.

Batch independence at inference
-------------------------------
Balanced OT couples every image in a batch: the prototype marginal forces the batch to share the
prototypes, so an image's ``yhat`` would depend on its neighbours (with a batch of one the plan is
uniform and ``yhat`` is the mean prototype for every image). A deployed detector scores one image
at a time, so that cannot stand.

The Sinkhorn plan has the Gibbs form ``P_ij = exp((f_i + g_j - C_ij) / eps)``. Row-normalising it,
as the paper does to build ``y_i``, cancels the image-side potential ``f_i``:
``P_ij / sum_j P_ij = softmax_j((g_j - C_ij) / eps)``. The *only* way the rest of the batch enters
an image's condition is through the prototype-side potential ``g``. We therefore keep ``g`` as a
buffer (an exponential moving average over training batches, gauge-fixed to zero mean) and use the
row-conditional Gibbs plan with that fixed ``g`` at inference. This is exactly the training-time
formula with the potential frozen, i.e. the semi-relaxed OT assignment of one image against the
prototype marginal learned on the training set; training uses the batch's own ``g`` as the paper does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vpdm.errors import ConfigError

ASSIGNMENTS = ("ot", "nearest")
INITS = ("samples", "kmeans", "coreset", "coreset_kmeans", "random")
# Greedy k-center selection runs on at most this many training samples (a seeded random subset), as
# PatchCore's coreset: its cost grows linearly with the candidates.
CORESET_CANDIDATES = 250_000
LEVELS = ("image", "local")
OT_SCOPES = ("batch", "dataset", "none")


@dataclass
class VPOTConfig:
    """Vague-prototype settings. Defaults: local prototypes, K=12288 from k-means, no prototype marginal
    (the paper: whole-image prototypes, K=50, batch OT; the ``paper`` preset in ``vpdm.config``)."""

    num_prototypes: int = 12288  # K (benchmarks/EXPERIMENTS.md section 11: more prototypes cover varied normal blocks)
    downsample: int = 4  # N: average-pool factor of the low-pass step (1 = no vague step)
    ot_reg: float = 0.05  # entropic regularisation eps, in units of the dimension-normalised cost
    sinkhorn_iters: int = 100
    assignment: str = "ot"  # "ot" (the paper) or "nearest" (ablation: prototypes without OT)
    potential_momentum: float = 0.9  # EMA of the prototype-side dual potential kept for inference
    # "samples" (random training samples' vague features), "kmeans" (those, then k-means on all training
    # samples), "coreset" (greedy k-center selection of training samples, as PatchCore's memory bank:
    # covers rare looks), "coreset_kmeans" (k-means started from the coreset) or "random" (N(0, 1))
    init: str = "kmeans"
    kmeans_iters: int = 20
    # What one OT sample and one prototype are: "image" (the paper: an image's whole vague map, C*(S/N)^2
    # values) or "local" (each position of the vague map, C values: prototypes of local regions, so the
    # condition keeps the image's own layout and each region is replaced by normal prototypes).
    level: str = "local"
    # Which distribution the balanced OT matches to the uniform prototype marginal: "batch" (the paper:
    # Sinkhorn on each training batch) or "dataset" (semi-discrete entropic OT against the whole training
    # set: the prototype potential is learned by stochastic ascent on the semi-dual (Genevay et al. 2016),
    # so a batch that holds few classes is not forced to spread over every prototype; with many local
    # prototypes per batch sample that forcing moves prototypes across classes).
    # "none": no prototype marginal at all (semi-relaxed OT with a free prototype marginal: each sample's
    # plan row is softmax(-C / eps), a soft nearest-prototype assignment).
    ot_scope: str = "none"
    potential_lr: float = 0.1  # "dataset" scope: step of the potential ascent, in units of ot_reg

    def validate(self, feature_size: int | None = None) -> None:
        if not isinstance(self.num_prototypes, int) or self.num_prototypes < 1:
            raise ConfigError(f"prototypes.num_prototypes must be an integer >= 1, got {self.num_prototypes!r}")
        if not isinstance(self.downsample, int) or self.downsample < 1:
            raise ConfigError(f"prototypes.downsample must be an integer >= 1, got {self.downsample!r}")
        if feature_size is not None and feature_size % self.downsample != 0:
            raise ConfigError(
                f"prototypes.downsample={self.downsample} must divide the feature size {feature_size} "
                f"(choose one of {[n for n in range(1, feature_size + 1) if feature_size % n == 0]})"
            )
        if not (self.ot_reg > 0 and math.isfinite(self.ot_reg)):
            raise ConfigError(f"prototypes.ot_reg must be a finite number > 0, got {self.ot_reg!r}")
        if not isinstance(self.sinkhorn_iters, int) or self.sinkhorn_iters < 1:
            raise ConfigError(f"prototypes.sinkhorn_iters must be an integer >= 1, got {self.sinkhorn_iters!r}")
        if self.assignment not in ASSIGNMENTS:
            raise ConfigError(f"prototypes.assignment must be one of {ASSIGNMENTS}, got {self.assignment!r}")
        if not 0.0 <= self.potential_momentum < 1.0:
            raise ConfigError(f"prototypes.potential_momentum must be in [0, 1), got {self.potential_momentum!r}")
        if self.init not in INITS:
            raise ConfigError(f"prototypes.init must be one of {', '.join(INITS)}, got {self.init!r}")
        if not isinstance(self.kmeans_iters, int) or isinstance(self.kmeans_iters, bool) or self.kmeans_iters < 1:
            raise ConfigError(f"prototypes.kmeans_iters must be an integer >= 1, got {self.kmeans_iters!r}")
        if self.ot_scope not in OT_SCOPES:
            raise ConfigError(f"prototypes.ot_scope must be one of {OT_SCOPES}, got {self.ot_scope!r}")
        if not (isinstance(self.potential_lr, (int, float)) and math.isfinite(self.potential_lr) and self.potential_lr > 0):
            raise ConfigError(f"prototypes.potential_lr must be a finite number > 0, got {self.potential_lr!r}")
        if self.level not in LEVELS:
            raise ConfigError(f"prototypes.level must be one of {LEVELS}, got {self.level!r}")


def sinkhorn_log(
    cost: Tensor, a: Tensor, b: Tensor, reg: float, num_iters: int = 100, tol: float = 1e-6
) -> tuple[Tensor, Tensor, Tensor]:
    """Entropic OT by log-domain Sinkhorn; stable in float32 for small ``reg``.

    Solves ``min_P <P, C> + reg * sum P (log P - 1)`` s.t. ``P 1 = a``, ``P^T 1 = b``.
    ``cost`` is ``(..., n, m)`` (leading dims are independent problems), ``a`` is ``(..., n)``,
    ``b`` is ``(..., m)``. Returns ``(plan, f, g)`` with ``plan = exp((f_i + g_j - C_ij) / reg)``.
    """
    if reg <= 0:
        raise ConfigError(f"Sinkhorn regularisation must be > 0, got {reg!r}")
    log_a, log_b = a.log(), b.log()
    f = torch.zeros_like(a)
    g = torch.zeros_like(b)
    for _ in range(num_iters):
        f = reg * (log_a - torch.logsumexp((g.unsqueeze(-2) - cost) / reg, dim=-1))
        g_new = reg * (log_b - torch.logsumexp((f.unsqueeze(-1) - cost) / reg, dim=-2))
        converged = (g_new - g).abs().max() < tol * reg
        g = g_new
        if converged:
            break
    # One last f-update makes the row marginals exact, which the row-normalised condition relies on.
    f = reg * (log_a - torch.logsumexp((g.unsqueeze(-2) - cost) / reg, dim=-1))
    plan = torch.exp((f.unsqueeze(-1) + g.unsqueeze(-2) - cost) / reg)
    return plan, f, g


@torch.no_grad()
def kmeans(samples: Tensor, centres: Tensor, iters: int, batch_size: int = 8192) -> Tensor:
    """Lloyd's k-means from the given centres; a centre that loses all its samples stays where it was."""
    centres = centres.clone()
    k = centres.shape[0]
    for _ in range(iters):
        sums = torch.zeros_like(centres)
        counts = torch.zeros(k, dtype=centres.dtype, device=centres.device)
        for start in range(0, samples.shape[0], batch_size):
            chunk = samples[start : start + batch_size]
            nearest = torch.cdist(chunk, centres).argmin(dim=1)
            sums.index_add_(0, nearest, chunk)
            counts += torch.bincount(nearest, minlength=k).to(counts.dtype)
        moved = counts > 0
        centres[moved] = sums[moved] / counts[moved].unsqueeze(1)
    return centres


def coreset_index(samples: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """Indices of ``k`` rows chosen by greedy k-center (PatchCore's coreset: every sample is close to a
    chosen one, rare looks included), on a seeded random subset of at most ``CORESET_CANDIDATES`` rows.
    K-means instead places its centres where the samples are dense, so a look that covers a small
    part of few images (a small part on a large background) gets few of them."""
    from vpdm.patchcore import greedy_coreset

    seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
    pool = None
    if samples.shape[0] > CORESET_CANDIDATES:
        pool = torch.randperm(samples.shape[0], generator=generator)[:CORESET_CANDIDATES]
        samples = samples[pool]
    picks = greedy_coreset(samples, k, seed=seed)
    return picks if pool is None else pool[picks]


def vague(features: Tensor, downsample: int) -> Tensor:
    """Low-pass step T_down: average-pool by ``downsample`` (keeps shape and colour, drops detail)."""
    return F.avg_pool2d(features, downsample) if downsample > 1 else features


def unvague(y: Tensor, size: int) -> Tensor:
    """T_up: bilinear upsampling of the vague condition back to the feature resolution."""
    if y.shape[-1] == size:
        return y
    return F.interpolate(y, size=(size, size), mode="bilinear", align_corners=False)


class VaguePrototypes(nn.Module):
    """K learnable prototypes of the vague features and the OT assignment that builds ``yhat``."""

    def __init__(self, config: VPOTConfig, channels: int, feature_size: int):
        super().__init__()
        config.validate(feature_size)
        self.config = config
        self.channels = channels
        self.feature_size = feature_size
        self.vague_size = feature_size // config.downsample
        self.local = config.level == "local"
        self.dim = channels if self.local else channels * self.vague_size**2
        self.prototypes = nn.Parameter(torch.randn(config.num_prototypes, self.dim))
        # Prototype-side dual potential, kept for per-image assignment at inference (module docstring).
        self.register_buffer("potential", torch.zeros(config.num_prototypes))
        self.register_buffer("potential_initialised", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def init_from(self, features: Tensor, generator: torch.Generator | None = None) -> None:
        """Data-dependent start: prototypes = K random training samples (with repeats if fewer), and
        with ``init="kmeans"`` then Lloyd's k-means iterations on all training samples, so the
        prototypes start spread over the normal data as the OT assignment will use them."""
        if self.config.init == "random":
            return
        flat = self.samples(features)
        k = self.config.num_prototypes
        if self.config.init.startswith("coreset"):
            idx = coreset_index(flat, k, generator)
        else:
            idx = torch.randperm(flat.shape[0], generator=generator)
        idx = idx.repeat(math.ceil(k / len(idx)))[:k]
        jitter = 0.01 * torch.randn(k, self.dim, generator=generator)
        start = flat[idx] + jitter
        if self.config.init.endswith("kmeans"):
            start = kmeans(flat, start, self.config.kmeans_iters)
        self.prototypes.copy_(start)

    def samples(self, features: Tensor) -> Tensor:
        """The OT samples of a batch: one row per image (``level="image"``) or per vague position."""
        v = vague(features, self.config.downsample)
        if self.local:
            return v.permute(0, 2, 3, 1).reshape(-1, self.channels)
        return v.flatten(1)

    def cost(self, flat: Tensor) -> Tensor:
        """C_ij = ||f_i - B_j||_2 / sqrt(d): the paper's Euclidean cost, normalised by the dimension
        so that ``ot_reg`` means the same for any backbone, feature size or N."""
        return torch.cdist(flat, self.prototypes) / math.sqrt(self.dim)

    def forward(self, features: Tensor, with_loss: bool = True) -> dict[str, Tensor]:
        """Return ``yhat`` (B x C x S x S), the OT loss and the plan.

        In training mode the plan is the balanced Sinkhorn plan of the batch (the paper's Eq. 9-11)
        and the stored potential is updated; in eval mode each image is assigned on its own with the
        stored potential, so its ``yhat`` does not depend on the batch.

        ``with_loss=False`` (eval mode only: inference) returns ``yhat`` and ``weights`` alone: the OT
        loss and the plan are B*P x K element-wise passes that inference never reads, and with
        thousands of local prototypes they cost more than the denoiser.
        """
        if not with_loss:
            if self.training:
                raise RuntimeError("VaguePrototypes(with_loss=False) is for inference: call .eval() first")
            return self._assign(features)
        batch = features.shape[0]
        flat = self.samples(features)
        cost = self.cost(flat)
        b, k = cost.shape
        reg = self.config.ot_reg
        if self.config.assignment == "nearest":
            weights = F.one_hot(cost.argmin(dim=1), k).to(cost.dtype)
            ot_loss = (weights * cost).sum(dim=1).mean()  # reported only; the ablation trains with lambda=0 or this k-means-like term
            plan = weights / b
        else:
            if self.config.ot_scope == "none":
                potential = torch.zeros_like(self.potential)
                plan = None
            elif self.training and self.config.ot_scope == "dataset":
                potential = self.potential
                plan = None
            elif self.training:
                with torch.no_grad():
                    plan, _, g = sinkhorn_log(
                        cost.detach().float(),
                        torch.full((b,), 1.0 / b, device=cost.device),
                        torch.full((k,), 1.0 / k, device=cost.device),
                        reg,
                        self.config.sinkhorn_iters,
                    )
                    self._update_potential(g)
                potential = g
            else:
                potential = self.potential
                plan = None
            # Row-normalised Gibbs plan; gradients reach the prototypes through C and through B below.
            weights = torch.softmax((potential.unsqueeze(0) - cost) / reg, dim=1)
            if plan is None:
                plan = (weights / b).detach()
                if self.training and self.config.ot_scope == "dataset":
                    self._ascend_potential(plan.sum(dim=0) * k)
            plan = plan.to(cost.dtype)
            # Entropic OT value <P, C> + reg * sum P log P; with P at the optimum its gradient w.r.t. C is P
            # (envelope theorem), so P is treated as a constant here.
            ot_loss = (plan * cost).sum() + reg * (plan * plan.clamp_min(1e-30).log()).sum()
        y = weights @ self.prototypes
        if self.local:
            y = y.view(batch, self.vague_size, self.vague_size, self.channels).permute(0, 3, 1, 2)
        else:
            y = y.view(batch, self.channels, self.vague_size, self.vague_size)
        return {"yhat": unvague(y, self.feature_size), "ot_loss": ot_loss, "weights": weights, "cost": cost}

    @property
    def batch_independent(self) -> bool:
        """Whether an image's training-time assignment ignores the rest of its batch: no prototype
        marginal (``ot_scope='none'``) or the nearest-prototype ablation. Balanced OT couples the batch."""
        return self.config.assignment == "nearest" or self.config.ot_scope == "none"

    @torch.no_grad()
    def training_condition(self, features: Tensor, batch_size: int = 64) -> tuple[Tensor, Tensor]:
        """What the training forward computes of frozen, batch-independent prototypes, once per image:
        the condition before T_up (B x C x s x s) and the image's term of the OT loss (B,), so that
        :meth:`ot_loss_of_terms` of a batch's terms is its ``ot_loss``. With the prototypes fixed these do
        not change from epoch to epoch, and the assignment (every vague block against every prototype) is
        most of a training step's cost."""
        if not self.batch_independent:
            raise RuntimeError("the training condition depends on the batch (balanced OT): it cannot be precomputed")
        ys, terms = [], []
        reg = self.config.ot_reg
        for start in range(0, features.shape[0], batch_size):
            chunk = features[start : start + batch_size]
            flat = self.samples(chunk)
            cost = self.cost(flat)
            if self.config.assignment == "nearest":
                weights = F.one_hot(cost.argmin(dim=1), cost.shape[1]).to(cost.dtype)
                per_sample = cost.min(dim=1).values
            else:
                weights = torch.softmax(-cost / reg, dim=1)
                per_sample = (weights * cost).sum(dim=1) + reg * (weights * weights.clamp_min(1e-30).log()).sum(dim=1)
            y = weights @ self.prototypes
            n = chunk.shape[0]
            if self.local:
                y = y.view(n, self.vague_size, self.vague_size, self.channels).permute(0, 3, 1, 2)
            else:
                y = y.view(n, self.channels, self.vague_size, self.vague_size)
            ys.append(y.contiguous())
            terms.append(per_sample.view(n, -1).mean(dim=1))
        return torch.cat(ys), torch.cat(terms)

    def ot_loss_of_terms(self, terms: Tensor) -> Tensor:
        """The batch's OT loss from its images' :meth:`training_condition` terms: the mean term, and for
        entropic OT the entropy's share of the batch size (the plan is the weights over b samples:
        sum P log P = (1/b) sum w log w - log b)."""
        if self.config.assignment == "nearest":
            return terms.mean()
        samples = terms.shape[0] * (self.vague_size**2 if self.local else 1)
        return terms.mean() - self.config.ot_reg * math.log(samples)

    def _assign(self, features: Tensor) -> dict[str, Tensor]:
        """Eval-mode ``forward`` without the loss: the same ``yhat`` and ``weights`` (float rounding aside),
        with the cost's scaling folded into one in-place pass before the softmax."""
        batch = features.shape[0]
        flat = self.samples(features)
        reg = self.config.ot_reg
        if self.config.assignment == "nearest":
            cost = self.cost(flat)
            weights = F.one_hot(cost.argmin(dim=1), cost.shape[1]).to(cost.dtype)
        else:
            # softmax((g - C) / reg) with C = dist / sqrt(d); g = 0 without a prototype marginal
            logits = torch.cdist(flat, self.prototypes).mul_(-1.0 / (math.sqrt(self.dim) * reg))
            if self.config.ot_scope != "none":
                logits.add_(self.potential.unsqueeze(0) / reg)
            weights = torch.softmax(logits, dim=1)
        y = weights @ self.prototypes
        if self.local:
            y = y.view(batch, self.vague_size, self.vague_size, self.channels).permute(0, 3, 1, 2)
        else:
            y = y.view(batch, self.channels, self.vague_size, self.vague_size)
        return {"yhat": unvague(y, self.feature_size), "weights": weights}

    @torch.no_grad()
    def _ascend_potential(self, mass_ratio: Tensor) -> None:
        """One stochastic ascent step on the semi-dual of dataset-level OT: the gradient for prototype
        j is ``1/K - mass_j`` (its target minus the mass the batch sends it); ``mass_ratio = K mass``."""
        step = self.config.potential_lr * self.config.ot_reg * (1.0 - mass_ratio.to(self.potential.dtype))
        self.potential.add_(step - step.mean())
        self.potential_initialised.fill_(True)

    @torch.no_grad()
    def _update_potential(self, g: Tensor) -> None:
        g = g - g.mean()  # Sinkhorn duals are defined up to a constant; fix the gauge before averaging
        if not bool(self.potential_initialised):
            self.potential.copy_(g)
            self.potential_initialised.fill_(True)
        else:
            m = self.config.potential_momentum
            self.potential.mul_(m).add_((1 - m) * g)
