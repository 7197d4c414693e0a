"""One Ray Tune trial: a function trainable that drives a Ray Train run, then evaluates and logs it.

Ray 2.60 runs Ray Train V2, where ``Tuner(trainer)`` is gone; the documented pattern is what
:func:`run_trial` does: Tune calls a function with the sampled hyperparameters, the function builds
a :class:`~ray.train.torch.TorchTrainer` and calls ``fit()``, and
:class:`~ray.tune.integration.ray_train.TuneReportCallback` forwards every epoch's
``ray.train.report`` to Tune (so ASHA and Optuna see them). :class:`MlflowEpochLogger`, another
Train callback (it runs in the Train controller), writes the same per-epoch metrics to the trial's
MLflow run.

After ``fit()`` the trial calibrates the decision thresholds of its final checkpoint on the dataset's
held-out normal images (:mod:`tune.thresholds`), evaluates it on the test split (features from the
object store, no backbone), logs per-class metrics (the decisions at the thresholds beside them), anomaly-map overlays, ROC curves, the
config and per-image scores, logs the model as an MLflow pyfunc, and reports a last result with
``final=1`` and the test metrics. A trial that ASHA stops is killed with its Train run and never
gets here: the sweep driver closes its MLflow run as KILLED.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from ray.train.v2.api.callback import UserCallback

logger = logging.getLogger("tune.trial")

DIVERGED_NOTE = "vpdm-diverged.json"  # written by rank 0 into the Train run's folder when the loss is NaN/inf
TEST_METRICS = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "image_f1_max")
# At the calibrated thresholds (vpdm.evaluation.metrics.DECISION_KEYS); absent when the trial could not calibrate.
DECISION_METRICS = ("image_precision", "image_recall", "image_f1", "image_false_alarm_rate")


class MlflowEpochLogger(UserCallback):
    """Ray Train callback: each epoch's (rank-0, already all-reduced) metrics into an MLflow run."""

    def __init__(self, tracking_uri: str, run_id: str | None, spool_dir: str | None = None):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.spool_dir = spool_dir
        self._logger = None

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if not self.run_id or not metrics:
            return
        try:
            from tune.tracking import RunLogger, quick_http_env

            if self._logger is None:
                quick_http_env()
                self._logger = RunLogger(self.tracking_uri, self.run_id, self.spool_dir, name="epochs")
            values = metrics[0]
            self._logger.log_metrics(values, step=int(values.get("epoch", 0)))
        except Exception as exc:  # noqa: BLE001 - never break training for tracking
            logger.warning("MLflow epoch logging failed: %s", exc)


def _trial_tags(context: dict[str, Any], trial_id: str, trial_name: str) -> dict[str, str]:
    tags = {
        "vpdm.sweep": context["sweep_id"],
        "vpdm.dataset": context["dataset"],
        "vpdm.data_spec": context["data_spec"],
        "vpdm.preset": context["preset"],
        "vpdm.trial_id": trial_id,
        "vpdm.trial_name": trial_name,
        "vpdm.status": "running",
    }
    if context.get("parent_run_id"):
        tags["mlflow.parentRunId"] = context["parent_run_id"]
    return tags


def run_trial(params: dict[str, Any], data: dict[str, Any], context: dict[str, Any]) -> None:
    """The Tune trainable: ``tune.with_parameters(run_trial, data={"bundle": ref}, context={...})``."""
    import ray
    import ray.train
    import ray.tune
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from tune.distributed import train_worker
    from tune.tracking import RunLogger, quick_http_env
    from vpdm.config.schema import saved_config
    from vpdm.config.values import flatten_dict, to_dict
    from vpdm.features import backbone as vpdm_backbone
    from vpdm.training.engine import TrainingDiverged

    for key, value in (context.get("train_env") or {}).items():
        os.environ.setdefault(key, str(value))  # Ray Train propagates RAY_TRAIN_* from here to its workers
    forwards_before = vpdm_backbone.total_images_seen()
    tune_context = ray.tune.get_context()
    trial_id, trial_name = tune_context.get_trial_id(), tune_context.get_trial_name()
    base = saved_config(context["base_config"])
    config = base.with_overrides(dict(params)).validate()
    bundle_ref = data["bundle"]

    quick_http_env()
    # What MLflow cannot take (server down) is kept in the trial's folder for `python -m tune.recover`.
    trial_dir = tune_context.get_trial_dir()
    # A trial restarted by a resumed sweep (Tuner.restore) reuses its run instead of adding a second one.
    run = RunLogger.resume_or_start(
        context["tracking_uri"],
        context["experiment_id"],
        trial_name,
        _trial_tags(context, trial_id, trial_name),
        match={"vpdm.sweep": context["sweep_id"], "vpdm.trial_id": trial_id},
        spool_dir=trial_dir,
    )
    run.log_params(
        {
            **flatten_dict(to_dict(config)),
            **{f"search.{k}": v for k, v in params.items()},
            "sweep.workers": context["workers"],
            "sweep.threads_per_worker": context["threads_per_worker"],
            "sweep.use_gpu": context["use_gpu"],
            "sweep.metric": context["metric"],
            "sweep.dataset": context["dataset"],
            "sweep.backbone_forwards": context["backbone_forwards"],
            "sweep.num_images": context["num_images"],
        }
    )

    use_gpu = bool(context["use_gpu"])
    resources = {"CPU": float(context["threads_per_worker"])}
    if use_gpu:
        resources["GPU"] = 1.0
    train_run_name = f"{context['run_prefix']}-{trial_id}"
    diverged_note = Path(context["train_storage"]) / train_run_name / DIVERGED_NOTE
    diverged_note.unlink(missing_ok=True)  # a restarted trial starts with a clean slate
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "bundle": bundle_ref,
            "vpdm_config": to_dict(config),
            "threads": context["threads_per_worker"],
            "trial": trial_name,
            "diverged_note": str(diverged_note),
            "mlflow_run_id": run.run_id or "",
        },
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=context["workers"], use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            # Stable per trial (no timestamp): a restarted trial resumes its Train run in place.
            name=train_run_name,
            storage_path=context["train_storage"],
            # MLflow first: once Tune sees an epoch, ASHA may kill this trial, and that epoch must already be logged.
            callbacks=[MlflowEpochLogger(context["tracking_uri"], run.run_id, trial_dir), TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=context["max_failures"]),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    started = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as exc:
        run.set_tags({"vpdm.status": "failed", "vpdm.error": str(exc).strip()[:4000]})
        run.finish("FAILED")
        raise
    train_seconds = time.perf_counter() - started
    last = dict(result.metrics or {})
    if diverged_note.is_file():
        note = json.loads(diverged_note.read_text())
        message = f"trial {trial_name} diverged: {note.get('error', 'non-finite loss')}"
        run.set_tags({"vpdm.status": "diverged", "vpdm.error": message[:4000]})
        run.finish("FAILED")
        raise TrainingDiverged(message, epoch=int(note.get("epoch") or 0), step=int(note.get("step") or 0))
    if result.checkpoint is None:
        run.set_tags({"vpdm.status": "failed", "vpdm.error": "the Train run reported no checkpoint"})
        run.finish("FAILED")
        raise RuntimeError(f"trial {trial_name}: the Train run reported no checkpoint")

    bundle = ray.get(bundle_ref)
    final = finish_trial(
        config, bundle, result.checkpoint, last, run, context, trial_name=trial_name, train_seconds=train_seconds
    )
    final["trial_backbone_forwards"] = (
        vpdm_backbone.total_images_seen()
        - forwards_before
        - final["pyfunc_example_forwards"]
        + int((result.metrics or {}).get("worker_backbone_forwards", 0) or 0)
    )
    run.log_metrics({"trial_backbone_forwards": final["trial_backbone_forwards"]})
    from tune.recover import count_pending

    final["mlflow_pending"] = count_pending(trial_dir)
    ray.tune.report(final)


def finish_trial(
    config: Any,
    bundle: Any,
    checkpoint: Any,
    last: dict[str, Any],
    run: Any,
    context: dict[str, Any],
    *,
    trial_name: str,
    train_seconds: float,
) -> dict[str, Any]:
    """Evaluate the final checkpoint on the test features; log metrics, plots, config, scores and the model."""
    import numpy as np
    import torch

    from tune.distributed import CHECKPOINT_FILE
    from tune.features import as_tensor
    from tune.thresholds import calibrate_checkpoint, decisions_on_test
    from vpdm.config.schema import save_config
    from vpdm.evaluation.evaluator import score_features
    from vpdm.evaluation.metrics import compute_metrics
    from vpdm.features import backbone as vpdm_backbone
    from vpdm.inference.checkpoint import load_checkpoint

    torch.set_num_threads(max(1, int(context.get("eval_threads") or 1)))
    work = Path(tempfile.mkdtemp(prefix="vpdm-trial-"))
    try:
        with checkpoint.as_directory() as directory:
            shutil.copy2(Path(directory) / CHECKPOINT_FILE, work / CHECKPOINT_FILE)
        # Thresholds into the copy that is logged as the model: its pyfunc answers with calibrated decisions.
        calibration, no_calibration = calibrate_checkpoint(work / CHECKPOINT_FILE, bundle)
        if calibration is None:
            logger.warning("trial %s: no decision thresholds: %s", trial_name, no_calibration)
        model, ckpt_config, payload = load_checkpoint(work / CHECKPOINT_FILE)
        map_size = ckpt_config.scoring.map_size or ckpt_config.backbone.image_size
        start = time.perf_counter()
        scores_t, maps_t = score_features(
            model,
            as_tensor(bundle.test_features),
            sampling=ckpt_config.sampling,
            scoring=ckpt_config.scoring,
            map_size=map_size,
            batch_size=ckpt_config.train.batch_size,
            progress=False,
            precision=ckpt_config.inference.precision,
        )
        scores, maps = scores_t.numpy(), maps_t.numpy()
        metrics = compute_metrics(
            bundle.test_labels,
            scores,
            bundle.test_masks,
            maps,
            bundle.test_categories,
            pixel_known=bundle.test_pixel_known,
        )
        decision = None
        if calibration is not None:  # beside the threshold-free metrics, per class and in the mean
            decision = decisions_on_test(calibration, bundle, scores)
            for cat, values in decision["per_class"].items():
                metrics["per_class"].setdefault(cat, {}).update(values)
            metrics["mean"].update(decision["mean"])
        eval_seconds = time.perf_counter() - start

        reported = TEST_METRICS + (DECISION_METRICS if decision is not None else ())
        flat: dict[str, float] = {}
        for cat, values in metrics["per_class"].items():
            for key in reported:
                flat[f"test/{cat}/{key}"] = values.get(key, float("nan"))
        for key in reported:
            flat[f"test/mean/{key}"] = metrics["mean"].get(key, float("nan"))
        if calibration is not None:
            for cat, t in calibration.classes.items():
                flat[f"threshold/{cat}/image"] = t.image_threshold
                flat[f"threshold/{cat}/pixel"] = t.pixel_threshold
        epochs = int(last.get("epoch", config.train.epochs))
        run.log_metrics({**flat, "eval_seconds": eval_seconds, "train_seconds": train_seconds}, step=epochs)
        run.set_tags(
            {
                "vpdm.decision.calibration": calibration.describe()
                if calibration is not None
                else f"none: {no_calibration}"[:4000]
            }
        )

        artifacts = work / "artifacts"
        plots = artifacts / "plots"
        plots.mkdir(parents=True)
        save_config(ckpt_config, artifacts / "config.yaml")
        (artifacts / "metrics.json").write_text(
            json.dumps(
                _nan_to_none(
                    {
                        "trial": trial_name,
                        "dataset": bundle.name,
                        "data_spec": bundle.spec,
                        "epochs": epochs,
                        "validation": {
                            k: last.get(k) for k in ("val_loss", "val_pseudo_auroc", "val_same_class_auroc")
                        },
                        "test": metrics,
                        "num_test_images": int(len(scores)),
                        "eval_seconds": eval_seconds,
                        "decision": None
                        if decision is None
                        else {
                            "image_thresholds": decision["thresholds"],
                            "method": calibration.method,
                            "calibration": calibration.describe(),
                            "false_alarm_rate_target": calibration.false_alarm_rate,
                        },
                    }
                ),
                indent=2,
            )
        )
        with open(artifacts / "test_scores.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "category", "label", "score"])
            for path, cat, label, score in zip(bundle.test_paths, bundle.test_categories, bundle.test_labels, scores):
                writer.writerow([path, cat, int(label), f"{float(score):.9g}"])
        _plots(bundle, scores, maps, plots)
        run.log_artifacts(artifacts)

        # The model, as an MLflow pyfunc (the registry's champion is one of these).
        before = vpdm_backbone.total_images_seen()
        model_uri = _log_model(run, work / CHECKPOINT_FILE, bundle)
        if model_uri is None:
            run.keep_model(work / CHECKPOINT_FILE, [p for p in bundle.test_paths[:1] if Path(p).is_file()])
        example_forwards = vpdm_backbone.total_images_seen() - before
        status = "completed" if model_uri else "completed (model not logged)"
        run.set_tags({"vpdm.status": status, "vpdm.model_uri": model_uri or ""})
        run.finish("FINISHED")
        metric = context["metric"]
        final = {
            "final": 1,
            "epoch": epochs,
            metric: float(last.get(metric, np.nan)),
            "val_loss": float(last.get("val_loss", np.nan)),
            "val_pseudo_auroc": float(last.get("val_pseudo_auroc", np.nan)),
            "val_same_class_auroc": float(last.get("val_same_class_auroc", np.nan)),
            **{f"test_{k}": float(metrics["mean"].get(k, np.nan)) for k in reported},
            "train_seconds": train_seconds,
            "eval_seconds": eval_seconds,
            "mlflow_run_id": run.run_id or "",
            "model_uri": model_uri or "",
            "checkpoint_path": str(checkpoint.path),
            "pyfunc_example_forwards": int(example_forwards),
        }
        return final
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _log_model(run: Any, checkpoint_path: Path, bundle: Any) -> str | None:
    """log_pyfunc_model inside the trial's run; a failure is a warning (the trial's metrics still count)."""
    if not run.enabled or run.pending:
        return None
    import mlflow

    from tune.mlflow_model import log_pyfunc_model

    examples = [Path(p) for p in bundle.test_paths[:1] if Path(p).is_file()]
    try:
        mlflow.set_tracking_uri(run.tracking_uri)
        with mlflow.start_run(run_id=run.run_id, log_system_metrics=False):
            info = log_pyfunc_model(checkpoint_path, artifact_path="model", example_images=examples or None)
        return str(info.model_uri)
    except Exception as exc:  # noqa: BLE001
        logger.warning(
            "MLflow: logging the pyfunc model failed: %s", str(exc).splitlines()[0][:300] if str(exc) else exc
        )
        return None


def _plots(bundle: Any, scores: Any, maps: Any, folder: Path) -> None:
    """ROC curves per class and anomaly-map overlays of the bundle's chosen test images."""
    import numpy as np

    from vpdm.evaluation.plots import save_overlay, save_roc_curves

    cats = np.asarray(bundle.test_categories)
    per_class = {c: (bundle.test_labels[cats == c], scores[cats == c]) for c in sorted(set(bundle.test_categories))}
    try:
        save_roc_curves(per_class, folder / "roc.png")
        vmax = float(np.quantile(maps, 0.999)) if maps.size else None
        for item in bundle.overlays:
            save_overlay(
                item.image,
                maps[item.index],
                folder / "overlays" / item.name,
                mask=bundle.test_masks[item.index],
                score=float(scores[item.index]),
                vmax=vmax,
            )
    except Exception as exc:  # noqa: BLE001 - plots are a convenience, never a reason to fail a trial
        logger.warning("plotting failed: %s", exc)


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, float) and value != value:
        return None
    return value
