"""What a sweep returns: each trial, each dataset's best and registration, and the summary a person reads."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from tune.features import FeatureStats
from tune.registry import CHALLENGER, CHAMPION, Promotion
from tune.tracking import ui_command


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
        return json_safe(out)

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
                f"{d.name:<18} {'/'.join(map(str, counts)):>26} {b.name:<24} {metric_text(b.metric, self.metric):>17} "
                f"{metric_text(t.get('image_auroc')):>9} {metric_text(t.get('pixel_auroc')):>9} {metric_text(t.get('aupro')):>7}  {reg}"
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


def metric_text(value: Any, metric: str = "") -> str:
    """A metric as the summary prints it: percent with two decimals (val_loss as it is), "-" for none."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if metric == "val_loss":
        return f"{value:.4f}"
    return f"{100 * value:.2f}"


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (nested in dicts and lists) as None, for strict JSON."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
