"""How the map's two terms should be combined, per class: three studies on one saved model.

    python -m vpdm.bench.screen --data SPEC ... --save model.pt          # any model with fine prototypes
    python benchmarks/map_terms_study.py --checkpoint model.pt --study weights,labelled,positions,aggregate --threads 2

The default map is the mean of two standardised terms (``scoring.combine=standardised``): the coarse term (4x4
blocks of the reconstruction, ``scoring.pools=[4]``) and the fine term (each position against the fine
prototypes' condition, ``scoring.fine_pools=[1]``), one weight for every class. Each term is a feature-resolution
map, and upsampling and blur are linear, so every weighting is scored from two post-processed maps computed once.

* ``weights``: the map ``w * coarse + (1 - w) * fine`` for w in 0 .. 1 (0.5 is the default). Per class, the test
  split's pixel AUROC / pixel AP (what a choice made with the test defects would take: the oracle) against the
  same on *same-class pseudo-defects* of up to 64 normal training images per class (``tune.features``'s
  feature-space defects, their squares as masks: a choice that needs no defect), each choice's full metrics,
  and the small- / medium-defect pixel recall per class and weight.
* ``labelled``: the weight per class chosen on labelled defects (as a user with a labelled validation set could):
  each class's test images split in two alternate halves, w chosen on one by pixel AUROC or AP, measured on the
  other, both ways and averaged, against w = 0.5 on the same halves.
* ``positions``: each term standardised by its mean (and optionally std, shrunk half-way to the class's) at each
  feature position over the class's training images, instead of one mean / std per class; the map alone, then
  also the image score from the standardised terms (coarse 4 + fine 1 + fine 4, as the default's image terms).
* ``aggregate``: the fine branch on PatchCore's locally aggregated features (``--window`` x ``--window`` mean):
  fine prototypes re-chosen (the model's coreset, per class) from aggregated training features, the fine terms
  between aggregated features and their condition; the coarse term unchanged.

Statistics in ``positions`` and ``aggregate`` come from up to ``--per-class`` training images per class (as
``VPDM.fit_statistics``); the checkpoint's own are used in ``weights``. Figures: image / pixel AUROC / AUPRO /
pixel AP (mean over classes), per class the same and ``s`` = small-defect pixel recall at 1 % normal-pixel FPR,
then the small stratum's AUPRO / recall (``vpdm.evaluation.metrics.defect_size_metrics``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vpdm.evaluation import evaluator  # noqa: E402
from vpdm.evaluation.metrics import compute_metrics, defect_size_metrics, pixel_ap, pixel_auroc  # noqa: E402
from vpdm.inference.checkpoint import load_checkpoint  # noqa: E402
from vpdm.model.scoring import l2_block_term, local_average, postprocess_maps, score_maps  # noqa: E402
from vpdm.training import engine  # noqa: E402

WEIGHTS = (0.0, 0.2, 0.35, 0.5, 0.65, 0.8, 1.0)
STUDIES = ("weights", "labelled", "positions", "aggregate")


class Study:
    def __init__(self, checkpoint: str, data: str | None):
        self.model, self.config, _ = load_checkpoint(checkpoint)
        if data:
            self.config = self.config.with_overrides({"data.spec": data}).validate()
        if self.model.fine is None:
            raise SystemExit(f"{checkpoint}: the model has no fine prototypes (model.fine.num_prototypes = 0)")
        self.model.eval()
        self.scoring = self.config.scoring
        self.size = self.scoring.map_size or self.config.backbone.image_size
        self.train = engine.load_split(self.config, "train", progress=False)
        self.test = engine.load_split(self.config, "test", progress=False)
        self.labels, self.masks, self.cats = evaluator.ground_truth(self.test.dataset)
        self.classes = sorted(set(self.cats))
        self.train_cats = np.array([s.category for s in self.train.dataset.samples])

    def post(self, maps: torch.Tensor) -> np.ndarray:
        return postprocess_maps(maps, self.size, self.scoring.blur_sigma).numpy()

    @torch.no_grad()
    def raw_terms(self, features: torch.Tensor, fine_features: torch.Tensor | None = None, batch: int = 32) -> dict:
        """Unstandardised terms (feature resolution): coarse 4, fine 1, fine 4, and each image's class.
        ``fine_features``: what the fine branch sees (default: the features)."""
        model, out = self.model, {k: [] for k in ("c4", "f1", "f4", "cls")}
        for s in range(0, len(features), batch):
            f = features[s : s + batch].float()
            g = f if fine_features is None else fine_features[s : s + batch].float()
            reconstruction = model.reconstruct(f, self.config.sampling)
            fine, classes = model.fine_condition(g)
            out["c4"].append(l2_block_term(model.normalise(f) - reconstruction, 4))
            difference = model.normalise(g) - fine
            out["f1"].append(l2_block_term(difference, 1))
            out["f4"].append(l2_block_term(difference, 4))
            out["cls"].append(classes)
        return {k: torch.cat(v) for k, v in out.items()}

    def picks(self, per_class: int) -> list[np.ndarray]:
        """Up to ``per_class`` training images of each class, evenly spaced in its list (as fit_statistics)."""
        out = []
        for c in self.classes:
            idx = np.flatnonzero(self.train_cats == c)
            out.append(idx[np.linspace(0, len(idx) - 1, min(per_class, len(idx))).round().astype(int)])
        return out

    def checkpoint_z(self, terms: dict) -> dict:
        """Terms standardised with the checkpoint's own per-class statistics."""
        statistics = self.model._statistics(terms["cls"], self.scoring)
        z = {}
        for key, (branch, p) in (("c4", ("coarse", 4)), ("f1", ("fine", 1)), ("f4", ("fine", 4))):
            mean, std = statistics(branch, p)
            z[key] = (terms[key] - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
        return z

    def report(self, label: str, scores: np.ndarray, maps: np.ndarray) -> None:
        m = compute_metrics(self.labels, scores, self.masks, maps, self.cats)
        sizes = defect_size_metrics(self.masks, maps, self.cats)

        def pct(d: dict, k: str) -> str:
            return f"{100 * d[k]:.1f}"

        per = " ".join(
            f"{c.split('/')[-1][:6]} "
            + "/".join(pct(m["per_class"][c], k) for k in ("image_auroc", "pixel_auroc", "aupro", "pixel_ap"))
            + f"/s{100 * sizes['per_class'][c]['small']['pixel_recall']:.0f}"
            for c in self.classes
        )
        mean = "/".join(pct(m["mean"], k) for k in ("image_auroc", "pixel_auroc", "aupro", "pixel_ap"))
        small = sizes["mean"]["small"]
        print(f"{label}: {mean} | {per} | small {100 * small['aupro']:.1f}/{100 * small['pixel_recall']:.1f}", flush=True)

    # -- the studies -------------------------------------------------------------------------------
    def weights(self) -> None:
        from tune.features import same_class_pseudo_anomalies

        test = self.raw_terms(self.test.features)
        z = self.checkpoint_z(test)
        image_map = self.post((z["c4"] + z["f1"] + z["f4"]) / 3)
        scores = score_maps(torch.from_numpy(image_map), self.scoring).numpy()
        coarse, fine = self.post(z["c4"]), self.post(z["f1"])
        cats = np.array(self.cats)
        oracle, pseudo = {}, {}
        for c in self.classes:
            idx = np.flatnonzero(cats == c)
            oracle[c] = [
                (pixel_auroc(self.masks[idx], w * coarse[idx] + (1 - w) * fine[idx]),
                 pixel_ap(self.masks[idx], w * coarse[idx] + (1 - w) * fine[idx]))
                for w in WEIGHTS
            ]
        for c, pick in zip(self.classes, self.picks(64)):
            clean = self.train.features[torch.as_tensor(pick)].float().numpy()
            defects = same_class_pseudo_anomalies(clean, seed=0)
            where = np.abs(defects - clean).max(axis=1) > 0  # the squares each defect changed
            z_pseudo = self.checkpoint_z(self.raw_terms(torch.from_numpy(np.concatenate([clean, defects]))))
            pc, pf = self.post(z_pseudo["c4"]), self.post(z_pseudo["f1"])
            square = torch.from_numpy(np.concatenate([np.zeros_like(where), where]).astype(np.float32))[:, None]
            masks = torch.nn.functional.interpolate(square, size=(self.size, self.size), mode="nearest")[:, 0] > 0.5
            masks = masks.numpy()
            pseudo[c] = [(pixel_auroc(masks, w * pc + (1 - w) * pf), pixel_ap(masks, w * pc + (1 - w) * pf)) for w in WEIGHTS]
        print("per class, coarse weight w: pixel AUROC / pixel AP, on the test split (oracle) | on pseudo-defects")
        for c in self.classes:
            cells = " ".join(
                f"{w}: {100 * o[0]:.1f}/{100 * o[1]:.1f} | {100 * p[0]:.1f}/{100 * p[1]:.1f};"
                for w, o, p in zip(WEIGHTS, oracle[c], pseudo[c])
            )
            print(f"  {c}: {cells}", flush=True)

        def assembled(weight_of: dict) -> np.ndarray:
            maps = np.empty_like(coarse)
            for c in self.classes:
                idx = np.flatnonzero(cats == c)
                maps[idx] = weight_of[c] * coarse[idx] + (1 - weight_of[c]) * fine[idx]
            return maps

        self.report("w = 0.5 for every class (the default)", scores, assembled(dict.fromkeys(self.classes, 0.5)))
        for k, metric in ((0, "pixel AUROC"), (1, "pixel AP")):
            for name, table in (("pseudo-defects", pseudo), ("oracle", oracle)):
                chosen = {c: WEIGHTS[int(np.argmax([r[k] for r in table[c]]))] for c in self.classes}
                label = f"w per class by {metric} on {name} " + str({c.split('/')[-1]: w for c, w in chosen.items()})
                self.report(label, scores, assembled(chosen))
        print("per class, coarse weight w: small / medium pixel recall at 1 % FPR")
        for w in WEIGHTS:
            sizes = defect_size_metrics(self.masks, w * coarse + (1 - w) * fine, self.cats)
            cells = " ".join(
                f"{c.split('/')[-1][:6]} {100 * sizes['per_class'][c]['small']['pixel_recall']:.1f}"
                f"/{100 * sizes['per_class'][c]['medium']['pixel_recall']:.1f}"
                for c in self.classes
            )
            print(f"  w={w}: {cells} | mean small {100 * sizes['mean']['small']['pixel_recall']:.1f}", flush=True)

    def labelled(self) -> None:
        """A weight per class chosen on labelled defects of that class, measured on others: each class's test
        images (normal and defective, alternately) in two halves; w chosen on one half by pixel AUROC or AP,
        metrics on the other, both ways, averaged; against w = 0.5 on the same halves."""
        test = self.raw_terms(self.test.features)
        z = self.checkpoint_z(test)
        scores = score_maps(torch.from_numpy(self.post((z["c4"] + z["f1"] + z["f4"]) / 3)), self.scoring).numpy()
        coarse, fine = self.post(z["c4"]), self.post(z["f1"])
        cats, labels = np.array(self.cats), np.asarray(self.labels)
        half = np.zeros(len(cats), dtype=int)
        for c in self.classes:
            for label in (0, 1):
                idx = np.flatnonzero((cats == c) & (labels == label))
                half[idx[1::2]] = 1
        keys = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap")
        for k, metric in ((None, "w = 0.5"), (0, "pixel AUROC"), (1, "pixel AP")):
            totals, chosen_all = [], []
            for choose in (0, 1):
                pick, measure = np.flatnonzero(half == choose), np.flatnonzero(half != choose)
                chosen = {}
                for c in self.classes:
                    idx = pick[cats[pick] == c]
                    if k is None:
                        chosen[c] = 0.5
                        continue
                    values = []
                    for w in WEIGHTS:
                        m = w * coarse[idx] + (1 - w) * fine[idx]
                        values.append(pixel_auroc(self.masks[idx], m) if k == 0 else pixel_ap(self.masks[idx], m))
                    chosen[c] = WEIGHTS[int(np.argmax(values))]
                chosen_all.append(chosen)
                maps = np.empty((len(measure),) + coarse.shape[1:], dtype=coarse.dtype)
                for c in self.classes:
                    where = np.flatnonzero(cats[measure] == c)
                    maps[where] = chosen[c] * coarse[measure[where]] + (1 - chosen[c]) * fine[measure[where]]
                m = compute_metrics(labels[measure], scores[measure], self.masks[measure], maps, cats[measure])
                sizes = defect_size_metrics(self.masks[measure], maps, cats[measure])
                totals.append((m, sizes))
            mean = "/".join(f"{100 * np.mean([t[0]['mean'][key] for t in totals]):.1f}" for key in keys)
            per = " ".join(
                f"{c.split('/')[-1][:6]} "
                + "/".join(f"{100 * np.mean([t[0]['per_class'][c][key] for t in totals]):.1f}" for key in keys)
                + f" w {chosen_all[0][c]}|{chosen_all[1][c]}"
                for c in self.classes
            )
            small = np.mean([t[1]["mean"]["small"]["pixel_recall"] for t in totals])
            print(f"chosen by {metric} on the other half: {mean} | {per} | small recall {100 * small:.1f}", flush=True)

    def positions(self, per_class: int) -> None:
        test = self.raw_terms(self.test.features)
        stats = []
        for pick in self.picks(per_class):
            r = self.raw_terms(self.train.features[torch.as_tensor(pick)])
            stats.append({k: (r[k].mean(0), r[k].std(0), r[k].mean(), r[k].std()) for k in ("c4", "f1", "f4")})
        classes = test["cls"].tolist()

        def z(key: str, mode: str) -> torch.Tensor:
            out = torch.empty_like(test[key])
            for i, c in enumerate(classes):
                mean_pos, std_pos, mean, std = stats[c][key]
                if mode == "class":
                    out[i] = (test[key][i] - mean) / std
                elif mode == "position mean":
                    out[i] = (test[key][i] - mean_pos) / std
                else:  # position mean and std, the std shrunk half-way to the class's
                    out[i] = (test[key][i] - mean_pos) / torch.sqrt(0.5 * std_pos**2 + 0.5 * std**2)
            return out

        default_scores = None
        for mode in ("class", "position mean", "position mean and std"):
            zs = {k: z(k, mode) for k in ("c4", "f1", "f4")}
            image_scores = score_maps(torch.from_numpy(self.post((zs["c4"] + zs["f1"] + zs["f4"]) / 3)), self.scoring)
            if default_scores is None:
                default_scores = image_scores.numpy()
            maps = self.post((zs["c4"] + zs["f1"]) / 2)
            self.report(f"{mode}: map", default_scores, maps)
            if mode != "class":
                self.report(f"{mode}: map and image score", image_scores.numpy(), maps)

    def aggregate(self, window: int, per_class: int) -> None:
        def averaged(x: torch.Tensor, batch: int = 64) -> torch.Tensor:
            return torch.cat([local_average(x[s : s + batch].float(), window) for s in range(0, len(x), batch)])

        start = time.perf_counter()
        train_fine = averaged(self.train.features)
        generator = torch.Generator().manual_seed(self.config.train.seed)
        self.model.fine.init_from(train_fine, generator, self.train.class_index, transform=self.model.normalise)
        print(f"fine prototypes re-chosen from {window}x{window}-averaged features in {time.perf_counter() - start:.0f}s")
        test = self.raw_terms(self.test.features, averaged(self.test.features))
        stats = []
        for pick in self.picks(per_class):
            p = torch.as_tensor(pick)
            r = self.raw_terms(self.train.features[p], train_fine[p])
            stats.append({k: (r[k].mean(), r[k].std()) for k in ("c4", "f1", "f4")})
        classes = test["cls"].tolist()
        zs = {}
        for key in ("c4", "f1", "f4"):
            mean = torch.tensor([stats[c][key][0] for c in classes]).view(-1, 1, 1)
            std = torch.tensor([stats[c][key][1] for c in classes]).view(-1, 1, 1)
            zs[key] = (test[key] - mean) / std
        scores = score_maps(torch.from_numpy(self.post((zs["c4"] + zs["f1"] + zs["f4"]) / 3)), self.scoring).numpy()
        coarse, fine = self.post(zs["c4"]), self.post(zs["f1"])
        for w in (0.0, 0.35, 0.5):
            self.report(f"fine branch on {window}x{window}-averaged features, coarse weight {w}", scores, w * coarse + (1 - w) * fine)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a saved model with fine prototypes")
    p.add_argument("--data", help="data spec (default: the checkpoint's)")
    p.add_argument("--study", default="weights", help=f"comma-separated, of {', '.join(STUDIES)}")
    p.add_argument("--window", type=int, default=3, help="aggregate: the local mean's odd window")
    p.add_argument("--per-class", type=int, default=64, help="training images per class for the statistics")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    studies = [s for s in args.study.split(",") if s]
    unknown = [s for s in studies if s not in STUDIES]
    if unknown or not studies:
        p.error(f"--study: expected a comma-separated list of {', '.join(STUDIES)}, got {args.study!r}")
    if args.window < 1 or args.window % 2 == 0:
        p.error(f"--window must be an odd integer >= 1, got {args.window}")
    if args.threads:
        torch.set_num_threads(args.threads)
    study = Study(args.checkpoint, args.data)
    for name in ("weights", "labelled", "positions"):  # aggregate last: it replaces the model's fine prototypes
        if name in studies:
            print(f"== {name}", flush=True)
            if name == "positions":
                study.positions(args.per_class)
            else:
                getattr(study, name)()
    if "aggregate" in studies:
        print("== aggregate", flush=True)
        study.aggregate(args.window, args.per_class)
    return 0


if __name__ == "__main__":
    sys.exit(main())
