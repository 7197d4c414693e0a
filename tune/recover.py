"""Replay what a sweep could not log to MLflow while the tracking server was unreachable.

:class:`tune.tracking.RunLogger` keeps every call that gave up in ``mlflow-pending/*.jsonl`` inside
the trial's folder (the sweep's folder for the driver), with copies of the artifacts and of the
model checkpoint. Once the server is back::

    python -m tune.recover runs/sweeps/<sweep>            # every pending file under that folder
    python -m tune.recover runs/sweeps/<sweep> --tracking-uri http://mlflow:5000

Runs that could not be created are created first (their ``pending-...`` ids are mapped to the new
ids), then params, metrics (with their original steps and timestamps), tags, artifacts and models
are logged, then the runs are closed with their recorded status, and last the registrations the
driver could not make are made, with the same promotion rule as in a sweep (:mod:`tune.registry`): the
best trial becomes ``@challenger``, and ``@champion`` moves to it only when there is none yet, when the
sweep asked for it (``--promote``), or when it beats the champion on the sweep's validation data, which
the replay rebuilds from the recorded data spec and settings (from the feature cache when it is warm). A replayed file is renamed ``*.jsonl.replayed`` (kept, never
deleted); a replay that fails part-way records its progress in ``replay-state.json`` and can be run
again without logging anything twice.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tune.tracking import PENDING_DIR, PENDING_PREFIX
from vpdm.errors import VPDMError

logger = logging.getLogger("tune.recover")

STATE_FILE = "replay-state.json"
PHASES = ("create_run", "log", "finish", "register")  # replay order across all files


@dataclass
class ReplayReport:
    files: list[str] = field(default_factory=list)
    done: dict[str, int] = field(default_factory=dict)  # op -> count replayed
    created_runs: dict[str, str] = field(default_factory=dict)  # pending id -> MLflow run id
    registered: list[str] = field(default_factory=list)  # one line per registration: version, alias, decision
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        ops = ", ".join(f"{n} {op}" for op, n in sorted(self.done.items())) or "nothing"
        lines = [f"replayed {ops} from {len(self.files)} file(s)"]
        lines += [f"created run {real} (was {pending})" for pending, real in self.created_runs.items()]
        lines += [f"registered {r}" for r in self.registered]
        lines += [f"error: {e}" for e in self.errors]
        return "\n".join(lines)


def pending_files(root: str | Path) -> list[Path]:
    """Every not yet replayed spool file under ``root``."""
    root = Path(root)
    if not root.exists():
        raise VPDMError(f"{root}: no such folder (expected a sweep's folder, e.g. runs/sweeps/<sweep>)")
    return sorted(p for p in root.rglob(f"{PENDING_DIR}/*.jsonl") if p.is_file())


def count_pending(root: str | Path) -> int:
    """Calls waiting in the spool files under ``root`` (0 when there is none)."""
    root = Path(root)
    if not root.exists():
        return 0
    return sum(len(p.read_text().splitlines()) for p in root.rglob(f"{PENDING_DIR}/*.jsonl") if p.is_file())


def _phase(op: str) -> str:
    return op if op in ("create_run", "finish", "register") else "log"


def replay(root: str | Path, tracking_uri: str | None = None) -> ReplayReport:
    """Replay every pending file under ``root`` (see the module doc); never deletes anything."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    report = ReplayReport()
    files = pending_files(root)
    report.files = [str(f) for f in files]
    records: list[tuple[Path, int, dict[str, Any]]] = []
    for f in files:
        for i, line in enumerate(f.read_text().splitlines()):
            if line.strip():
                try:
                    records.append((f, i, json.loads(line)))
                except json.JSONDecodeError as exc:
                    report.errors.append(f"{f}:{i + 1}: not a JSON record ({exc}); left as is")
    state_path = Path(root) / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.exists() else {"runs": {}, "done": []}
    mapping: dict[str, str] = state["runs"]
    done: set[str] = set(state["done"])

    def save_state() -> None:
        state_path.write_text(json.dumps({"runs": mapping, "done": sorted(done)}, indent=1))

    def run_id_of(rec: dict[str, Any]) -> str:
        rid = rec.get("run_id") or ""
        if rid.startswith(PENDING_PREFIX):
            if rid not in mapping:
                raise VPDMError(f"run {rid} was never created (its create_run record is missing)")
            return mapping[rid]
        return rid

    failed_files: set[Path] = set()
    for phase in PHASES:
        for f, i, rec in records:
            key = f"{f}:{i}"
            op = rec.get("op", "")
            if _phase(op) != phase or key in done or f in failed_files:
                continue
            uri = tracking_uri or rec.get("tracking_uri")
            if not uri:
                report.errors.append(f"{key}: no tracking URI recorded; pass --tracking-uri")
                failed_files.add(f)
                continue
            client = MlflowClient(tracking_uri=uri)
            base = f.parent
            try:
                if op == "create_run":
                    run = client.create_run(
                        rec["experiment_id"], run_name=rec.get("run_name"), tags=rec.get("tags") or {}
                    )
                    mapping[rec["run_id"]] = run.info.run_id
                    report.created_runs[rec["run_id"]] = run.info.run_id
                elif op == "params":
                    items = [Param(k, v) for k, v in rec["params"].items()]
                    client.log_batch(run_id_of(rec), params=items)
                elif op == "metrics":
                    items = [
                        Metric(k, float(v), int(rec["timestamp"]), int(rec["step"])) for k, v in rec["metrics"].items()
                    ]
                    client.log_batch(run_id_of(rec), metrics=items)
                elif op == "tags":
                    client.log_batch(run_id_of(rec), tags=[RunTag(k, v) for k, v in rec["tags"].items()])
                elif op in ("artifact", "artifacts"):
                    if not rec.get("path"):
                        raise VPDMError("the files were not kept (the spool folder was not writable then)")
                    path = base / rec["path"]
                    (client.log_artifact if op == "artifact" else client.log_artifacts)(
                        run_id_of(rec), str(path), rec.get("artifact_path")
                    )
                elif op == "model":
                    from tune.mlflow_model import log_pyfunc_model

                    rid = run_id_of(rec)
                    examples = [Path(p) for p in rec.get("example_images") or [] if Path(p).is_file()]
                    mlflow.set_tracking_uri(uri)
                    with mlflow.start_run(run_id=rid, log_system_metrics=False):
                        info = log_pyfunc_model(
                            base / rec["checkpoint"], artifact_path="model", example_images=examples or None
                        )
                    client.set_tag(rid, "vpdm.model_uri", str(info.model_uri))
                elif op == "finish":
                    client.set_terminated(run_id_of(rec), rec.get("status", "FINISHED"))
                elif op == "register":
                    from tune.registry import register_challenger

                    mlflow.set_tracking_uri(uri)
                    # "champion_run_id": records written before promotions were decided
                    challenger = rec.get("challenger_run_id") or rec["champion_run_id"]
                    if challenger.startswith(PENDING_PREFIX):
                        challenger = mapping.get(challenger) or run_id_of({"run_id": challenger})
                    info = rec.get("promotion") or {}
                    tags = rec.get("tags") or {}
                    promotion = register_challenger(
                        challenger,
                        model_name=rec["model_name"],
                        metric=info.get("metric", ""),
                        mode=info.get("mode", "max"),
                        sweep=info.get("sweep") or str(tags.get("sweep", "")),
                        data_spec=info.get("data_spec") or str(tags.get("data_spec", "")),
                        validation=validation_data(info),
                        force=bool(info.get("force")),
                        trial_value=info.get("trial_value"),
                        tags=tags,
                    )
                    report.registered.append(promotion.line())
                else:
                    raise VPDMError(f"unknown record {op!r}")
            except Exception as exc:  # noqa: BLE001 - keep going with the other files; this one stays pending
                first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
                report.errors.append(f"{key} ({op}): {first}")
                failed_files.add(f)
                continue
            done.add(key)
            report.done[op] = report.done.get(op, 0) + 1
            save_state()
    for f in files:
        if f not in failed_files and all(f"{f}:{i}" in done for ff, i, _ in records if ff == f):
            f.rename(f.with_name(f.name + ".replayed"))
    return report


def validation_data(info: dict[str, Any]) -> Any:
    """The sweep's validation data for a replayed registration, rebuilt on first use from what the record
    says (data spec, settings, split); None for records that do not say it (written by an older sweep)."""
    if not info.get("config") or not info.get("dataset"):
        return None
    from tune.registry import ValidationData
    from vpdm.config.schema import saved_config
    from vpdm.config.values import to_dict

    config = saved_config(info["config"])

    def rebuild() -> Any:
        from tune.features import build_bundle
        from vpdm.features.backbone import FeatureExtractor

        extractor = FeatureExtractor(config.backbone, precision=config.inference.precision)  # the sweep's features
        bundle, _ = build_bundle(
            info["dataset"], config, extractor, val_fraction=float(info["val_fraction"]), seed=int(info["seed"])
        )
        return bundle

    return ValidationData(
        data_spec=info.get("data_spec") or config.data.spec,
        backbone=to_dict(config.backbone),
        seed=int(info["seed"]),
        val_fraction=float(info["val_fraction"]),
        bundle=rebuild,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tune.recover", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="a sweep's folder (e.g. runs/sweeps/<sweep>) or a trial's folder")
    p.add_argument("--tracking-uri", help="log there instead of the URI recorded with each call")
    args = p.parse_args(argv)
    try:
        report = replay(args.folder, args.tracking_uri)
    except VPDMError as exc:
        print(f"recover: error: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
