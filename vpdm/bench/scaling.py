"""How one unified model scales with its classes: ``python -m vpdm.bench.scaling``.

The same settings are trained on each real class alone, on the first 1, 2, 4 real datasets of ``--data``
together, and on all of them plus 8, 16, 32 synthetic classes of the demo generator (variants of its textures
and objects, each with its own orientation, scale and colours: :func:`vpdm.data.demo.make_demo_dataset`). For
every run it reports the real classes' image / pixel AUROC and AUPRO (and PatchCore's on the same features
with ``--baseline``), the prototypes each class holds, the model's time per image and end to end against the
backbone, training and k-means time, and the peak memory (RSS) of training and of inference.

Each run trains in a process of its own and is scored for speed and memory in another fresh process (a peak
RSS is a process's own), so one run's memory never hides in the next one's. ``results.json`` is written after
every run (a long benchmark keeps what it has done) and ``results.md`` holds the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vpdm.errors import ConfigError, VPDMError
from vpdm.runtime.allocator import keep_large_buffers

SCHEMA = "vpdm-scaling/1"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vpdm.bench.scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="the real datasets, comma-separated data specs (as the bench)")
    p.add_argument("--output", required=True, type=Path, help="folder for results.json and results.md")
    p.add_argument("--synthetic", default="8,16,32", help="numbers of synthetic classes added to all real ones")
    p.add_argument("--subsets", default="1,2,4", help="numbers of real datasets trained together (the first n)")
    p.add_argument("--no-alone", action="store_true", help="skip training each real class alone")
    p.add_argument("--baseline", action="store_true", help="PatchCore on the same features in every run")
    p.add_argument(
        "--demo-dir", type=Path, help="where the synthetic sets are generated (default: beside the demo's, a cache)"
    )
    p.add_argument("--demo-train", type=int, default=60, help="train/good images per synthetic class")
    p.add_argument("--demo-test", type=int, default=20, help="good and as many defective test images per class")
    p.add_argument("--demo-size", type=int, default=256, help="side of the synthetic images (pixels)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--backbone")
    p.add_argument("--weights")
    p.add_argument("--device")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--config", help="a YAML config the settings start from")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--overwrite", action="store_true", help="replace an existing results.json")
    p.add_argument("--child", choices=("train", "infer"), help=argparse.SUPPRESS)
    p.add_argument("--child-spec", help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child-checkpoint", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.synthetic_counts = _counts(args.synthetic, "--synthetic")
    args.subset_counts = _counts(args.subsets, "--subsets")
    return args


def _counts(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated integers, got {text!r}") from None
    if any(v < 0 for v in values):
        raise ConfigError(f"{name} must be integers >= 0, got {text!r}")
    return values


def _config(args: argparse.Namespace, spec: str):
    from vpdm.bench.presets import build_config

    config = build_config(argparse.Namespace(**{**vars(args), "data": spec}))
    if args.threads:
        config = config.with_overrides({"train.threads": int(args.threads)}).validate()
    return config


# -- the plan ---------------------------------------------------------------------------------------


def plan_runs(args: argparse.Namespace, real: list[str], classes_of: dict[str, list[str]]) -> list[dict[str, Any]]:
    """The runs in order: each real class alone (a data spec of one class: the bench's specs name a category
    folder), the first n real datasets together (n > 1; n = 1 too without the runs alone), all of them plus s
    synthetic classes."""
    runs: list[dict[str, Any]] = []
    alone = not args.no_alone and len(real) > 1
    if alone:
        for spec in real:
            if len(classes_of[spec]) == 1:
                name = f"alone {classes_of[spec][0]}"
                runs.append({"name": name, "real": [spec], "only": classes_of[spec][0], "synthetic": 0})
    for n in args.subset_counts:
        if (2 if alone else 1) <= n <= len(real):
            runs.append({"name": f"{n} real", "real": real[:n], "only": None, "synthetic": 0})
    for s in args.synthetic_counts:
        if s > 0:
            runs.append({"name": f"{len(real)} real + {s} synthetic", "real": real, "only": None, "synthetic": s})
    return runs


def synthetic_spec(args: argparse.Namespace, count: int) -> str:
    """``demo:<dir>`` of ``count`` synthetic classes, generated once (the first nine are the demo's named ones)."""
    from vpdm.data.demo import demo_root, make_demo_dataset

    folder = args.demo_dir or demo_root().with_name(demo_root().name + "-scaling")
    root = folder / f"classes-{count}-train{args.demo_train}-test{args.demo_test}-px{args.demo_size}"
    make_demo_dataset(
        root,
        classes=count,
        train_per_class=args.demo_train,
        test_good_per_class=args.demo_test,
        test_defect_per_class=args.demo_test,
        size=args.demo_size,
    )
    return f"demo:{root}"


# -- a child process: train and evaluate one run --------------------------------------------------------


def _timed(module: Any, name: str, totals: dict[str, float]) -> None:
    """Wrap ``module.name`` so that its wall time adds up in ``totals[name]``."""
    original = getattr(module, name)

    def wrapper(*a: Any, **kw: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*a, **kw)
        finally:
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - start

    setattr(module, name, wrapper)


def prototypes_per_class(model: Any, features: Any, class_index: Any, names: list[str]) -> dict[str, Any]:
    """How many coarse prototypes each class holds (a prototype belongs to the class whose training blocks
    pick it as nearest most often; never picked: none) and how many fine prototypes each owns."""
    import torch

    protos = model.prototypes
    votes = torch.zeros(protos.prototypes.shape[0], len(names), dtype=torch.long)
    with torch.no_grad():
        for start in range(0, len(features), 32):
            chunk = model.normalise(features[start : start + 32])
            flat = protos.samples(chunk)
            nearest = torch.cdist(flat, protos.prototypes).argmin(dim=1)
            per_image = flat.shape[0] // chunk.shape[0]
            cls = class_index[start : start + 32].repeat_interleave(per_image)
            votes.index_put_((nearest, cls), torch.ones_like(nearest), accumulate=True)
    used = votes.sum(dim=1) > 0
    owner = votes.argmax(dim=1)
    coarse = {n: int(((owner == i) & used).sum()) for i, n in enumerate(names)}
    fine: dict[str, int] = {}
    if model.fine is not None:
        fine = {n: int((model.fine.owner == i).sum()) for i, n in enumerate(names)}
    return {"coarse": coarse, "coarse_unused": int((~used).sum()), "fine": fine}


def child_train(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import vpdm.model.vpot as vpot
    from vpdm.bench.measure import AnonymousPeak, _peak_rss_mb
    from vpdm.evaluation.evaluator import evaluate
    from vpdm.inference.checkpoint import save_checkpoint
    from vpdm.training import engine

    config = _config(args, args.child_spec)
    totals: dict[str, float] = {}
    _timed(vpot, "kmeans", totals)
    _timed(vpot, "coreset_index", totals)
    with AnonymousPeak() as own:  # without the mapped feature cache's pages, which ru_maxrss counts
        start = time.perf_counter()
        train = engine.load_split(config, "train", progress=False)
        load_seconds = time.perf_counter() - start
        start = time.perf_counter()
        model, _ = engine.fit(config, train, progress=False)
        train_seconds = time.perf_counter() - start
    train_peak = _peak_rss_mb()  # before the test split is read: what training alone holds
    start = time.perf_counter()
    test = engine.load_split(config, "test", progress=False)
    load_seconds += time.perf_counter() - start
    names = sorted({s.category for s in train.dataset.samples})
    result = evaluate(model, config, test, progress=False)
    out: dict[str, Any] = {
        "classes": names,
        "train_images": len(train.features),
        "test_images": len(test.features),
        "load_seconds": load_seconds,
        "train_seconds": train_seconds,
        "kmeans_seconds": totals.get("kmeans", 0.0),
        "coreset_seconds": totals.get("coreset_index", 0.0),
        "train_peak_rss_mb": train_peak,
        "train_peak_own_mb": own.peak_mb,
        "num_prototypes": int(model.prototypes.prototypes.shape[0]),
        "num_fine_prototypes": int(model.fine.prototypes.shape[0]) if model.fine is not None else 0,
        "prototypes_per_class": prototypes_per_class(model, train.features, train.class_index, names),
        "metrics": result.metrics,
    }
    if args.baseline:
        from vpdm.bench.baselines import fit_baseline, score_baseline
        from vpdm.bench.patchcore import PatchCoreConfig
        from vpdm.evaluation.evaluator import ground_truth, pixel_known
        from vpdm.evaluation.metrics import compute_metrics

        pc = fit_baseline(PatchCoreConfig(seed=config.train.seed), train.features, torch.device("cpu"))
        map_size = config.scoring.map_size or config.backbone.image_size
        scores, maps, _ = score_baseline(pc, test.features, map_size, config.scoring, config.train.batch_size)
        labels, masks, cats = ground_truth(test.dataset)
        out["baseline_metrics"] = compute_metrics(
            labels, scores, masks, maps, cats, pixel_known=pixel_known(test.dataset)
        )
    save_checkpoint(args.child_checkpoint, model, config, categories=names)
    return out


def child_infer(args: argparse.Namespace) -> dict[str, Any]:
    """Time per image of the backbone and of the model on 16 real test images, and this process's peak RSS."""
    import torch

    from vpdm.bench.measure import _peak_rss_mb, time_interleaved
    from vpdm.data.dataset import AnomalyDataset
    from vpdm.data.layouts import list_samples
    from vpdm.inference.detector import Detector

    detector = Detector.from_checkpoint(args.child_checkpoint)
    config = detector.config
    if args.threads:
        torch.set_num_threads(args.threads)
    samples = list_samples(args.child_spec, "test")[:16]
    dataset = AnomalyDataset(samples, image_size=config.backbone.image_size)
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    with torch.no_grad():
        features = detector.extractor(images)
        timed = time_interleaved(
            {
                "backbone": lambda: detector.extractor(images),
                "model": lambda: detector.model.detect(
                    features, config.sampling, config.scoring, detector.map_size, precision=detector.precision
                ),
            },
            torch.device("cpu"),
            repeats=5,
        )
    n = len(images)
    backbone = 1000 * timed["backbone"]["min"] / n
    model = 1000 * timed["model"]["min"] / n
    return {
        "images": n,
        "backbone_ms_per_image": backbone,
        "model_ms_per_image": model,
        "end_to_end_over_backbone": (backbone + model) / backbone,
        "infer_peak_rss_mb": _peak_rss_mb(),
    }


# -- the parent: every run, the table -------------------------------------------------------------------


def _child(args: argparse.Namespace, mode: str, spec: str, checkpoint: Path, out: Path) -> dict[str, Any]:
    command = [sys.executable, "-m", "vpdm.bench.scaling", "--data", args.data, "--output", str(args.output)]
    for flag in ("epochs", "backbone", "weights", "device", "config"):
        if getattr(args, flag) is not None:
            command += [f"--{flag}", str(getattr(args, flag))]
    for item in args.overrides:
        command += ["--set", item]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.baseline:
        command.append("--baseline")
    command += ["--child", mode, "--child-spec", spec, "--child-out", str(out), "--child-checkpoint", str(checkpoint)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise VPDMError(f"the {mode} process of {spec!r} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def table(runs: list[dict[str, Any]], real_classes: list[str]) -> str:
    alone = {r["only"]: r for r in runs if r.get("only") and "metrics" in r}
    lines = [
        "| run | classes | real image / pixel / AUPRO | worst real class vs alone (image, pixel) | "
        "PatchCore image / pixel / AUPRO | coarse prototypes per real class | fine per class | model ms / image | "
        "end to end / backbone | train s | k-means + coreset s | train / inference peak MiB | train peak without "
        "mapped features MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        if "metrics" not in r:
            continue
        per = r["metrics"]["per_class"]
        mine = [c for c in real_classes if c in per]

        def mean_of(metrics: dict[str, Any], key: str, classes: list[str] = mine) -> float | None:
            return _mean([metrics["per_class"][c][key] for c in classes if c in metrics["per_class"]])

        worst = "-"
        if not r.get("only") and alone:
            deltas = [
                (
                    100 * (per[c]["image_auroc"] - alone[c]["metrics"]["per_class"][c]["image_auroc"]),
                    100 * (per[c]["pixel_auroc"] - alone[c]["metrics"]["per_class"][c]["pixel_auroc"]),
                )
                for c in mine
                if c in alone
            ]
            if deltas:
                worst = f"{min(d[0] for d in deltas):+.1f} / {min(d[1] for d in deltas):+.1f}"
        base = r.get("baseline_metrics")
        pc = " / ".join(_pct(mean_of(base, k)) for k in ("image_auroc", "pixel_auroc", "aupro")) if base else "-"
        counts = r["prototypes_per_class"]
        coarse = _mean([counts["coarse"][c] for c in mine if c in counts["coarse"]])
        fine = _mean(list(counts["fine"].values()))
        lines.append(
            f"| {r['name']} | {len(r['classes'])} | "
            + " / ".join(_pct(mean_of(r["metrics"], k)) for k in ("image_auroc", "pixel_auroc", "aupro"))
            + f" | {worst} | {pc} | {coarse:.0f} of {r['num_prototypes']} | "
            + (f"{fine:.0f}" if fine is not None else "-")
            + f" | {r['model_ms_per_image']:.1f} | {r['end_to_end_over_backbone']:.2f}x | {r['train_seconds']:.0f} | "
            f"{r['kmeans_seconds'] + r['coreset_seconds']:.0f} | {r['train_peak_rss_mb']:.0f} / "
            f"{r['infer_peak_rss_mb']:.0f} | "
            + (f"{r['train_peak_own_mb']:.0f}" if r.get("train_peak_own_mb") is not None else "-")
            + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        keep_large_buffers()  # as the command line: timings of a process set up as users' are
        if args.child:
            out = child_train(args) if args.child == "train" else child_infer(args)
            args.child_out.write_text(json.dumps(out))
            return 0
        return run(args)
    except VPDMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    from vpdm.bench.measure import versions
    from vpdm.data.layouts import list_samples, parse_data_spec

    results = args.output / "results.json"
    if results.exists() and not args.overwrite:
        raise VPDMError(f"{str(results)!r} exists; pass --overwrite to replace it")
    real = [f"{kind}:{path}" for kind, path in parse_data_spec(args.data)]
    classes_of = {spec: sorted({s.category for s in list_samples(spec, "train")}) for spec in real}
    real_classes = [c for spec in real for c in classes_of[spec]]
    _config(args, args.data)  # every setting checked before the first run
    runs = plan_runs(args, real, classes_of)
    args.output.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "command": " ".join(["python -m vpdm.bench.scaling", *sys.argv[1:]]),
        "versions": versions(),
        "runs": runs,
    }
    with tempfile.TemporaryDirectory(prefix="vpdm-scaling-") as tmp:
        for i, r in enumerate(runs):
            spec = ",".join(r["real"] + ([synthetic_spec(args, r["synthetic"])] if r["synthetic"] else []))
            r["spec"] = spec.replace(str(Path.home()), "~")  # as recorded: no machine's home path in results
            checkpoint = Path(tmp) / f"run{i}.pt"
            print(f"[{i + 1}/{len(runs)}] {r['name']}: training ...", flush=True)
            r.update(_child(args, "train", spec, checkpoint, Path(tmp) / f"train{i}.json"))
            r.update(_child(args, "infer", spec, checkpoint, Path(tmp) / f"infer{i}.json"))
            mine = [c for c in real_classes if c in r["metrics"]["per_class"]]
            print(
                f"    {len(r['classes'])} classes: real image AUROC "
                f"{_pct(_mean([r['metrics']['per_class'][c]['image_auroc'] for c in mine]))}, "
                f"model {r['model_ms_per_image']:.1f} ms/image, train {r['train_seconds']:.0f} s, "
                f"peak {r['train_peak_rss_mb']:.0f} MiB",
                flush=True,
            )
            results.write_text(json.dumps(report, indent=1))
    (args.output / "results.md").write_text(table(runs, real_classes))
    print(table(runs, real_classes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
