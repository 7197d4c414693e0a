"""Running a distributed VPDM sweep: Ray Tune + Optuna + ASHA over Ray Train runs, tracked in MLflow.

The sweep's settings and checks are :mod:`tune.plan`, its Ray cluster :mod:`tune.cluster`, what it returns
:mod:`tune.results`, one trial :mod:`tune.trial`, the registry :mod:`tune.registry`.

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
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tune.cluster import check_cluster, driver_device, ray_logs_dir, start_ray
from tune.features import FeatureStats
from tune.plan import (
    RAY_OUTPUT,
    RESUMED_FIELDS,
    RESUMED_OR_FIELDS,
    SETTINGS_FILE,
    TRIAL_LINES,
    DatasetPlan,
    SweepConfig,
    SweepPlan,
    plan_sweep,
)
from tune.registry import Promotion, ValidationData
from tune.results import DatasetResult, SweepResult, TrialSummary, json_safe, metric_text
from vpdm.config.values import to_dict

logger = logging.getLogger("tune.sweep")


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
    started_ray, max_concurrent = start_ray(sc)
    try:
        use_gpu, fit = check_cluster(sc)
        logs = ray_logs_dir() or "each node's Ray session folder (/tmp/ray/session_latest/logs)"
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
        ray_logs=ray_logs_dir(),
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
        return metric_text(float(value) if isinstance(value, (int, float)) else None, metric)

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
    _close_unfinished_runs(
        plan.tracking_uri, experiment_id, d.name, stopped={t.name for t in trials if t.status == "stopped"}
    )

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


def _close_unfinished_runs(
    uri: str, experiment_id: str, dataset: str, stopped: frozenset[str] | set[str] = frozenset()
) -> None:
    """Runs of trials ASHA stopped (or that died) are still RUNNING: close them as KILLED, say why. A trial
    that Tune reports as stopped may also have closed its own run as FAILED, when its Train run raised while
    being stopped (a race between the stop and the trial's handler): that run is a stop, not a failure, so it
    is closed as KILLED too, its error kept in ``vpdm.error``. A run whose trial really failed stays FAILED."""
    from tune.tracking import RunLogger, iter_runs, retrying

    runs = [
        run
        for status in ("RUNNING", "FAILED")
        for run in retrying(
            lambda status=status: list(
                iter_runs(uri, experiment_id, f"attributes.status = '{status}' and tags.`vpdm.dataset` = '{dataset}'")
            ),
            what="listing unfinished runs",
        )
        or []
    ]
    for run in runs:
        if run.data.tags.get("vpdm.role") == "sweep":
            continue
        if run.info.status == "FAILED" and run.info.run_name not in stopped:
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
        "tags": json_safe(tags),
        "promotion": json_safe(promotion),
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
