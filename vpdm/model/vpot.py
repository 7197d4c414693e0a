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
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vpdm.errors import ConfigError

ASSIGNMENTS = ("ot", "nearest")
INITS = ("samples", "kmeans", "coreset", "coreset_kmeans", "random")
# Greedy k-center selection runs on at most this many training samples (a seeded random subset), as
# PatchCore's coreset: its cost grows linearly with the candidates.
CORESET_CANDIDATES = 250_000
# Routing keys: at most this many means of training images per class (k-means of them), for routing.
ROUTE_KEYS = 16
LEVELS = ("image", "local")
OT_SCOPES = ("batch", "none")


@dataclass
class VPOTConfig:
    """Vague-prototype settings. Defaults: local prototypes, K=12288 per class from k-means on the class's own
    blocks, each image routed to its nearest class, no prototype marginal (the paper: whole-image prototypes,
    K=50 for all classes, batch OT; the ``paper`` preset in ``vpdm.config.presets``)."""

    # K (benchmarks/EXPERIMENTS.md section 11: more prototypes cover varied normal blocks); per class with
    # ``per_class`` (section 19: each class as many as alone, whatever the number of classes)
    num_prototypes: int = 12288
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
    # The prototype marginal: "batch" (the paper: balanced OT, Sinkhorn on each training batch, matching it
    # to the uniform prototype marginal) or "none" (no prototype marginal: semi-relaxed OT with a free
    # prototype marginal, each sample's plan row is softmax(-C / eps), a soft nearest-prototype assignment).
    ot_scope: str = "none"
    # Short lists (an inverted-file index, as faiss's IVF): the prototypes are split by k-means into groups of
    # about ``list_size`` (ceil(K / list_size) lists), and each sample is assigned over the prototypes of its
    # ``probes`` nearest groups only (the kernel restricted to them): about probes * list_size candidates,
    # whatever K. 0 = every prototype (exact). Only the kernel without prototype marginal (assignment=ot,
    # ot_scope=none) of frozen prototypes uses them (the index is built once); other assignments match every
    # prototype. With ``probes`` lists or fewer the assignment is exact.
    list_size: int = 96
    probes: int = 4
    # A budget per class: ``num_prototypes`` is each class's K (at most its training samples), chosen among
    # its own samples, so a class gets the same prototypes alone or beside thirty others; the short lists
    # never mix classes. False: one K shared by all classes (k-means over every class's samples).
    per_class: bool = True
    # Routing (per_class only): each image is matched against the prototypes of its ``route`` nearest classes
    # only (nearest by the mean of its samples against a few stored means per class), so the assignment's
    # cost does not grow with the number of classes. 0 = every class.
    route: int = 1

    @property
    def by_class(self) -> bool:
        """Whether the budget is per class: ``per_class`` for the kernel without prototype marginal of
        prototypes from the data; other assignments share one K (as short lists serve the kernel only)."""
        return self.per_class and self.assignment == "ot" and self.ot_scope == "none" and self.init != "random"

    @property
    def routes(self) -> int:
        """The classes an image is matched against (0: all): ``route`` where the budget is per class."""
        return self.route if self.by_class else 0

    @property
    def lists(self) -> int:
        """The number of short lists (of one class's budget with ``per_class``): 0 for none, for an assignment
        that needs every prototype, and when ``probes`` lists would hold every prototype anyway."""
        if not self.list_size or self.assignment != "ot" or self.ot_scope != "none":
            return 0
        lists = math.ceil(self.num_prototypes / self.list_size)
        return lists if lists > self.probes else 0

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
        if self.level not in LEVELS:
            raise ConfigError(f"prototypes.level must be one of {LEVELS}, got {self.level!r}")
        for name in ("list_size", "probes", "route"):
            value = getattr(self, name)
            low = 1 if name == "probes" else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"prototypes.{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.per_class, bool):
            raise ConfigError(f"prototypes.per_class must be true or false, got {self.per_class!r}")


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


class SampleRows:
    """The OT samples of a feature tensor (one row per image or per vague position), computed a few
    images at a time when asked for: a prototype set-up reads a random subset of them (a coreset's
    candidates) or their vague form (1/N^2 of the features), so neither the standardised features nor
    every fine sample is ever held whole beside the features themselves (36 classes: 8.4 -> 3.3 GB peak,
    ``benchmarks/EXPERIMENTS.md`` section 19). Rows are bit for bit those of ``samples(transform(features))``."""

    def __init__(self, features: Tensor, samples_of, transform=None, batch: int = 64) -> None:
        self.features, self.samples_of, self.batch = features, samples_of, batch
        self.transform = transform if transform is not None else (lambda x: x)
        first = samples_of(self.transform(features[:1]))
        self.per_image = first.shape[0]
        self.shape = (features.shape[0] * self.per_image, first.shape[1])
        self.device = first.device

    def chunks(self):
        """(first row, rows) of ``batch`` images at a time."""
        for start in range(0, self.features.shape[0], self.batch):
            yield start * self.per_image, self.samples_of(self.transform(self.features[start : start + self.batch]))

    def materialise(self) -> Tensor:
        return torch.cat([rows for _, rows in self.chunks()])

    def __getitem__(self, index: Tensor) -> Tensor:
        """The rows at ``index`` (a 1-D tensor of row numbers), in that order."""
        index = index.to(torch.long).cpu()
        out = torch.empty(len(index), self.shape[1], dtype=self.features.dtype, device=self.device)
        order = torch.argsort(index)
        sorted_index = index[order]
        for first, rows in self.chunks():
            lo = int(torch.searchsorted(sorted_index, first))
            hi = int(torch.searchsorted(sorted_index, first + rows.shape[0]))
            if hi > lo:
                out[order[lo:hi].to(out.device)] = rows[(sorted_index[lo:hi] - first).to(rows.device)]
        return out


def coreset_index(
    samples: Tensor | SampleRows,
    k: int,
    generator: torch.Generator | None = None,
    batch: int = 256,
    projection_dim: int = 128,
) -> Tensor:
    """Indices of ``k`` rows chosen by greedy k-center (farthest-first, PatchCore's coreset: every sample
    ends close to a chosen one, rare looks included), on a seeded random subset of at most
    ``CORESET_CANDIDATES`` rows and, above ``projection_dim`` dimensions, a seeded random projection (as
    PatchCore selects). K-means instead places its centres where the samples are dense, so a look that
    covers a small part of few images (a small part on a large background) gets few of them.

    Picked up to ``batch`` at a time: farthest-first among the 4 * batch rows farthest from the chosen ones,
    for as long as the best of them is farther than every other row can be (so each pick is the one exact
    farthest-first makes), then one matrix product updates every row's distance. Exact farthest-first
    updates all rows after every pick, a memory-bound pass each (12288 picks from 250k rows: 566 s).
    Fewer than ``k`` rows when the rest coincide."""
    gen_seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
    pool = None
    if samples.shape[0] > CORESET_CANDIDATES:
        pool = torch.randperm(samples.shape[0], generator=generator)[:CORESET_CANDIDATES].to(samples.device)
        samples = samples[pool]
    elif isinstance(samples, SampleRows):
        samples = samples.materialise()
    n, dim = samples.shape
    if k >= n:
        picks = torch.arange(n, device=samples.device)
        return picks if pool is None else pool[picks]
    x = samples.float()
    if dim > projection_dim:
        g = torch.Generator().manual_seed(gen_seed)
        x = x @ (torch.randn(dim, projection_dim, generator=g) / math.sqrt(projection_dim)).to(x.device)
    squares = x.pow(2).sum(dim=1)

    def distance_to(rows: Tensor) -> Tensor:  # squared distances of every row to ``rows`` (n x m)
        return (squares.unsqueeze(1) + squares[rows].unsqueeze(0) - 2.0 * (x @ x[rows].T)).clamp_min_(0)

    first = int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(gen_seed)))
    chosen = [first]
    nearest = distance_to(torch.tensor([first], device=x.device)).squeeze(1)
    while len(chosen) < k:
        b = min(batch, k - len(chosen))
        top = nearest.topk(min(n, 4 * b))
        cand, cd = top.indices, top.values.clone()
        # A row outside the candidates is at most this far from the chosen ones: while a candidate is farther,
        # it is the row exact farthest-first would pick next.
        outside = float(top.values[-1]) if len(cand) < n else 0.0
        cx = x[cand]
        new: list[int] = []
        for _ in range(b):
            j = int(cd.argmax())
            if float(cd[j]) <= outside or float(cd[j]) <= 0.0:
                break
            new.append(int(cand[j]))
            cd = torch.minimum(cd, (cx - cx[j]).pow(2).sum(dim=1))
        if not new:
            break  # every remaining row coincides with a chosen one
        rows = torch.tensor(new, device=x.device)
        nearest = torch.minimum(nearest, distance_to(rows).min(dim=1).values)
        nearest[rows] = 0.0
        chosen.extend(new)
    picks = torch.tensor(chosen, dtype=torch.long, device=samples.device)
    return picks if pool is None else pool[picks]


# (sample, list) pairs whose samples the short-list assignment gathers at once (a few MB: stays in cache).
_PAIRS_PER_CHUNK = 4096


def _chunks_of_lists(
    groups: list[int], counts: list[int], size: int, lengths: list[int] | None = None
) -> Iterator[tuple[int, int, list[tuple[int, int, int]]]]:
    """Consecutive runs of whole lists of about ``size`` pairs (a larger list alone): (first pair, end pair,
    [(list, its first pair, its end pair) within the run]). With ``lengths`` (each list's number of prototypes,
    longest first), a run also ends before a list shorter than 3/4 of its first, so that a block padded to
    the run's longest list is mostly real products."""
    first = end = 0
    run: list[tuple[int, int, int]] = []
    width = 0
    for i, (group, count) in enumerate(zip(groups, counts)):
        short = lengths is not None and 4 * lengths[i] < 3 * width
        if run and (end + count - first > size or short):
            yield first, end, run
            first, run = end, []
        if not run:
            width = lengths[i] if lengths is not None else 0
        run.append((group, end - first, end + count - first))
        end += count
    if run:
        yield first, end, run


def _augmented(rows: Tensor, prototype_side: bool = False) -> Tensor:
    """Rows augmented so that one product gives squared distances: samples as [x, 1, |x|^2], prototypes as
    [-2 p, |p|^2, 1]; their dot product is |x|^2 + |p|^2 - 2 x.p, the norms computed once (``torch.cdist``
    recomputes them and pads both operands in every call)."""
    squared = rows.pow(2).sum(dim=1, keepdim=True)
    ones = torch.ones_like(squared)
    return torch.cat([rows * -2.0, squared, ones] if prototype_side else [rows, ones, squared], dim=1)


class _ListConstants(NamedTuple):
    """What :meth:`VaguePrototypes._list_constants` keeps until the prototypes change."""

    radius: float  # the largest distance of a prototype to its list's centroid
    owned: bool  # every prototype's owner is the class it is stored under (class_offsets)
    prototypes: Tensor  # the prototypes as _augmented rows (prototype side)
    rank: Tensor  # each list's rank by size, largest first
    by_size: Tensor  # the lists in that order
    centroids: Tensor  # the list centroids as _augmented rows (prototype side)


def _one_hot(owner: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """K x classes one-hot of prototype owners; a prototype of unknown class (-1) is a zero row."""
    return (owner.unsqueeze(1) == torch.arange(num_classes, device=owner.device).unsqueeze(0)).to(dtype)


def vague(features: Tensor, downsample: int) -> Tensor:
    """Low-pass step T_down: average-pool by ``downsample`` (keeps shape and colour, drops detail)."""
    return F.avg_pool2d(features, downsample) if downsample > 1 else features


def unvague(y: Tensor, size: int) -> Tensor:
    """T_up: bilinear upsampling of the vague condition back to the feature resolution."""
    if y.shape[-1] == size:
        return y
    return F.interpolate(y, size=(size, size), mode="bilinear", align_corners=False)


@torch.no_grad()
def _split(protos: Tensor, lists: int, generator: torch.Generator | None, iters: int) -> tuple[Tensor, Tensor, Tensor]:
    """``protos`` split into ``lists`` groups by k-means: (the order that sorts them by group, the group
    centroids, the group sizes)."""
    start = protos[torch.randperm(len(protos), generator=generator)[:lists].to(protos.device)].clone()
    centroids = kmeans(protos, start, iters)
    for _ in range(lists):  # a list no prototype is nearest to takes the prototype farthest from its centre
        distance = torch.cdist(protos, centroids)
        group = distance.argmin(dim=1)
        counts = torch.bincount(group, minlength=lists)
        empty = torch.nonzero(counts == 0).flatten()
        if empty.numel() == 0:
            break
        centroids[empty[0]] = protos[distance.gather(1, group.unsqueeze(1)).squeeze(1).argmax()]
    return torch.argsort(group, stable=True), centroids, counts


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
        # Short lists (``config.lists``): the prototypes are stored sorted by list, list l being rows
        # list_offsets[l]:list_offsets[l + 1]; list_of[j] is prototype j's list (built by build_lists()).
        self.register_buffer("list_centroids", torch.zeros(config.lists, self.dim))
        self.register_buffer("list_offsets", torch.zeros(config.lists + 1, dtype=torch.long))
        self.register_buffer("list_of", torch.zeros(config.num_prototypes if config.lists else 0, dtype=torch.long))
        # The class of the training samples each prototype stands for (-1: unknown), for an image's class.
        self.register_buffer("owner", torch.full((config.num_prototypes,), -1, dtype=torch.long))
        if config.by_class:
            # Class c's prototypes are rows class_offsets[c]:class_offsets[c + 1], its lists class_lists[c] (-1:
            # padding), its routing keys route_keys[c] where route_valid[c]. All sized by the data (init_from;
            # loading a state dict takes the stored sizes).
            self.register_buffer("class_offsets", torch.zeros(1, dtype=torch.long))
            self.register_buffer("class_lists", torch.zeros(0, 0, dtype=torch.long))
            self.register_buffer("route_keys", torch.zeros(0, ROUTE_KEYS, self.dim))
            self.register_buffer("route_valid", torch.zeros(0, ROUTE_KEYS, dtype=torch.bool))

    @property
    def count(self) -> int:
        """The number of prototypes (with ``per_class``: the sum of the classes' budgets)."""
        return self.prototypes.shape[0]

    @property
    def per_image(self) -> int:
        """OT samples per image: its vague positions (``level="local"``) or the image itself."""
        return self.vague_size**2 if self.local else 1

    @property
    def lists(self) -> int:
        """The number of short lists in use (0: none)."""
        return self.list_centroids.shape[0]

    @property
    def routed(self) -> bool:
        """Whether images are routed to classes: ``route`` with a budget per class, once the classes are known
        (prototypes set otherwise than from classed data are one class, every image matched against all)."""
        return bool(self.config.routes) and self.route_keys.shape[0] > 0

    def _resize(self, name: str, shape: torch.Size) -> None:
        old = getattr(self, name)
        new = torch.zeros(shape, dtype=old.dtype, device=old.device)
        setattr(
            self, name, nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new
        )

    def take_sizes(self, state: dict, prefix: str = "") -> None:
        """With ``per_class``, whose sizes follow the data the prototypes were chosen from: make every tensor
        the size ``state`` (a state dict, keys under ``prefix``) holds, before loading it."""
        if not self.config.by_class:
            return

        def stored(name: str) -> Tensor | None:
            value = state.get(prefix + name)
            return value if isinstance(value, Tensor) else None

        # The count of prototypes: the classes' offsets say it; every tensor of one row per prototype takes it,
        # so a tensor of another count is named by the comparison that follows, not silently adopted.
        offsets, potential = stored("class_offsets"), stored("potential")
        count = int(offsets[-1]) if offsets is not None and offsets.numel() else None
        count = len(potential) if count is None and potential is not None and potential.ndim else count
        for name, tensor in [*self._parameters.items(), *self._buffers.items()]:
            incoming = stored(name)
            if tensor is None or incoming is None or not incoming.ndim:
                continue
            shape = incoming.shape
            if name in ("prototypes", "potential", "owner", "list_of") and count is not None and len(incoming):
                shape = torch.Size((count, *incoming.shape[1:]))
            # the counts (prototypes, lists, classes) follow the data; a prototype's width never does
            if shape != tensor.shape and (name == "class_lists" or shape[1:] == tensor.shape[1:]):
                self._resize(name, shape)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        self.take_sizes(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def init_from(
        self,
        features: Tensor,
        generator: torch.Generator | None = None,
        class_index: Tensor | None = None,
        transform=None,
    ) -> None:
        """Data-dependent start: prototypes = K random training samples (with repeats if fewer), and
        with ``init="kmeans"`` then Lloyd's k-means iterations on all training samples, so the
        prototypes start spread over the normal data as the OT assignment will use them.
        ``class_index`` (one class per image): also each prototype's class (:attr:`owner`): the class of
        the sample it is, for a coreset, else by :meth:`set_owners`. ``transform`` (e.g. the model's
        standardisation) is applied to the features a few images at a time (:class:`SampleRows`)."""
        if self.config.init == "random":
            return
        if self.config.by_class:
            self._init_per_class(features, generator, class_index, transform)
            return
        rows = SampleRows(features, self.samples, transform)
        start, idx = self._choose(rows, self.config.num_prototypes, generator)
        self.prototypes.copy_(start)
        if class_index is not None:
            if self.config.init == "coreset":
                self.owner.copy_(class_index.to(idx.device)[torch.div(idx, rows.per_image, rounding_mode="floor")])
            else:
                self.set_owners(features, class_index, transform=transform)
        if self.config.lists:
            self.build_lists(generator)

    def _choose(self, rows: SampleRows, k: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """``k`` prototypes from the samples by ``config.init`` and the rows they started from."""
        # The samples whole only where something reads them all: k-means, or a start drawn from every row.
        flat = rows if self.config.init == "coreset" else rows.materialise()
        if self.config.init.startswith("coreset"):
            idx = coreset_index(flat, k, generator)
        else:
            idx = torch.randperm(flat.shape[0], generator=generator)
        idx = idx.repeat(math.ceil(k / len(idx)))[:k]
        jitter = 0.01 * torch.randn(k, self.dim, generator=generator)
        start = flat[idx] + jitter
        if self.config.init.endswith("kmeans"):
            start = kmeans(flat, start, self.config.kmeans_iters)
        return start, idx

    @torch.no_grad()
    def _init_per_class(
        self, features: Tensor, generator: torch.Generator | None, class_index: Tensor | None, transform
    ) -> None:
        """Each class's budget chosen among its own samples (at most all of them), its lists, its routing keys."""
        classes = class_index.cpu() if class_index is not None else torch.zeros(features.shape[0], dtype=torch.long)
        num_classes = int(classes.max()) + 1
        parts, keys, valid, offsets = [], [], [], [0]
        for c in range(num_classes):
            members = torch.nonzero(classes == c).flatten()
            key = torch.zeros(ROUTE_KEYS, self.dim, device=self.prototypes.device)
            ok = torch.zeros(ROUTE_KEYS, dtype=torch.bool, device=key.device)
            if len(members):
                rows = SampleRows(features[members], self.samples, transform)
                k = min(self.config.num_prototypes, rows.shape[0])
                parts.append(self._choose(rows, k, generator)[0])
                means = torch.cat([r.view(-1, rows.per_image, self.dim).mean(dim=1) for _, r in rows.chunks()])
                if len(means) > ROUTE_KEYS:  # a few means stand for the class's looks
                    spaced = torch.linspace(0, len(means) - 1, ROUTE_KEYS).round().long()
                    means = kmeans(means, means[spaced], 20)
                key[: len(means)], ok[: len(means)] = means, True
            offsets.append(offsets[-1] + (parts[-1].shape[0] if len(members) else 0))
            keys.append(key)
            valid.append(ok)
        start = torch.cat(parts)
        self.prototypes = nn.Parameter(start.to(self.prototypes), requires_grad=self.prototypes.requires_grad)
        self.potential = torch.zeros(len(start), device=start.device)
        self.class_offsets = torch.tensor(offsets, device=start.device)
        counts = self.class_offsets.diff()
        self.owner = torch.arange(num_classes, device=start.device).repeat_interleave(counts)
        self.route_keys, self.route_valid = torch.stack(keys), torch.stack(valid)
        self.build_lists(generator)

    @torch.no_grad()
    def set_owners(
        self, features: Tensor, class_index: Tensor, batch_size: int = 64, transform=None, block: int = 4096
    ) -> None:
        """Each prototype's class: the class of the training samples whose nearest prototype it is most
        often (a prototype no sample chose keeps -1). ``class_index``: one class per image of ``features``.
        Distances ``block`` samples at a time (block x K, not a batch's every position x K)."""
        num_classes = int(class_index.max()) + 1
        votes = torch.zeros(self.count, num_classes, device=self.prototypes.device)
        rows = SampleRows(features, self.samples, transform, batch=batch_size)
        labels = class_index.to(self.prototypes.device).repeat_interleave(rows.per_image)
        for first, chunk in rows.chunks():
            chunk = chunk.to(self.prototypes.device)
            for b in range(0, chunk.shape[0], block):
                nearest = torch.cdist(chunk[b : b + block], self.prototypes).argmin(dim=1)
                cls = labels[first + b : first + b + nearest.shape[0]]
                votes.index_put_((nearest, cls), torch.ones_like(nearest, dtype=votes.dtype), accumulate=True)
        owner = votes.argmax(dim=1)
        owner[votes.sum(dim=1) == 0] = -1
        self.owner.copy_(owner)

    @torch.no_grad()
    def build_lists(self, generator: torch.Generator | None = None, iters: int = 20) -> None:
        """Split the (frozen) prototypes into ``config.lists`` groups by k-means (with ``per_class``: each class's
        prototypes into as many lists of about ``list_size`` as its budget needs) and store them sorted by
        group: the index of the short-list assignment. Reorders the prototypes (the kernel does not depend
        on their order) and everything stored per prototype."""
        if not self.config.by_class:
            order, centroids, counts = _split(self.prototypes.detach(), self.config.lists, generator, iters)
            self._store_lists(order, centroids, counts)
            return
        if self.class_offsets.numel() < 2 or int(self.class_offsets[-1]) != self.count:  # classes unknown: one
            self.class_offsets = torch.tensor([0, self.count], device=self.owner.device)
            self.route_keys, self.route_valid = self.route_keys[:0], self.route_valid[:0]
        offsets = self.class_offsets.tolist()
        device = self.owner.device
        if not self.config.lists:  # no lists: every prototype of the routed classes
            empty = torch.zeros(0, dtype=torch.long, device=device)
            self._store_lists(torch.arange(self.count, device=device), self.list_centroids[:0], empty)
            self.class_lists = torch.zeros(len(offsets) - 1, 0, dtype=torch.long, device=device)
            return
        orders, centroids, counts, per_class, total = [], [], [], [], 0
        for c in range(len(offsets) - 1):
            members = self.prototypes.detach()[offsets[c] : offsets[c + 1]]
            lists = math.ceil(len(members) / self.config.list_size)
            if lists:
                order, centre, count = _split(members, lists, generator, iters)
                orders.append(order + offsets[c])
                centroids.append(centre)
                counts.append(count)
            per_class.append(list(range(total, total + lists)))
            total += lists
        width = max(len(x) for x in per_class)
        self._store_lists(torch.cat(orders), torch.cat(centroids), torch.cat(counts))
        self.class_lists = torch.tensor(
            [x + [-1] * (width - len(x)) for x in per_class], dtype=torch.long, device=self.owner.device
        )

    def _store_lists(self, order: Tensor, centroids: Tensor, counts: Tensor) -> None:
        order = order.to(self.owner.device)
        self.prototypes.copy_(self.prototypes.detach()[order])
        self.potential.copy_(self.potential[order])
        self.owner.copy_(self.owner[order])
        self.list_centroids = centroids.clone()
        self.list_offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        self.list_of = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)

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

    def forward(
        self, features: Tensor, with_loss: bool = True, histogram: bool = False, num_classes: int = 0
    ) -> dict[str, Tensor]:
        """Return ``yhat`` (B x C x S x S), the OT loss and the plan.

        In training mode the plan is the balanced Sinkhorn plan of the batch (the paper's Eq. 9-11)
        and the stored potential is updated; in eval mode each image is assigned on its own with the
        stored potential, so its ``yhat`` does not depend on the batch.

        ``with_loss=False`` (eval mode only: inference) returns ``yhat`` alone (and, when asked, each image's
        mean ``histogram`` of weights and ``class_mass``: :meth:`_assign`): the OT loss and the plan are
        B*P x K element-wise passes that inference never reads, and with thousands of local prototypes
        they cost more than the denoiser.
        """
        if not with_loss:
            if self.training:
                raise RuntimeError("VaguePrototypes(with_loss=False) is for inference: call .eval() first")
            return self._assign(features, histogram, num_classes)
        if self.lists and self.training:
            raise RuntimeError(
                "short lists (prototypes.list_size) assign frozen prototypes: train with the precomputed "
                "condition (VPDM.training_condition)"
            )
        batch = features.shape[0]
        flat = self.samples(features)
        cost = self.cost(flat)
        b, k = cost.shape
        reg = self.config.ot_reg
        if self.config.assignment == "nearest":
            weights = F.one_hot(cost.argmin(dim=1), k).to(cost.dtype)
            ot_loss = (
                (weights * cost).sum(dim=1).mean()
            )  # reported only; the ablation trains with lambda=0 or this k-means-like term
            plan = weights / b
        elif self.lists or (
            self.routed and not self.training
        ):  # eval mode (a validation loss): the inference assignment, short lists and all
            weights = self.weights(flat)
            plan = weights / b
            ot_loss = (plan * cost).sum() + reg * (plan * plan.clamp_min(1e-30).log()).sum()
        else:
            if self.config.ot_scope == "none":
                potential = torch.zeros_like(self.potential)
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
            n = chunk.shape[0]
            if self.config.by_class and self.lists:  # thousands of prototypes per class: never n x K
                y, _, _, lse = self._short_list(flat, self.per_image, False, 0)
                per_sample = -reg * lse  # <w, C> + reg <w, log w> of w = softmax(-C / reg) over the candidates
            else:
                cost = self.cost(flat)
                weights = self.weights(flat)  # the inference assignment (short lists included)
                if self.config.assignment == "nearest":
                    per_sample = cost.min(dim=1).values
                else:
                    entropy = (weights * weights.clamp_min(1e-30).log()).sum(dim=1)
                    per_sample = (weights * cost).sum(dim=1) + reg * entropy
                y = weights @ self.prototypes
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
        samples = terms.shape[0] * self.per_image
        return terms.mean() - self.config.ot_reg * math.log(samples)

    def weights(self, flat: Tensor) -> Tensor:
        """Inference assignment weights of samples (n x K, rows sum to 1): softmax((g - C) / eps) over every
        prototype, or over the prototypes of each sample's ``probes`` nearest lists (``config.lists``; 0
        elsewhere), or one-hot for ``assignment='nearest'``. The reference the fast paths are tested against."""
        if self.config.assignment == "nearest":
            cost = self.cost(flat)
            return F.one_hot(cost.argmin(dim=1), cost.shape[1]).to(cost.dtype)
        # softmax((g - C) / reg) with C = dist / sqrt(d); g = 0 without a prototype marginal
        logits = torch.cdist(flat, self.prototypes).mul_(-1.0 / (math.sqrt(self.dim) * self.config.ot_reg))
        if self.config.ot_scope != "none":
            logits.add_(self.potential.unsqueeze(0) / self.config.ot_reg)
        if self.lists:
            logits = logits.masked_fill(~self._probed(flat)[:, self.list_of], float("-inf"))
        elif self.routed:  # every prototype of the routed classes
            per_image = self.per_image
            route = self._route(flat, per_image)  # B x r
            allowed = (self.owner.view(1, 1, -1) == route.unsqueeze(2)).any(dim=1)
            logits = logits.masked_fill(~allowed.repeat_interleave(per_image, dim=0), float("-inf"))
        return torch.softmax(logits, dim=1)

    def _check_lists(self) -> None:
        if not torch.jit.is_tracing() and int(self.list_offsets[-1]) != self.count:
            raise RuntimeError(
                f"the short lists of these {self.count} prototypes were never built: "
                "call init_from() or build_lists() after setting the prototypes (or list_size=0)"
            )

    def _probed(self, flat: Tensor) -> Tensor:
        """n x lists: whether each list is among a sample's ``probes`` nearest (by centroid distance)."""
        self._check_lists()
        if not self.routed:
            distance = torch.cdist(flat, self.list_centroids)
            kth = distance.topk(min(self.config.probes, self.lists), dim=1, largest=False).values[:, -1:]
            return distance <= kth
        _, nearest, _ = self._nearest_lists(flat)
        probed = torch.zeros(flat.shape[0], self.lists + 1, dtype=flat.dtype, device=flat.device)
        probed.scatter_(1, nearest + 1, torch.ones_like(nearest, dtype=flat.dtype))  # column 0: padding
        return probed[:, 1:] > 0

    def _route(self, flat: Tensor, per_image: int) -> Tensor:
        """B x r: each image's ``route`` nearest classes, by the mean of its samples against each class's keys."""
        means = flat.view(-1, per_image, self.dim).mean(dim=1)
        classes, keys = self.route_keys.shape[:2]
        distance = torch.cdist(means, self.route_keys.reshape(classes * keys, self.dim)).view(-1, classes, keys)
        nearest = distance.masked_fill(~self.route_valid.unsqueeze(0), float("inf")).amin(dim=2)
        return nearest.topk(min(self.config.routes, classes), dim=1, largest=False).indices

    def _nearest_lists(
        self, flat: Tensor, flat_augmented: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Each sample's ``probes`` nearest lists, nearest first: (n x p centroid distances, n x p list numbers,
        the routed classes: B x r or None), among the lists of its image's routed classes with ``route`` (fewer
        there: distance inf, number -1). ``flat_augmented``: the samples as :func:`_augmented` rows, if the
        caller has them."""
        probes = min(self.config.probes, self.lists)
        if flat_augmented is None:
            flat_augmented = _augmented(flat)
        # kept between calls; computed in the graph while traced for export (the constants key on storage)
        centroids = (
            _augmented(self.list_centroids, True) if torch.jit.is_tracing() else self._list_constants().centroids
        )
        if not self.routed:
            squared, nearest = (flat_augmented @ centroids.T).topk(probes, dim=1, largest=False)
            return squared.clamp_min_(0.0).sqrt_(), nearest, None
        per_image = self.per_image
        batch = flat.shape[0] // per_image
        route = self._route(flat, per_image)
        candidates = self.class_lists[route].flatten(1)  # B x r * lists per class
        # squared distances from one product of augmented rows; ranked before the root, taken of the chosen only
        squared = torch.bmm(
            flat_augmented.view(batch, per_image, -1), centroids[candidates.clamp_min(0)].transpose(1, 2)
        )  # B x P x candidates
        squared = squared.masked_fill_((candidates < 0).unsqueeze(1), float("inf"))
        squared, pick = squared.topk(min(probes, candidates.shape[1]), dim=2, largest=False)
        nearest = candidates.unsqueeze(1).expand(-1, per_image, -1).gather(2, pick)
        nearest = nearest.masked_fill(torch.isinf(squared), -1)
        distance = squared.clamp_min_(0.0).sqrt_()
        return distance.reshape(batch * per_image, -1), nearest.reshape(batch * per_image, -1), route

    def _list_constants(self) -> _ListConstants:
        """Constants of the short lists, kept until the prototypes change: passes over all K values that, once
        per batch, cost more than the batch's own short lists when K is large (a budget per class: hundreds of
        thousands). The ranks by size let lists of like sizes share a padded block (:meth:`_short_list`)."""
        tensors = (self.prototypes, self.list_centroids, self.owner)
        key = tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in tensors)
        if getattr(self, "_constants_key", None) != key:
            with torch.no_grad():
                protos = self.prototypes.detach()
                radius = 0.0
                for start in range(0, len(protos), 65536):
                    rows = protos[start : start + 65536]
                    centre = self.list_centroids[self.list_of[start : start + 65536]]
                    radius = max(radius, float((rows - centre).pow(2).sum(dim=1).max().sqrt()))
                owned = False
                if self.config.by_class and self.class_offsets.numel() > 1:
                    sizes = self.class_offsets.diff()
                    classes = torch.arange(len(sizes), device=sizes.device).repeat_interleave(sizes)
                    owned = classes.shape == self.owner.shape and bool(torch.equal(classes, self.owner))
                by_size = torch.argsort(self.list_offsets.diff(), descending=True, stable=True)
                rank = torch.empty_like(by_size)
                rank[by_size] = torch.arange(len(by_size), device=by_size.device)
                centroids = _augmented(self.list_centroids, prototype_side=True)
                self._constants = _ListConstants(
                    radius, owned, _augmented(protos, prototype_side=True), rank, by_size, centroids
                )
            self._constants_key = key
        return self._constants

    def _short_list(
        self, flat: Tensor, per_image: int, histogram: bool, num_classes: int
    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
        """:meth:`weights` @ prototypes with short lists, without the n x K matrices: the samples are grouped
        by probed list and each group is matched against its list's prototypes alone (one small product per
        list), with a softmax over all of a sample's candidates. Also, when asked, each image's mean weights
        (B x K) and its weight on each class's prototypes (B x classes); and each sample's log-sum-exp of its
        logits (its OT term is -eps times that)."""
        self._check_lists()
        n, device = flat.shape[0], flat.device
        scale = 1.0 / (math.sqrt(self.dim) * self.config.ot_reg)
        flat_augmented = _augmented(flat)
        centroid_distance, nearest, route = self._nearest_lists(flat, flat_augmented)
        constants = self._list_constants()
        radius, owned, augmented = constants.radius, constants.owned, constants.prototypes
        lists = nearest.reshape(-1)
        queries = torch.arange(n, device=device).repeat_interleave(nearest.shape[1])
        if self.routed:  # fewer lists than probes in the routed classes: drop the padding
            lists, queries = lists[lists >= 0], queries[lists >= 0]
        # pairs grouped by list, the lists largest first: a run of lists of like sizes pads little
        ranks = constants.rank[lists]
        order = torch.argsort(ranks, stable=True)
        queries = queries[order]
        counts_of_rank = torch.bincount(ranks, minlength=self.lists)
        probed_ranks = torch.nonzero(counts_of_rank).flatten()  # a loop over thousands of lists: only those in use
        counts = counts_of_rank[probed_ranks].tolist()
        probed_lists = constants.by_size[probed_ranks].tolist()
        offsets = self.list_offsets.tolist()
        # The softmax is shift-invariant; shifting each sample's logits by its nearest centroid's distance
        # bounds them to [-scale R, scale R] (R: the largest distance of a prototype to its list's centroid;
        # triangle inequality, the nearest list is always probed), so when scale R is small enough for exp
        # the kernel is summed in one pass, list by list, without keeping the logits for a max.
        one_pass = scale * radius <= 60.0
        shift = (
            centroid_distance[:, 0] * scale
            if one_pass
            else torch.full((n,), float("-inf"), device=device, dtype=flat.dtype)
        )  # two passes: the running max of each row
        # With one route per image every weight is on the routed class's prototypes (owned by it, as a budget per
        # class sets them): its class mass is that class, no product needed.
        mass_from_route = bool(num_classes) and owned and route is not None and route.shape[1] == 1
        keep = histogram or (bool(num_classes) and not mass_from_route) or not one_pass
        prototypes = self.prototypes.detach()  # frozen: short lists are built once the prototypes are fixed
        y = torch.zeros(n, self.dim, device=device, dtype=flat.dtype)
        total = torch.zeros(n, device=device, dtype=flat.dtype)
        # one pass: each (sample, list) pair's kernel sum, added to its sample's total once all are known
        sums = torch.empty(len(queries), device=device, dtype=flat.dtype) if one_pass else None
        blocks: list[tuple[int, Tensor, Tensor]] = []
        lengths = [offsets[group + 1] - offsets[group] for group in probed_lists]
        for first, stop, groups in _chunks_of_lists(probed_lists, counts, _PAIRS_PER_CHUNK, lengths):
            # A run of a few thousand (sample, list) pairs: its samples gathered once, each list's products
            # written into one block padded to the run's longest list (distance inf: weight 0), and the
            # element-wise passes made once on the block; per list, per-op overhead costs as much as the products.
            rows = queries[first:stop]
            samples = flat_augmented[rows]
            width = offsets[groups[0][0] + 1] - offsets[groups[0][0]]  # the run's longest list: its first
            logits = torch.full((stop - first, width), float("inf"), device=device, dtype=flat.dtype)
            for group, a, b in groups:
                members = slice(offsets[group], offsets[group + 1])
                torch.mm(samples[a:b], augmented[members].T, out=logits[a:b, : members.stop - members.start])
            logits.clamp_min_(0.0).sqrt_()
            if one_pass:
                # exp(shift - scale d): the shift bounds it (see above)
                e = torch.sub(shift[rows].unsqueeze(1), logits, alpha=scale, out=logits).exp_()
                torch.sum(e, dim=1, out=sums[first:stop])
                kernel_sums = torch.empty(stop - first, self.dim, device=device, dtype=flat.dtype)
                for group, a, b in groups:
                    members = slice(offsets[group], offsets[group + 1])
                    torch.mm(e[a:b, : members.stop - members.start], prototypes[members], out=kernel_sums[a:b])
                y.index_add_(0, rows, kernel_sums)
            else:
                logits.mul_(-scale)
                shift.scatter_reduce_(0, rows, logits.amax(dim=1), reduce="amax")
            if keep:
                for group, a, b in groups:
                    blocks.append((group, rows[a:b], logits[a:b, : offsets[group + 1] - offsets[group]]))
        if one_pass:
            total.index_add_(0, queries, sums)
        else:
            for group, rows, logits in blocks:
                e = logits.sub_(shift[rows].unsqueeze(1)).exp_()  # in place: the logits are not needed again
                total.index_add_(0, rows, e.sum(dim=1))
                y.index_add_(0, rows, e @ prototypes[offsets[group] : offsets[group + 1]])
        y = y / total.unsqueeze(1)
        lse = total.log() - shift if one_pass else total.log() + shift
        hist = mass = None
        if histogram or num_classes:
            batch = n // per_image
            hist = torch.zeros(batch, self.count, device=device, dtype=flat.dtype) if histogram else None
            mass = torch.zeros(batch, num_classes, device=device, dtype=flat.dtype) if num_classes else None
            if mass_from_route:
                mass.scatter_(1, route, 1.0)
            for group, rows, e in blocks:
                norm = (total[rows] * per_image).reciprocal().unsqueeze(1)
                image = torch.div(rows, per_image, rounding_mode="floor")
                if hist is not None:
                    hist[:, offsets[group] : offsets[group + 1]].index_add_(0, image, e * norm)
                if mass is not None and not mass_from_route:  # normalised after the product: rows x classes
                    owner = self.owner[offsets[group] : offsets[group + 1]]
                    mass.index_add_(0, image, (e @ _one_hot(owner, num_classes, e.dtype)).mul_(norm))
        return y, hist, mass, lse

    def _assign(self, features: Tensor, histogram: bool = False, num_classes: int = 0) -> dict[str, Tensor]:
        """Eval-mode ``forward`` without the loss: ``yhat``; with ``histogram`` each image's mean weights
        (B x K, what a calibration compares classes by), with ``num_classes`` its weight on each class's
        prototypes (B x classes, :meth:`set_owners`). Short lists run grouped by list (:meth:`_short_list`),
        except while traced for export, where the masked dense form gives the same numbers."""
        batch = features.shape[0]
        flat = self.samples(features)
        per_image = self.per_image
        out: dict[str, Tensor] = {}
        if self.lists and not torch.jit.is_tracing():
            y, hist, mass, _ = self._short_list(flat, per_image, histogram, num_classes)
            if hist is not None:
                out["histogram"] = hist
            if mass is not None:
                out["class_mass"] = mass
        else:
            weights = self.weights(flat)
            y = weights @ self.prototypes
            if histogram:
                out["histogram"] = weights.reshape(batch, per_image, -1).mean(dim=1)
            if num_classes:
                out["class_mass"] = (
                    (weights @ _one_hot(self.owner, num_classes, weights.dtype))
                    .reshape(batch, per_image, num_classes)
                    .mean(dim=1)
                )
        if self.local:
            y = y.view(batch, self.vague_size, self.vague_size, self.channels).permute(0, 3, 1, 2)
        else:
            y = y.view(batch, self.channels, self.vague_size, self.vague_size)
        out["yhat"] = unvague(y, self.feature_size)
        return out

    @torch.no_grad()
    def _update_potential(self, g: Tensor) -> None:
        g = g - g.mean()  # Sinkhorn duals are defined up to a constant; fix the gauge before averaging
        if not bool(self.potential_initialised):
            self.potential.copy_(g)
            self.potential_initialised.fill_(True)
        else:
            m = self.config.potential_momentum
            self.potential.mul_(m).add_((1 - m) * g)


FINE_INITS = ("coreset", "coreset_kmeans", "kmeans")


@dataclass
class FineConfig:
    """Fine prototypes: every feature position on its own (no vague step) is matched to K prototypes of
    single positions, and the kernel average is compared with the features directly (no diffusion).

    The vague condition describes N x N blocks; a part lying at any place and angle, or a defect of a few
    pixels, is a mixture inside a block that no set of block prototypes covers, and it is averaged away
    (``benchmarks/EXPERIMENTS.md`` section 16). Positions chosen by a coreset (greedy k-center, as
    PatchCore's memory bank) keep rare looks, such as a small part on a plain background, covered. Short
    lists keep the cost of matching every position near that of the vague condition."""

    num_prototypes: int = 12288  # K (per class with per_class); 0 = no fine prototypes (the paper)
    ot_reg: float = 0.05  # kernel width eps, as prototypes.ot_reg
    init: str = "coreset"  # "coreset", "coreset_kmeans" or "kmeans" (VPOTConfig.init)
    kmeans_iters: int = 20
    list_size: int = 96  # short lists (VPOTConfig.list_size); 0 = every prototype
    probes: int = 2  # EXPERIMENTS #127: as 4 on every category but tile (-0.4 image), 3-4 ms less per image
    per_class: bool = True  # K per class (VPOTConfig.per_class)
    route: int = 1  # candidate classes per image (VPOTConfig.route; per_class only)

    def validate(self, feature_size: int | None = None) -> None:
        k = self.num_prototypes
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ConfigError(f"model.fine.num_prototypes must be an integer >= 0 (0 = none), got {k!r}")
        if self.init not in FINE_INITS:
            raise ConfigError(f"model.fine.init must be one of {', '.join(FINE_INITS)}, got {self.init!r}")
        if k:
            try:
                self.prototypes_config().validate(feature_size)
            except ConfigError as exc:
                raise ConfigError(str(exc).replace("prototypes.", "model.fine.")) from None

    def prototypes_config(self) -> VPOTConfig:
        """The VPOT settings of the fine prototypes: local, N = 1, a kernel without prototype marginal."""
        return VPOTConfig(
            num_prototypes=self.num_prototypes,
            downsample=1,
            level="local",
            ot_scope="none",
            assignment="ot",
            ot_reg=self.ot_reg,
            init=self.init,
            kmeans_iters=self.kmeans_iters,
            list_size=self.list_size,
            probes=self.probes,
            per_class=self.per_class,
            route=self.route,
        )
