"""Training throughput of W Ray Train workers x T threads each: the scaling efficiency of the DDP loop.

    python -m tune.scaling                       # demo data, demo preset, 1x1 vs 2x1, 4 epochs
    python -m tune.scaling --configs 1x1,2x1,1x2 --epochs 6 --data mvtec:/data/mvtec/bottle

Each configuration trains the same model (the preset's fixed settings, the library defaults for
what the preset searches, unless ``--set``) on the same features (extracted once, shared through
the object store) with the sweep's worker function, with the same *global* batch
(``train.batch_size``, split over the workers). Throughput is training images per second of an
epoch (all workers together; validation excluded), the median over the epochs after the first
(warm-up). Efficiency of W workers = throughput(W) / (W x throughput(1)).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ray.train.v2.api.callback import UserCallback


class _JsonlMetrics(UserCallback):
    """Append every reported epoch's metrics to a JSON-lines file (the controller runs on this node)."""

    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(metrics[0]) + "\n")


def measure(bundle_ref: Any, config: Any, workers: int, threads: int, storage: Path) -> list[dict[str, Any]]:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from tune.distributed import train_worker
    from vpdm.config.values import to_dict

    log = storage / f"metrics-{workers}x{threads}-{time.time_ns()}.jsonl"
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "bundle": bundle_ref,
            "vpdm_config": to_dict(config),
            "threads": threads,
            "trial": f"scaling-{workers}x{threads}",
        },
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": threads}),
        run_config=ray.train.RunConfig(
            name=log.stem,
            storage_path=str(storage),
            callbacks=[_JsonlMetrics(str(log))],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
        ),
    )
    trainer.fit()
    return [json.loads(line) for line in log.read_text().splitlines()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tune.scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="demo", help="data spec (default: demo)")
    p.add_argument("--preset", default="demo", help="fixed settings of this preset (default: demo)")
    p.add_argument("--configs", default="1x1,2x1", help="WORKERSxTHREADS list (default 1x1,2x1)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--repeats", type=int, default=1, help="measure each configuration this many times (interleaved)")
    args = p.parse_args(argv)

    import ray

    from tune.features import build_bundle
    from tune.presets import get_preset
    from vpdm.config.schema import VPDMConfig
    from vpdm.features.backbone import FeatureExtractor

    preset = get_preset(args.preset)
    config = (
        VPDMConfig()
        .with_overrides(dict(preset.fixed))
        .with_overrides({"data.spec": args.data, "train.epochs": args.epochs})
    )
    if args.overrides:
        config = config.with_overrides(args.overrides)
    config.validate()
    configs = [tuple(int(x) for x in c.lower().split("x")) for c in args.configs.split(",")]
    extractor = FeatureExtractor(config.backbone, precision=config.inference.precision)
    bundle, stats = build_bundle("scaling", config, extractor, progress=False)
    print(
        f"data {args.data}: {len(bundle.train_features)} training images, features {bundle.feature_shape}, "
        f"{stats.backbone_forwards} backbone forwards; global batch {config.train.batch_size}, {args.epochs} epochs; "
        f"host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    need = max(w * t for w, t in configs)
    ray.init(num_cpus=max(need, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    results: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
    try:
        ref = ray.put(bundle)
        with tempfile.TemporaryDirectory(prefix="vpdm-scaling-") as storage:
            for _ in range(args.repeats):
                for workers, threads in configs:
                    epochs = measure(ref, config, workers, threads, Path(storage))
                    warm = [e["images_per_s"] for e in epochs[1:]] or [e["images_per_s"] for e in epochs]
                    results[(workers, threads)].append(statistics.median(warm))
                    print(
                        f"{workers} worker(s) x {threads} thread(s): "
                        + ", ".join(f"{e['images_per_s']:.1f}" for e in epochs)
                        + " images/s per epoch "
                        f"(median after warm-up {statistics.median(warm):.1f})",
                        flush=True,
                    )
    finally:
        ray.shutdown()
    base = statistics.median(results[configs[0]])
    w0, t0 = configs[0]
    print(f"\n{'config':<10} {'images/s':>9} {'speed-up':>9} {'efficiency':>11}")
    for (workers, threads), values in results.items():
        thr = statistics.median(values)
        speedup = thr / base
        scale = (workers * threads) / (w0 * t0)
        print(f"{workers}x{threads:<8} {thr:>9.1f} {speedup:>9.2f} {speedup / scale:>10.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
