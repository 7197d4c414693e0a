"""Distributed VPDM sweeps: Ray Tune + Optuna + ASHA over Ray Train runs, tracked in MLflow.

``run_sweep(SweepConfig(...))`` does, in this order:

1. **Validate everything** before any trial: the preset and ablation, ``--set`` overrides, every
   bound of the search space (:func:`tune.presets.validate_space`), every data spec (files listed
   and checked), the tracking URI (reachable / writable), the experiment name (unused), the storage
   folder (writable), and that the Ray cluster can fit one trial.
2. **Ray**: connect to the cluster (or start a local one) and check it fits one trial; then
   **MLflow**: create the sweep's experiment and a parent run (driver only).
3. **Features once**: one backbone for the sweep extracts (or loads from the on-disk cache) the
   train and test features of each dataset once; each dataset's bundle is ``ray.put`` once and
   shared by every trial and every Train worker (:mod:`tune.features`).
4. **Per dataset**, a ``tune.Tuner`` over the function trainable :func:`tune.trial.run_trial`
   (OptunaSearch, ASHA on the validation metric, ``max_concurrent_trials``), each trial a
   ``TorchTrainer`` with ``num_workers`` DDP workers; then close the runs ASHA stopped, pick the
   best completed trial by the validation metric and register it as ``<name>@challenger``; the alias
   ``champion`` moves to it only when it beats the current champion on this sweep's validation data,
   when there is none yet, or with ``promote`` (:mod:`tune.registry`).
5. A :class:`SweepResult` with everything a person wants to see (``summary_text()``), also written
   to ``<storage>/<sweep>/summary.json`` and to the parent run.

Several datasets in one sweep (``datasets=["mvtec:/a", "visa:/b"]``) each get their own unified
model, trials and registered model (``vpdm-<dataset>`` by default, ``<model_name>-<dataset>`` with a
``model_name``); a data spec with commas (``"mvtec:/a,mpdd:/b"``) is *one* dataset: the union, one model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from tune.features import FeatureStats, split_validation
from tune.presets import Preset, ResolvedSpace, apply_search_overrides, get_preset, validate_space
from tune.registry import CHALLENGER, CHAMPION, Promotion, ValidationData, registered_name
from tune.tracking import check_experiment_free, check_tracking_uri, find_experiment, resolve_tracking_uri, ui_command
from vpdm.config.schema import VPDMConfig
from vpdm.config.values import check_finite, to_dict
from vpdm.errors import ConfigError, DataError, OutputError, VPDMError
from vpdm.io import writable_dir

logger = logging.getLogger("tune.sweep")

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


@dataclass
class TrialSummary:
    trial_id: str
    name: str
    status: str  # completed | stopped (ASHA) | diverged (NaN/inf loss) | error
    epochs: int
    metric: float | None
    val_loss: float | None
    test: dict[str, float]
    params: dict[str, Any]
    mlflow_run_id: str | None
    model_uri: str | None
    error: str | None = None
    mlflow_pending: int = 0  # MLflow calls kept in the trial's folder (server unreachable): python -m tune.recover
    backbone_forwards: int = 0  # in the trial's processes for training/evaluation (expected 0)
    example_forwards: int = 0  # MLflow's input example of the logged model


@dataclass
class DatasetResult:
    name: str
    spec: str
    features: FeatureStats
    trials: list[TrialSummary]
    best: TrialSummary | None
    registered_model: str | None = None
    registered_version: str | None = None  # the challenger's version (this sweep's best trial)
    promotion: Promotion | None = None  # whether it took @champion, and why
    tune_path: str | None = None
    seconds: float = 0.0


@dataclass
class SweepResult:
    sweep_id: str
    experiment_name: str
    experiment_id: str
    tracking_uri: str
    parent_run_id: str | None
    metric: str
    mode: str
    preset: str
    datasets: list[DatasetResult]
    wall_seconds: float
    backbone_forwards: int  # images the sweep driver's backbone ran (features for every trial)
    trial_backbone_forwards: int  # images run through a backbone in trial processes for training/evaluation (0)
    pyfunc_example_forwards: int  # one example image per logged pyfunc model (MLflow's signature)
    num_images: int  # distinct train + test images of all datasets
    storage_path: str
    workers: int
    threads_per_worker: int
    mlflow_pending: int = 0  # MLflow calls kept under storage_path (tracking server unreachable), all processes
    resumed: bool = False
    ray_logs: str = ""  # Ray's session logs on the driver's node: the trials' and Train workers' output

    @property
    def ui_command(self) -> str:
        return ui_command(self.tracking_uri)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ui_command"] = self.ui_command
        return _finite(out)

    def summary_text(self) -> str:
        lines = [
            f"sweep {self.sweep_id}: preset {self.preset}, {self.workers} worker(s) x {self.threads_per_worker} "
            f"thread(s) per trial, metric {self.metric} ({self.mode}), wall time {self.wall_seconds:.1f}s"
        ]
        header = (
            f"{'dataset':<18} {'trials (done/stopped/err)':>26} {'best trial':<24} {self.metric:>17} "
            f"{'img AUROC':>9} {'pix AUROC':>9} {'AUPRO':>7}  registered model"
        )
        lines.append(header)
        lines.append("-" * len(header))
        for d in self.datasets:
            counts = [sum(t.status == s for t in d.trials) for s in ("completed", "stopped")]
            counts.append(sum(t.status in ("error", "diverged") for t in d.trials))
            b = d.best
            reg = "-"
            if d.registered_model:
                alias = CHAMPION if d.promotion is None or d.promotion.promoted else CHALLENGER
                reg = f"{d.registered_model} v{d.registered_version} @{alias}"
            if b is None:
                lines.append(f"{d.name:<18} {'/'.join(map(str, counts)):>26} {'(none completed)':<24}")
                errors = [t for t in d.trials if t.error]
                if errors:
                    lines.append(f"{'':<18} first error ({errors[0].name}): {errors[0].error}")
                continue
            t = b.test
            lines.append(
                f"{d.name:<18} {'/'.join(map(str, counts)):>26} {b.name:<24} {_pct(b.metric, self.metric):>17} "
                f"{_pct(t.get('image_auroc')):>9} {_pct(t.get('pixel_auroc')):>9} {_pct(t.get('aupro')):>7}  {reg}"
            )
        lines.append("")
        lines.append(
            f"backbone: {self.backbone_forwards} forward(s) for {self.num_images} image(s) in the whole sweep "
            f"(driver, once per image; trials and workers ran it {self.trial_backbone_forwards} times"
            + (
                f"; +{self.pyfunc_example_forwards} input example(s) for MLflow model signatures"
                if self.pyfunc_example_forwards
                else ""
            )
            + ")"
        )
        for d in self.datasets:
            f = d.features
            src = "cache" if f.cache_hits == 2 else "extracted" if f.cache_hits == 0 else "partly cached"
            lines.append(f"  {d.name}: {f.num_images} images, {f.backbone_forwards} forwards ({src}, {f.seconds:.1f}s)")
        for d in self.datasets:
            if d.promotion is not None:
                lines.append(f"registry: {d.promotion.line()}")
        for d in self.datasets:
            for t in d.trials:
                if t.status in ("error", "diverged"):
                    lines.append(f"  {t.name}: {t.status}: {t.error}")
        pending = self.mlflow_pending
        if pending:
            lines.append(
                f"MLflow did not take {pending} call(s) (unreachable, or a value it refused: the warnings above "
                f"say which); they are kept under {self.storage_path}; once it is back, replay them: "
                f"python -m tune.recover {self.storage_path}"
            )
        lines.append(f"MLflow: experiment {self.experiment_name!r} (id {self.experiment_id}) at {self.tracking_uri}")
        lines.append(f"Ray results: {self.storage_path} (every epoch's metrics: <trial folder>/progress.csv)")
        if self.ray_logs:
            lines.append(f"Ray logs (the trials' and Train workers' output): {self.ray_logs}")
        lines.append(f"browse: {self.ui_command}")
        return "\n".join(lines)


def _pct(value: Any, metric: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if metric == "val_loss":
        return f"{value:.4f}"
    return f"{100 * value:.2f}"


def _finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


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


# -- Ray -----------------------------------------------------------------------------------------------


def _per_trial_cpus(sc: SweepConfig) -> int:
    return 1 + sc.workers * sc.threads_per_worker  # the trial (Train driver, then evaluation) + workers


def _start_ray(sc: SweepConfig) -> tuple[bool, int | None]:
    """Connect to ``address`` / $RAY_ADDRESS, or start a local Ray. Returns (started_here, max_concurrent)."""
    import ray

    from tune.distributed import visible_threads

    # Worker processes import torch and a model; on a busy laptop the default 60 s start limit is tight.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    if ray.is_initialized():
        return False, sc.max_concurrent
    address = sc.address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, log_to_driver=sc.verbose >= RAY_OUTPUT)
        except Exception as exc:  # noqa: BLE001 - ConnectionError, ValueError, ...
            raise SweepError(f"cannot connect to the Ray cluster at {address!r}: {str(exc).splitlines()[0]}") from None
        return True, sc.max_concurrent
    per_trial = _per_trial_cpus(sc)
    max_concurrent = sc.max_concurrent or max(1, visible_threads() // per_trial)
    num_cpus = sc.num_cpus or max(visible_threads(), max_concurrent * per_trial)
    # The dashboard (when ray[default] is installed) serves the State API that Ray Train's placement-group
    # cleaner uses after ASHA kills a trial; without it the cleaner actors only log warnings.
    kwargs: dict[str, Any] = {
        "num_cpus": num_cpus,
        "include_dashboard": sc.dashboard,
        "dashboard_host": "127.0.0.1",
        "log_to_driver": sc.verbose >= RAY_OUTPUT,
        "_node_ip_address": LOOPBACK,
    }
    if sc.ray_temp_dir:
        kwargs["_temp_dir"] = str(Path(sc.ray_temp_dir).resolve())
    with _single_machine_ray():
        ray.init(**kwargs)
    return True, max_concurrent


LOOPBACK = "127.0.0.1"
# Ray's single-machine mode (its default on macOS and Windows): the node address is 127.0.0.1, and with
# it the GCS, raylet, object manager, dashboard and workers listen on loopback only.
_SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextmanager
def _single_machine_ray() -> Iterator[None]:
    """Start a local Ray bound to 127.0.0.1 instead of every interface.

    On Linux Ray replaces a node address of 127.0.0.1 by the machine's routable address unless its
    cluster mode is off (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read by the processes ``ray.init``
    starts, and ``ray_constants.ENABLE_RAY_CLUSTER`` in this already imported driver). Both are set
    for the start only, so a later connection to a real cluster from this process is unaffected.
    """
    from ray._private import ray_constants

    old_env, old_flag = os.environ.get(_SINGLE_MACHINE_ENV), getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[_SINGLE_MACHINE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if old_env is None:
            os.environ.pop(_SINGLE_MACHINE_ENV, None)
        else:
            os.environ[_SINGLE_MACHINE_ENV] = old_env
        if old_flag is not None:
            ray_constants.ENABLE_RAY_CLUSTER = old_flag


def _check_cluster(sc: SweepConfig) -> tuple[bool, int]:
    """(use_gpu, max_concurrent) that the cluster can actually run; SweepError if not even one trial fits."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    use_gpu = sc.use_gpu if sc.use_gpu is not None else gpus >= sc.workers
    if use_gpu and gpus < sc.workers:
        raise SweepError(f"use_gpu needs {sc.workers} GPU(s) (one per worker); the Ray cluster has {gpus:g}")
    need = _per_trial_cpus(sc)
    if cpus < need:
        raise SweepError(
            f"one trial needs {need} CPUs (1 for the trial + {sc.workers} worker(s) x {sc.threads_per_worker} "
            f"thread(s)); the Ray cluster has {cpus:g}: use fewer --workers/--threads-per-worker"
        )
    fit = max(1, int(cpus // need))
    if use_gpu:
        fit = min(fit, max(1, int(gpus // sc.workers)))
    return use_gpu, fit


# -- the sweep -----------------------------------------------------------------------------------------


def run_sweep(sc: SweepConfig, *, progress: bool = True) -> SweepResult:
    """Validate, extract features once, run one Tuner per dataset, register champions; see the module doc."""
    started = time.perf_counter()
    plan = plan_sweep(sc)
    sc = plan.config  # with --resume: the settings the sweep was started with
    for warning in plan.warnings:
        logger.warning(warning)
        _say(progress, f"warning: {warning}")
    _say(
        progress,
        f"validated: preset {plan.preset.name}, {len(plan.space.space)} searched setting(s), "
        f"{len(plan.datasets)} dataset(s), {plan.trials} trial(s) x {plan.epochs} epoch(s) each",
    )

    import ray

    from tune.tracking import RunLogger, create_experiment

    # Ray next: a cluster that cannot run one trial is refused before anything is created.
    started_ray, max_concurrent = _start_ray(sc)
    try:
        use_gpu, fit = _check_cluster(sc)
        logs = _ray_logs_dir() or "each node's Ray session folder (/tmp/ray/session_latest/logs)"
        _say(
            progress,
            f"Ray's own output (trials, Train workers) goes to {logs}"
            + ("" if sc.verbose >= RAY_OUTPUT else "; --verbose shows it here too"),
        )
        max_concurrent = min(max_concurrent or fit, fit) if sc.max_concurrent is None else sc.max_concurrent
        folder = plan.storage / plan.sweep_id
        parent_tags = {"vpdm.sweep": plan.sweep_id, "vpdm.role": "sweep"}
        if plan.experiment_id is not None:  # --resume: same experiment, same parent run
            experiment_id = plan.experiment_id
            parent = RunLogger.resume_or_start(
                plan.tracking_uri,
                experiment_id,
                f"sweep-{plan.sweep_id}",
                parent_tags,
                match=parent_tags,
                spool_dir=folder,
            )
            _say(progress, f"resuming sweep {plan.sweep_id} (experiment id {experiment_id}, Ray results {folder})")
        else:
            experiment_id = create_experiment(
                plan.tracking_uri,
                plan.experiment,
                tags={
                    "vpdm.sweep": plan.sweep_id,
                    "vpdm.preset": plan.preset.name,
                    "vpdm.datasets": ";".join(f"{d.name}={d.spec}" for d in plan.datasets),
                },
            )
            parent = RunLogger.start(
                plan.tracking_uri, experiment_id, f"sweep-{plan.sweep_id}", parent_tags, spool_dir=folder
            )
            folder.mkdir(parents=True, exist_ok=True)
            saved = {k: v for k, v in asdict(sc).items() if k in RESUMED_FIELDS + RESUMED_OR_FIELDS}
            (folder / SETTINGS_FILE).write_text(json.dumps({**saved, "experiment": plan.experiment}, indent=2))
        parent.log_params(
            {
                "preset": plan.preset.name,
                "trials": plan.trials,
                "epochs": plan.epochs,
                "workers": sc.workers,
                "threads_per_worker": sc.threads_per_worker,
                "metric": plan.metric,
                "datasets": len(plan.datasets),
                "use_gpu": use_gpu,
                "max_concurrent": max_concurrent,
                **{f"search.{d.key}": d.spec() for d in plan.space.space},
                **{f"fixed.{k}": v for k, v in plan.preset.fixed.items()},
            }
        )
        try:
            return _run(plan, experiment_id, parent, started, progress, use_gpu, max_concurrent)
        except BaseException as exc:
            parent.set_tags({"vpdm.status": "failed", "vpdm.error": str(exc)[:4000]})
            parent.finish("FAILED" if not isinstance(exc, KeyboardInterrupt) else "KILLED")
            raise
    finally:
        if started_ray:
            ray.shutdown()


def driver_device(use_gpu: bool) -> Any:
    """Where the driver extracts features: cuda when the sweep runs on GPUs and this process sees one, else
    the CPU (the cluster's GPUs may all be on other nodes; the driver then extracts on its CPU)."""
    import torch

    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


def _run(
    plan: SweepPlan, experiment_id: str, parent: Any, started: float, progress: bool, use_gpu: bool, max_concurrent: int
) -> SweepResult:
    from tune.features import build_bundle
    from vpdm.features import backbone as vpdm_backbone
    from vpdm.features.backbone import FeatureExtractor
    from vpdm.runtime.device import select_device

    sc = plan.config
    # Features once: one backbone for the whole sweep, once per image (or none on a warm cache).
    base = plan.space.base
    device = select_device(driver_device(use_gpu), what="sweep driver device", precision=base.inference.precision)
    extractor = FeatureExtractor(base.backbone, precision=base.inference.precision).to(device)
    _say(progress, f"feature extraction on {device} (inference.precision={base.inference.precision})")
    bundles, stats = [], []
    for d in plan.datasets:
        bundle, st = build_bundle(
            d.name, d.config, extractor, val_fraction=sc.val_fraction, seed=sc.seed, progress=progress
        )
        bundles.append(bundle)
        stats.append(st)
        _say(
            progress,
            f"features of {d.name}: {st.num_images} images, {st.backbone_forwards} backbone forwards "
            f"({st.cache_hits}/2 splits from the cache) in {st.seconds:.1f}s",
        )
    driver_forwards = extractor.images_seen
    parent.log_metrics({"backbone_forwards": driver_forwards, "num_images": sum(s.num_images for s in stats)})

    results = []
    for plan_d, bundle, st in zip(plan.datasets, bundles, stats):
        results.append(
            _tune_dataset(
                plan, plan_d, bundle, st, experiment_id, parent, use_gpu, max_concurrent, driver_forwards, progress
            )
        )

    trial_forwards = sum(t.backbone_forwards for r in results for t in r.trials)
    example_forwards = sum(t.example_forwards for r in results for t in r.trials)
    result = SweepResult(
        sweep_id=plan.sweep_id,
        experiment_name=plan.experiment,
        experiment_id=experiment_id,
        tracking_uri=plan.tracking_uri,
        parent_run_id=parent.run_id,
        metric=plan.metric,
        mode=plan.mode,
        preset=plan.preset.name,
        datasets=results,
        wall_seconds=time.perf_counter() - started,
        backbone_forwards=driver_forwards,
        trial_backbone_forwards=trial_forwards,
        pyfunc_example_forwards=example_forwards,
        num_images=sum(s.num_images for s in stats),
        storage_path=str(plan.storage / plan.sweep_id),
        workers=sc.workers,
        threads_per_worker=sc.threads_per_worker,
        resumed=plan.experiment_id is not None,
        ray_logs=_ray_logs_dir(),
    )
    assert vpdm_backbone.total_images_seen() >= driver_forwards
    out = plan.storage / plan.sweep_id
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(result.to_dict(), indent=2))
    (out / "summary.txt").write_text(result.summary_text() + "\n")
    parent.log_artifact(out / "summary.json")
    parent.log_artifact(out / "summary.txt")
    parent.log_metrics({"wall_seconds": result.wall_seconds, "trial_backbone_forwards": trial_forwards})
    parent.set_tags({"vpdm.status": "completed"})
    parent.finish("FINISHED")
    from tune.recover import count_pending

    result.mlflow_pending = count_pending(out)
    if result.mlflow_pending:  # summary files again, now with the pending count
        (out / "summary.json").write_text(json.dumps(result.to_dict(), indent=2))
        (out / "summary.txt").write_text(result.summary_text() + "\n")
    return result


def _release_callback() -> Any:
    """A Tune callback that frees the Train workers' placement group of every trial that ends.

    When ASHA stops a trial, Tune kills the trial's process, which kills its Train controller
    ungracefully; the controller's placement group (job-scoped) then stays reserved. Ray Train's
    own cleaner needs the State API (the dashboard) to notice. Without this, the next trial can wait
    forever for CPUs that nothing uses. A completed trial's controller has already removed its group.
    """
    from ray.tune import Callback

    class ReleaseTrainResources(Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._release(trial)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._release(trial)

        @staticmethod
        def _release(trial: Any) -> None:
            from ray._raylet import PlacementGroupID
            from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

            pg_id = (trial.last_result or {}).get("placement_group_id")
            if not pg_id:
                return
            try:
                state = (placement_group_table().get(pg_id) or {}).get("state")
                if state in ("CREATED", "PENDING", "RESCHEDULING"):
                    remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))
                    logger.info("released the Train workers' resources of stopped trial %s", trial.trial_id)
            except Exception as exc:  # noqa: BLE001 - best effort; Ray Train's cleaner may have done it
                logger.debug("releasing placement group %s: %s", pg_id, exc)

    return ReleaseTrainResources()


def _trial_lines_callback(metric: str, epochs: int) -> Any:
    """A Tune callback that prints one ``[sweep]`` line per trial start, epoch result and end (completed,
    stopped by ASHA, failed): the sweep's progress, in place of Tune's status tables and the workers'
    output (those stay in Ray's logs; every epoch's metrics are in the trial's folder and MLflow)."""
    from ray.tune import Callback

    def pct(value: Any) -> str:
        return _pct(float(value) if isinstance(value, (int, float)) else None, metric)

    class TrialLines(Callback):
        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            params = ", ".join(f"{k}={_short(v)}" for k, v in sorted((trial.config or {}).items()))
            _say(True, f"{trial} started" + (f": {params}" if params else ""))

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            if result.get("final") or "epoch" not in result:
                return
            note = " (diverged)" if result.get("diverged") else ""
            _say(
                True,
                f"{trial} epoch {result['epoch']}/{epochs}: {metric} {pct(result.get(metric))}, "
                f"loss {_short(result.get('loss'))}{note}",
            )

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            last = trial.last_result or {}
            if last.get("final"):
                _say(
                    True,
                    f"{trial} completed: {metric} {pct(last.get(metric))}, test image AUROC "
                    f"{pct(last.get('test_image_auroc'))}, pixel AUROC {pct(last.get('test_pixel_auroc'))}",
                )
            else:
                _say(True, f"{trial} stopped by ASHA after epoch {last.get('epoch', '?')}")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            error = None
            if trial.error_file and Path(trial.error_file).is_file():
                error = _error_line(Path(trial.error_file).read_text(errors="replace"))
            _say(True, f"{trial} failed: {error or 'see ' + str(trial.error_file)}")

    return TrialLines()


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _ray_logs_dir() -> str:
    """Where Ray keeps the output of this driver's trials and Train workers: the session's ``logs`` folder
    (``worker-*.out/.err`` per process, ``train/ray-train-*.log``) on the node this driver runs on."""
    from ray._private import worker

    node = getattr(worker, "_global_node", None)
    try:
        return str(Path(node.get_logs_dir_path()).resolve()) if node is not None else ""
    except Exception:  # noqa: BLE001 - a Ray client connection (ray://) has no local node
        return ""


def _tune_dataset(
    plan: SweepPlan,
    d: DatasetPlan,
    bundle: Any,
    stats: FeatureStats,
    experiment_id: str,
    parent: Any,
    use_gpu: bool,
    max_concurrent: int,
    driver_forwards: int,
    progress: bool,
) -> DatasetResult:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from tune.trial import run_trial

    sc = plan.config
    started = time.perf_counter()
    ref = ray.put(bundle)  # once per dataset: every trial and Train worker reads this object
    base = d.config
    context = {
        "sweep_id": plan.sweep_id,
        "dataset": d.name,
        "data_spec": d.spec,
        "preset": plan.preset.name,
        "base_config": to_dict(base),
        "tracking_uri": plan.tracking_uri,
        "experiment_id": experiment_id,
        "parent_run_id": parent.run_id,
        "workers": sc.workers,
        "threads_per_worker": sc.threads_per_worker,
        "eval_threads": 1,
        "use_gpu": use_gpu,
        "metric": plan.metric,
        "max_failures": sc.max_failures,
        "train_storage": str(plan.storage / plan.sweep_id / "train"),
        "run_prefix": d.name,
        "backbone_forwards": driver_forwards,
        "num_images": stats.num_images,
        "train_env": {
            "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
        },
    }
    trainable = tune.with_resources(tune.with_parameters(run_trial, data={"bundle": ref}, context=context), {"CPU": 1})
    # The console: Tune's own status tables only at --verbose; one line per trial event unless --quiet.
    tune_verbose = 1 if sc.verbose >= RAY_OUTPUT else 0
    callbacks = [_release_callback()]
    if progress and sc.verbose >= TRIAL_LINES:
        callbacks.append(_trial_lines_callback(plan.metric, plan.epochs))
    param_space = plan.space.param_space()
    search_alg = None
    if param_space:
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=sc.seed)
    scheduler = None
    if 2 <= plan.epochs <= plan.grace_period:
        logger.info("grace period %d >= %d epochs: no early stopping (ASHA off)", plan.grace_period, plan.epochs)
    elif plan.epochs >= 2:
        # No rung at the last epoch (stop_last_trials=False, max_t = epochs - 1): a trial that reaches its
        # last epoch always finishes, evaluates and logs its model.
        max_t = plan.epochs - 1
        scheduler = ASHAScheduler(
            time_attr="epoch",
            max_t=max_t,
            grace_period=min(plan.grace_period, max_t),
            reduction_factor=sc.reduction_factor,
            stop_last_trials=False,
        )

    def trial_name(trial: Any) -> str:
        return f"{d.name}_{trial.trial_id}"

    tune_path = plan.storage / plan.sweep_id / f"tune-{d.name}"
    if plan.experiment_id is not None and tune.Tuner.can_restore(str(tune_path)):
        # Resumed sweep: finished trials keep their results and are not rerun; unfinished ones restart
        # (their Ray Train runs resume from their last checkpoints, their MLflow runs are reused);
        # errored or diverged ones stay as they were; Optuna and ASHA continue from their saved state.
        tuner = tune.Tuner.restore(
            str(tune_path), trainable=trainable, resume_unfinished=True, resume_errored=False, restart_errored=False
        )
        # Tuner.restore brings back the first run's RunConfig: the console follows this run's flags.
        if getattr(tuner, "_local_tuner", None) is not None:
            restored = tuner._local_tuner.get_run_config()
            restored.verbose, restored.callbacks = tune_verbose, callbacks
        _say(progress, f"restoring {d.name} from {tune_path}")
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=plan.metric,
                mode=plan.mode,
                search_alg=search_alg,
                scheduler=scheduler,
                num_samples=plan.trials,
                max_concurrent_trials=max_concurrent,
                trial_name_creator=trial_name,
                trial_dirname_creator=trial_name,
            ),
            run_config=tune.RunConfig(
                name=f"tune-{d.name}",
                storage_path=str(plan.storage / plan.sweep_id),
                failure_config=tune.FailureConfig(max_failures=0),
                verbose=tune_verbose,
                callbacks=callbacks,
            ),
        )
        _say(
            progress,
            f"tuning {d.name}: {plan.trials} trial(s), at most {max_concurrent} at once, "
            f"{sc.workers} worker(s) each ({'GPU' if use_gpu else 'CPU'})",
        )
    grid = tuner.fit()

    trials: list[TrialSummary] = []
    for r in grid:
        m = dict(r.metrics or {})
        trial_id = str(m.get("trial_id") or (Path(r.path).name if r.path else "?"))
        status = (
            ("diverged" if "TrainingDiverged" in repr(r.error) or m.get("diverged") else "error")
            if r.error
            else "completed"
            if m.get("final")
            else "stopped"
        )
        metric = m.get(plan.metric)
        trials.append(
            TrialSummary(
                trial_id=trial_id,
                name=f"{d.name}_{trial_id}",
                status=status,
                epochs=int(m.get("epoch", 0) or 0),
                metric=float(metric) if isinstance(metric, (int, float)) else None,
                val_loss=float(m["val_loss"]) if isinstance(m.get("val_loss"), (int, float)) else None,
                test={
                    k[len("test_") :]: float(v)
                    for k, v in m.items()
                    if k.startswith("test_") and isinstance(v, (int, float))
                },
                params={k: v for k, v in (r.config or {}).items()},
                mlflow_run_id=m.get("mlflow_run_id") or None,
                model_uri=m.get("model_uri") or None,
                error=_error_line(r.error),
                mlflow_pending=int(m.get("mlflow_pending", 0) or 0),
                backbone_forwards=int(m.get("trial_backbone_forwards", 0) or 0),
                example_forwards=int(m.get("pyfunc_example_forwards", 0) or 0),
            )
        )
    _close_unfinished_runs(plan.tracking_uri, experiment_id, d.name)

    result = DatasetResult(
        d.name,
        d.spec,
        stats,
        trials,
        best=_best(trials, plan.mode),
        tune_path=str(plan.storage / plan.sweep_id / f"tune-{d.name}"),
    )
    if result.best is not None and sc.register:
        if result.best.model_uri:
            result.promotion = _register(plan, d, result, bundle, parent)
            if result.promotion is not None:
                result.registered_model, result.registered_version = d.model_name, result.promotion.version
                _say(progress, f"registry: {result.promotion.line()}")
        elif result.best.mlflow_pending:  # its model is waiting in the trial's folder: register on replay
            parent.keep_record(_registration_record(plan, d, result))
            logger.warning(
                "best trial %s of %s: MLflow was unreachable; `python -m tune.recover` registers it",
                result.best.name,
                d.name,
            )
        else:
            logger.warning("best trial %s of %s has no logged model; nothing registered", result.best.name, d.name)
    result.seconds = time.perf_counter() - started
    return result


def _error_line(error: Any) -> str | None:
    """The informative line of a trial's error (Ray wraps it in a traceback)."""
    if not error:
        return None
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if "TrainingDiverged" in line or "diverged" in line:
            return line[:500]
    return lines[-1][:500] if lines else type(error).__name__


def _best(trials: list[TrialSummary], mode: str) -> TrialSummary | None:
    done = [t for t in trials if t.status == "completed" and t.metric is not None and math.isfinite(t.metric)]
    if not done:
        return None
    sign = -1.0 if mode == "max" else 1.0
    # Ties (e.g. a saturated pseudo-AUROC) go to the lower validation loss, then the earlier trial.
    return min(done, key=lambda t: (sign * t.metric, t.val_loss if t.val_loss is not None else math.inf))


def _close_unfinished_runs(uri: str, experiment_id: str, dataset: str) -> None:
    """Runs of trials ASHA stopped (or that died) are still RUNNING: close them as KILLED, say why."""
    from tune.tracking import RunLogger, iter_runs, retrying

    runs = (
        retrying(
            lambda: list(
                iter_runs(uri, experiment_id, f"attributes.status = 'RUNNING' and tags.`vpdm.dataset` = '{dataset}'")
            ),
            what="listing unfinished runs",
        )
        or []
    )
    for run in runs:
        if run.data.tags.get("vpdm.role") == "sweep":
            continue
        log = RunLogger(uri, run.info.run_id)
        log.set_tags({"vpdm.status": "stopped early by ASHA (or killed); no final evaluation"})
        log.finish("KILLED")


def _registration_record(plan: SweepPlan, d: DatasetPlan, result: DatasetResult) -> dict[str, Any]:
    """What registering a dataset's best trial needs, also as a record for ``python -m tune.recover``: the
    version's tags, and how to rebuild this sweep's validation data to compare it with the champion."""
    best = result.best
    assert best is not None
    tags = {
        "sweep": plan.sweep_id,
        "experiment": plan.experiment,
        "dataset": result.name,
        "data_spec": result.spec,
        "trial": best.name,
        "preset": plan.preset.name,
        "metrics": {
            plan.metric: best.metric,
            "val_loss": best.val_loss,
            **{f"test_{k}": v for k, v in best.test.items()},
        },
        "params": best.params,
    }
    sc = plan.config
    promotion = {
        "metric": plan.metric,
        "mode": plan.mode,
        "force": sc.promote,
        "sweep": plan.sweep_id,
        "dataset": d.name,
        "data_spec": d.spec,
        "config": to_dict(d.config),
        "seed": sc.seed,
        "val_fraction": sc.val_fraction,
        "trial_value": best.metric,
    }
    return {
        "op": "register",
        "model_name": d.model_name,
        "challenger_run_id": best.mlflow_run_id,
        "tags": _finite(tags),
        "promotion": _finite(promotion),
    }


def _register(plan: SweepPlan, d: DatasetPlan, result: DatasetResult, bundle: Any, parent: Any) -> Promotion | None:
    """Register the best trial's model as ``<name>@challenger`` and let :mod:`tune.registry` decide whether it
    takes ``@champion`` (compared on ``bundle``'s validation images). Once per run: a resumed sweep reuses the
    version and its recorded decision. A failure is kept for the replay instead of lost."""
    import mlflow

    from tune.registry import register_challenger

    record = _registration_record(plan, d, result)
    info = record["promotion"]
    validation = ValidationData(
        data_spec=d.spec,
        backbone=to_dict(d.config.backbone),
        seed=info["seed"],
        val_fraction=info["val_fraction"],
        bundle=lambda: bundle,
    )
    mlflow.set_tracking_uri(plan.tracking_uri)
    try:
        return register_challenger(
            record["challenger_run_id"],
            model_name=d.model_name,
            metric=plan.metric,
            mode=plan.mode,
            sweep=plan.sweep_id,
            data_spec=d.spec,
            validation=validation,
            force=plan.config.promote,
            trial_value=info["trial_value"],
            tags=record["tags"],
        )
    except Exception as exc:  # noqa: BLE001 - the sweep's results stand; say what went wrong, keep it for later
        logger.warning("registering %s from run %s failed: %s", d.model_name, record["challenger_run_id"], exc)
        parent.keep_record(record)
        return None


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[sweep] {message}", flush=True)
