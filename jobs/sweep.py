#!/usr/bin/env python
"""Run a VPDM hyperparameter sweep: Ray Tune + Optuna + ASHA over Ray Train (DDP) runs, tracked in MLflow.

With no arguments it runs the embedded default: a local Ray, MLflow in ./mlflow.db (sqlite), the
built-in demo data and the small 'demo' preset (a few minutes on a laptop CPU). On a cluster:

    ray job submit --working-dir . -- python jobs/sweep.py --data mvtec:/data/mvtec --preset default \\
        --workers 4 --tracking-uri http://mlflow:5000 --storage /shared/vpdm-sweeps

(a job's working directory is a copy Ray deletes: give it a tracking URI and a --storage outside it).

Datasets: --data takes a vpdm data spec; a spec with commas ("mvtec:/a,mpdd:/b") is ONE dataset,
the union, trained as one model. Give several datasets (each its own model, trials and champion)
with ';' ("mvtec:/a;visa:/b") or by repeating --data; name one with NAME=SPEC ("bottle=mvtec:/a/bottle").

If the driver dies (Ctrl-C, a lost head node), rerun the same command with --resume and
--experiment NAME: finished trials are not rerun and no MLflow run is duplicated. If the MLflow
server was unreachable for a while, what could not be logged is kept in the trial folders:
replay it with `python -m tune.recover <storage>/<sweep>`.

The best trial of each dataset (by the validation metric) is registered in the MLflow model
registry as a new version of vpdm-DATASET (one registered model per dataset: 'demo', 'mvtec-bottle',
or the NAME of NAME=SPEC; --model-name overrides it) with the alias 'challenger'. The alias
'champion' moves to it only when the model has no champion yet, when it beats the champion on the
validation metric (both re-scored on this sweep's held-out validation data), or with --promote; the
summary says which and why, and so do the version's promotion.* tags. Load the champion with
tune.mlflow_model.load_detector_model("models:/vpdm-DATASET@champion").
The console shows the sweep's own steps, one line per trial start, epoch and end (completed, stopped
by ASHA, failed) and the summary; Ray's own output (Tune's status tables, the trials' and Ray Train
workers' output) goes to Ray's session logs, whose folder the sweep prints (--verbose: on the console
too; --quiet: no per-trial lines). Every epoch's metrics are in <storage>/<sweep>/tune-DATASET/TRIAL/
progress.csv and in MLflow.
Exit codes: 0 done, 2 bad input (nothing was started), 1 the sweep failed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# `ray job submit --working-dir .` runs this file from an unpacked copy of the repository: import
# tune/ and vpdm/ from there (not from wherever a package might be installed).
_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jobs/sweep.py",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data",
        action="append",
        default=None,
        metavar="SPEC",
        help="data spec (default: demo, the built-in synthetic set). 'a,b' = one union model; "
        "'a;b' or repeated --data = separate models; NAME=SPEC names a dataset",
    )
    p.add_argument(
        "--preset",
        default="demo",
        help="named search space + fixed settings: tiny, demo (default), paper, ablation-{full,no-vague,"
        "nearest,no-ot-loss,ddpm-start}; see --list-presets",
    )
    p.add_argument(
        "--ablation",
        choices=["full", "no-vague", "nearest", "no-ot-loss", "ddpm-start"],
        help="pin one of the paper's ablations on top of the preset",
    )
    p.add_argument("--trials", type=int, help="Optuna trials per dataset (default: the preset's)")
    p.add_argument("--epochs", type=int, help="epochs per trial, also ASHA's budget (default: the preset's)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (DDP ranks) per trial (default 2)")
    p.add_argument("--threads-per-worker", type=int, default=1, help="CPUs / torch threads per worker (default 1)")
    p.add_argument(
        "--gpu",
        dest="use_gpu",
        action="store_true",
        default=None,
        help="one GPU per worker, NCCL (default: yes when the cluster has enough GPUs)",
    )
    p.add_argument("--cpu", dest="use_gpu", action="store_false", help="CPU workers (gloo) even when GPUs exist")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: as many as the CPUs fit)")
    p.add_argument(
        "--grace-period",
        type=int,
        help="ASHA: epochs every trial runs before it can be stopped (default: the preset's; "
        ">= --epochs turns early stopping off)",
    )
    p.add_argument(
        "--metric",
        choices=["val_pseudo_auroc", "val_same_class_auroc", "val_loss"],
        help="validation metric for ASHA, Optuna and the champion (default: the preset's; "
        "val_same_class_auroc for 'default', val_pseudo_auroc for the others; both max)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="vpdm setting for every trial, e.g. --set train.batch_size=16 (a searched key is then pinned)",
    )
    p.add_argument(
        "--search",
        action="append",
        default=[],
        metavar="KEY=SPEC",
        help="add/replace a search dimension: KEY=int:LO:HI | logint:LO:HI | float:LO:HI | log:LO:HI | "
        "choice:A,B,.. ; KEY=off removes it",
    )
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--experiment", help="MLflow experiment, one per sweep (default: vpdm-<preset>-<timestamp>)")
    p.add_argument(
        "--model-name",
        help="registered model name (default: vpdm-DATASET, one per dataset); with several datasets a "
        "prefix: NAME-DATASET",
    )
    p.add_argument(
        "--promote",
        action="store_true",
        help="make each dataset's best trial champion even when it does not beat the current champion "
        "(the comparison is still recorded)",
    )
    p.add_argument("--no-register", action="store_true", help="do not register the best trial(s)")
    p.add_argument("--storage", default="runs/sweeps", help="Ray Tune/Train results folder (default runs/sweeps)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray started here)")
    p.add_argument("--num-cpus", type=int, help="logical CPUs of the local Ray (default: enough for the trials)")
    p.add_argument("--seed", type=int, default=0, help="seed of Optuna, the validation split and training")
    p.add_argument(
        "--max-failures", type=int, default=1, help="worker-group restarts per trial, from the last checkpoint"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the sweep named by --experiment after a crash (Tuner.restore): finished trials are "
        "kept, unfinished ones resume from their checkpoints, MLflow runs are reused; the sweep's "
        "saved settings are used (give the same --storage and --tracking-uri)",
    )
    console = p.add_mutually_exclusive_group()
    console.add_argument(
        "--quiet",
        action="store_true",
        help="console: only the sweep's own steps and the summary (no line per trial epoch)",
    )
    console.add_argument(
        "--verbose",
        action="store_true",
        help="console: Ray's own output too (Tune's status tables, every trial's and Ray Train "
        "worker's output), which by default goes only to Ray's session logs",
    )
    p.add_argument("--list-presets", action="store_true", help="print every preset and ablation, then exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tune.presets import describe_presets

    if args.list_presets:
        print(describe_presets())
        return 0
    from tune.plan import SweepConfig
    from tune.sweep import run_sweep
    from vpdm.errors import VPDMError

    sc = SweepConfig(
        datasets=args.data or ["demo"],
        preset=args.preset,
        ablation=args.ablation,
        trials=args.trials,
        epochs=args.epochs,
        workers=args.workers,
        threads_per_worker=args.threads_per_worker,
        use_gpu=args.use_gpu,
        max_concurrent=args.max_concurrent,
        grace_period=args.grace_period,
        overrides=args.overrides,
        search=args.search,
        metric=args.metric,
        tracking_uri=args.tracking_uri,
        experiment=args.experiment,
        model_name=args.model_name,
        storage=args.storage,
        address=args.address,
        num_cpus=args.num_cpus,
        seed=args.seed,
        max_failures=args.max_failures,
        register=not args.no_register,
        promote=args.promote,
        verbose=0 if args.quiet else 2 if args.verbose else 1,
        resume=args.resume,
    )
    try:
        result = run_sweep(sc)
    except VPDMError as exc:
        print(f"sweep: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sweep: interrupted", file=sys.stderr)
        return 130
    print()
    print(result.summary_text())
    missing = [d.name for d in result.datasets if d.best is None]
    if missing:
        print(f"sweep: no trial completed for {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
