"""Planning a sweep: its settings (SweepConfig) and the check of everything before any trial (plan_sweep): preset, search space, data, tracking URI, experiment, storage; a resumed sweep's saved settings."""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from tune.features import split_validation
from tune.presets import Preset, ResolvedSpace, apply_search_overrides, get_preset, validate_space
from tune.registry import registered_name
from tune.tracking import check_experiment_free, check_tracking_uri, find_experiment, resolve_tracking_uri
from vpdm.config.schema import VPDMConfig
from vpdm.config.values import check_finite
from vpdm.errors import ConfigError, DataError, OutputError, VPDMError
from vpdm.io import writable_dir

logger = logging.getLogger("tune.sweep")  # the sweep's console logger (tune.sweep configures it)

METRIC_MODES = {"val_pseudo_auroc": "max", "val_same_class_auroc": "max", "val_loss": "min"}
TRIAL_LINES, RAY_OUTPUT = 1, 2  # SweepConfig.verbose levels: one line per trial event; Ray's own output too
DEFAULT_STORAGE = "runs/sweeps"


class SweepError(VPDMError):
    """The sweep cannot start (cluster too small, nothing to run, ...)."""


@dataclass
class SweepConfig:
    """Everything a sweep needs; ``jobs/sweep.py`` maps its arguments 1:1 onto these fields."""

    datasets: list[str] = field(default_factory=lambda: ["demo"])  # each its own model; "a,b" = one union model
    preset: str = "demo"
    ablation: str | None = None
    trials: int | None = None  # per dataset; None = the preset's
    epochs: int | None = None  # per trial; None = the preset's
    workers: int = 2  # Ray Train workers (DDP ranks) per trial
    threads_per_worker: int = 1  # CPUs (torch threads) per worker
    use_gpu: bool | None = None  # None = yes when the cluster has a GPU for every worker
    max_concurrent: int | None = None  # trials at once; None = as many as the cluster's CPUs fit
    overrides: list[str] = field(default_factory=list)  # vpdm "key=value" settings (pin a searched key too)
    search: list[str] = field(default_factory=list)  # "key=int:lo:hi" / "key=choice:a,b" / "key=off"
    metric: str | None = (
        None  # "val_pseudo_auroc" / "val_same_class_auroc" (max) or "val_loss" (min); None = the preset's
    )
    tracking_uri: str | None = None  # None = $MLFLOW_TRACKING_URI or sqlite:///mlflow.db
    experiment: str | None = None  # None = "vpdm-<preset>-<timestamp>"
    model_name: str | None = None  # None = vpdm-<dataset> per dataset; else the name (one dataset) or a prefix
    promote: bool = False  # make each dataset's challenger champion even when it does not beat the champion
    storage: str = DEFAULT_STORAGE  # Ray Tune/Train results (checkpoints)
    address: str | None = None  # Ray cluster; None = $RAY_ADDRESS or a local Ray started here
    num_cpus: int | None = None  # logical CPUs of a local Ray; None = enough for max_concurrent trials
    ray_temp_dir: str | None = None  # local Ray's session folder
    dashboard: bool | None = None  # local Ray's dashboard: None = when ray[default] is installed
    seed: int = 0
    val_fraction: float = 0.15
    grace_period: int | None = None  # ASHA; None = the preset's
    reduction_factor: float = 2.0
    max_failures: int = 1  # Ray Train worker-group restarts per trial (resume from the last checkpoint)
    register: bool = True
    # Console: 0 the sweep's own lines and summary; 1 also one line per trial start, epoch and end; 2 also Ray's
    # own output (Tune's status tables, every trial's and Train worker's output). Ray's output always goes to
    # its session logs (SweepResult.ray_logs), the epochs' metrics to the trial folders and MLflow.
    verbose: int = 1
    resume: bool = False  # continue the sweep named `experiment` (Tuner.restore); its saved settings are used


# What a resumed sweep takes from the saved settings (the rest says where and how to run it now).
RESUMED_FIELDS = (
    "datasets",
    "preset",
    "ablation",
    "trials",
    "epochs",
    "workers",
    "threads_per_worker",
    "overrides",
    "search",
    "metric",
    "model_name",
    "seed",
    "val_fraction",
    "grace_period",
    "reduction_factor",
    "max_failures",
    "register",
)
# Asked for now or when the sweep started: a resumed sweep forces the promotion if either run asked for it.
RESUMED_OR_FIELDS = ("promote",)
SETTINGS_FILE = "sweep_config.json"


# -- planning (validation, no side effects) -----------------------------------------------------------


@dataclass
class DatasetPlan:
    name: str
    spec: str
    config: VPDMConfig
    num_train: int
    num_test: int
    model_name: str = ""  # its registered model (tune.registry.registered_name)


@dataclass
class SweepPlan:
    config: SweepConfig
    preset: Preset
    space: ResolvedSpace
    datasets: list[DatasetPlan]
    trials: int
    epochs: int
    metric: str
    mode: str
    tracking_uri: str
    experiment: str
    sweep_id: str
    storage: Path
    grace_period: int
    warnings: list[str] = field(default_factory=list)
    experiment_id: str | None = None  # set when resuming (the experiment exists)


def parse_datasets(items: list[str]) -> list[tuple[str, str]]:
    """``[(name, spec)]`` from ``--data`` values: ``;`` separates datasets, ``NAME=SPEC`` names one."""
    out: list[tuple[str, str]] = []
    for item in items:
        for part in str(item).split(";"):
            part = part.strip()
            if not part:
                continue
            name, spec = None, part
            head, sep, tail = part.partition("=")
            if sep and re.fullmatch(r"[A-Za-z0-9_.-]+", head.strip()):
                name, spec = head.strip(), tail.strip()
            out.append((name or dataset_slug(spec), spec))
    if not out:
        raise ConfigError("no dataset given: pass a data spec such as 'demo' or 'mvtec:/data/mvtec'")
    names: dict[str, int] = {}
    unique = []
    for name, spec in out:
        n = names.get(name, 0)
        names[name] = n + 1
        unique.append((name if n == 0 else f"{name}-{n + 1}", spec))
    return unique


def dataset_slug(spec: str) -> str:
    """A short name for a data spec: 'demo', 'mvtec-bottle', 'mvtec-bottle+mpdd' for a union."""
    parts = []
    for entry in spec.split(","):
        entry = entry.strip()
        if not entry:
            continue
        kind, _, path = entry.partition(":")
        leaf = Path(path.strip().rstrip("/")).name if path.strip() else ""
        parts.append(re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{kind}-{leaf}" if leaf else kind).strip("-"))
    return "+".join(parts)[:60] or "data"


def plan_sweep(sc: SweepConfig) -> SweepPlan:
    """Check everything that can be checked before starting Ray or any trial (raises VPDMError)."""
    from vpdm.data.layouts import list_samples

    if sc.resume:
        sc = _with_saved_settings(sc)
    preset = get_preset(sc.preset, sc.ablation)
    check_finite(sc)  # val_fraction, reduction_factor: NaN/inf by name
    for name, value, low in (
        ("workers", sc.workers, 1),
        ("threads_per_worker", sc.threads_per_worker, 1),
        ("max_failures", sc.max_failures, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    trials = preset.trials if sc.trials is None else sc.trials
    epochs = preset.epochs if sc.epochs is None else sc.epochs
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ConfigError(f"trials must be an integer >= 1, got {trials!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs must be an integer >= 1, got {epochs!r}")
    for name, value in (("max_concurrent", sc.max_concurrent), ("num_cpus", sc.num_cpus)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    if not 0.0 < sc.val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {sc.val_fraction!r}")
    if sc.reduction_factor <= 1:
        raise ConfigError(f"reduction_factor must be > 1, got {sc.reduction_factor!r}")
    metric = sc.metric or preset.metric
    if metric not in METRIC_MODES:
        raise ConfigError(f"metric {metric!r} is unknown; expected one of {', '.join(METRIC_MODES)}")
    grace = preset.grace_period if sc.grace_period is None else sc.grace_period
    if not isinstance(grace, int) or grace < 1:
        raise ConfigError(f"grace_period must be an integer >= 1, got {grace!r}")
    if sc.promote and not sc.register:
        raise ConfigError("--promote makes the registered challenger champion; it cannot go with --no-register")
    parsed = parse_datasets(sc.datasets)
    model_names = [registered_name(sc.model_name, name, len(parsed)) for name, _ in parsed]

    # The base config: library defaults <- preset's fixed settings <- the user's --set <- the budget.
    base = VPDMConfig().with_overrides(dict(preset.fixed))
    user: dict[str, Any] = {}
    if sc.overrides:
        import yaml

        for item in sc.overrides:
            if "=" not in item:
                raise ConfigError(f"--set {item!r} must look like section.key=value")
            key, raw = item.split("=", 1)
            key = key.strip()
            user[key] = raw if key.endswith("spec") or key == "backbone.weights" else yaml.safe_load(raw)
        base = base.with_overrides(user)
    base = base.with_overrides({"train.epochs": epochs})
    if user.get("data.spec") is not None:
        raise ConfigError("set the data with --data (datasets), not --set data.spec")
    # A key the user pinned with --set leaves the search space; --search edits it.
    space = tuple(d for d in preset.space if d.key not in user)
    space = apply_search_overrides(space, sc.search)
    base.validate()
    validate_space(base, space)
    if base.calibration.method not in ("auto", "quantile"):
        raise ConfigError(
            f"calibration.method={base.calibration.method}: a sweep calibrates each trial's thresholds on "
            "held-out normal images (quantile method); it has no labelled validation data for "
            "f1/recall: calibrate the champion's checkpoint with 'vpdm calibrate --val-data SPEC'"
        )
    if base.calibration.choose_map_weights:
        raise ConfigError(
            "calibration.choose_map_weights=true: a sweep calibrates on held-out normal images and has no labelled "
            "defects to choose the map's weights by: choose them for the champion's checkpoint with 'vpdm calibrate "
            "--val-data SPEC --set calibration.choose_map_weights=true'"
        )

    datasets = []
    for (name, spec), model_name in zip(parsed, model_names):
        cfg = base.with_overrides({"data.spec": spec}).validate()
        train = list_samples(spec, "train")  # DataError naming the path for a missing/bad dataset
        test = list_samples(cfg.data.test_spec or spec, "test", cfg.data.missing_masks)
        class_index = np.unique([x.category for x in train], return_inverse=True)[1]
        per_worker = len(split_validation(class_index, sc.val_fraction, sc.seed)[0]) / sc.workers
        if per_worker < 2:
            raise DataError(
                f"dataset {name!r} has {len(train)} training images: too few for {sc.workers} workers "
                f"(each needs >= 2 after holding out {sc.val_fraction:.0%} for validation)"
            )
        datasets.append(DatasetPlan(name, spec, cfg, len(train), len(test), model_name))

    uri = resolve_tracking_uri(sc.tracking_uri)
    check_tracking_uri(uri)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    experiment = sc.experiment or f"vpdm-{preset.name.replace('+', '-')}-{stamp}-{os.getpid() % 10000:04d}"
    experiment_id = find_experiment(uri, experiment) if sc.resume else None
    if not sc.resume:
        check_experiment_free(uri, experiment)
    storage = Path(sc.storage).expanduser().resolve()
    try:
        writable_dir(storage, what="storage folder")
    except OutputError as exc:
        raise SweepError(str(exc)) from None
    sweep_id = _sweep_id(experiment)
    return SweepPlan(
        sc,
        preset,
        ResolvedSpace(preset, base, space),
        datasets,
        trials,
        epochs,
        metric,
        METRIC_MODES[metric],
        uri,
        experiment,
        sweep_id,
        storage,
        grace,
        _job_warnings(uri, storage),
        experiment_id,
    )


def _sweep_id(experiment: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", experiment)


def _with_saved_settings(sc: SweepConfig) -> SweepConfig:
    """A resumed sweep runs with the settings it was started with (saved next to its Ray results):
    the search, datasets and budget must not change under Tuner.restore."""
    from dataclasses import replace

    if not sc.experiment:
        raise ConfigError("--resume needs --experiment NAME: the MLflow experiment of the sweep to continue")
    folder = Path(sc.storage).expanduser().resolve() / _sweep_id(sc.experiment)
    saved_path = folder / SETTINGS_FILE
    if not saved_path.is_file():
        raise SweepError(
            f"--resume: no saved sweep at {saved_path} (expected the --storage folder the sweep "
            f"{sc.experiment!r} was started with)"
        )
    try:
        saved = json.loads(saved_path.read_text())
    except (OSError, ValueError) as exc:
        raise SweepError(f"--resume: cannot read {saved_path}: {exc}") from None
    changed = [
        k
        for k in RESUMED_FIELDS
        if k in saved and getattr(sc, k) != saved[k] and getattr(sc, k) != getattr(SweepConfig(), k)
    ]
    if changed:
        logger.warning("--resume: ignoring %s (the sweep keeps the settings it was started with)", ", ".join(changed))
    return replace(
        sc,
        **{k: saved[k] for k in RESUMED_FIELDS if k in saved},
        **{k: bool(getattr(sc, k) or saved.get(k)) for k in RESUMED_OR_FIELDS},
    )


def _job_warnings(uri: str, storage: Path) -> list[str]:
    """Under `ray job submit --working-dir`, the cwd is a copy Ray deletes with the cluster's session."""
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
        return []
    from tune.tracking import local_store_dir

    cwd = Path.cwd().resolve()
    out = []
    store = local_store_dir(uri)
    if store is not None and (store == cwd or cwd in store.parents):
        out.append(
            f"the MLflow store {uri} is inside the job's working directory, which Ray deletes with its session; "
            "pass --tracking-uri (a server, or sqlite:////absolute/path/mlflow.db) to keep it"
        )
    if storage == cwd or cwd in storage.parents:
        out.append(
            f"Ray results ({storage}) are inside the job's working directory; pass --storage /absolute/shared/path"
        )
    return out
