"""One benchmark run: features once, VPDM per preset, the baseline, steps table, timing, cache proof.

As ``vpdm train`` does, a seeded ``train.calibration_fraction`` of each class's ``train/good`` is held
out: every detector is fitted on the rest, and each one's decision thresholds are calibrated on the
held-out images (per class, the ``1 - calibration.false_alarm_rate`` quantile of their scores and map
pixels, :mod:`vpdm.decision.postprocess`); the precision, recall, F1 and false-alarm rate at those thresholds
on the test split (:func:`calibrated_decisions`) stand beside the threshold-free metrics.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vpdm.bench.baselines import (
    PATCHCORE_PUBLISHED_BLUR_SIGMA,
    baseline_batch,
    baseline_raw_maps,
    fit_baseline,
    score_baseline,
    score_baseline_maps,
)
from vpdm.bench.measure import _peak_rss_mb, time_interleaved, versions
from vpdm.bench.presets import ABLATIONS, PAPER_TABLE3, PRESET_DESCRIPTIONS, PRESETS, build_config
from vpdm.bench.report import METRICS, _clean, _pct
from vpdm.errors import ConfigError

SCHEMA = "vpdm-bench/1"


def parse_steps(text: str, num_timesteps: int, default_sampler: str) -> list[tuple[str, int]]:
    """``"1,2,5,ddpm:1000"`` -> [(sampler, steps), ...]; a bare number uses ``default_sampler``."""
    rows: list[tuple[str, int]] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        sampler, _, raw = item.rpartition(":")
        sampler = sampler or default_sampler
        if sampler not in ("ddim", "ddpm"):
            raise ConfigError(f"--steps item {item!r}: sampler must be 'ddim' or 'ddpm'")
        try:
            steps = int(raw)
        except ValueError:
            raise ConfigError(f"--steps item {item!r} is not a number of steps (e.g. 5 or ddpm:1000)") from None
        if not 1 <= steps <= num_timesteps:
            raise ConfigError(f"--steps item {item!r}: steps must be in 1..{num_timesteps} (the diffusion's T)")
        if (sampler, steps) not in rows:
            rows.append((sampler, steps))
    if not rows:
        raise ConfigError(f"--steps {text!r} names no sampler steps")
    return rows


def calibrated_decisions(
    held_scores: np.ndarray,
    held_maps: np.ndarray,
    held_categories: list[str],
    test_scores: np.ndarray,
    test_labels: np.ndarray,
    test_categories: list[str],
    false_alarm_rate: float,
) -> dict[str, Any]:
    """Per class, quantile thresholds from held-out normal images' scores and maps; the decisions
    ``score > image threshold`` on the test split, per class and mean (:func:`vpdm.evaluation.metrics.decision_metrics`)."""
    from vpdm.decision.postprocess import ClassThresholds, image_labels
    from vpdm.evaluation.metrics import decision_metrics

    held_cats = np.asarray(held_categories)
    thresholds = {
        c: ClassThresholds.from_scores(held_scores[held_cats == c], held_maps[held_cats == c], false_alarm_rate)
        for c in sorted(set(held_categories))
    }
    missing = sorted(set(test_categories) - set(thresholds))
    if missing:
        raise ConfigError(f"no held-out calibration images of test class(es) {', '.join(missing)}")
    predicted = image_labels(test_scores, test_categories, {c: t.image_threshold for c, t in thresholds.items()})
    doc = decision_metrics(test_labels, predicted, test_categories)
    doc["image_thresholds"] = {c: t.image_threshold for c, t in thresholds.items()}
    doc["pixel_thresholds"] = {c: t.pixel_threshold for c, t in thresholds.items()}
    doc["calibration_images"] = {c: t.num_images for c, t in thresholds.items()}
    doc["method"] = "quantile"
    doc["false_alarm_rate"] = false_alarm_rate
    return doc


def balanced_subset(labels: np.ndarray, categories: list[str], per_class: int, seed: int) -> np.ndarray:
    """Up to ``per_class`` test images per class, half normal and half anomalous where possible
    (the other group fills in), picked at random with ``seed``; sorted indices. 0 = all."""
    if per_class <= 0:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    cats = np.asarray(categories)
    keep: list[int] = []
    for cat in sorted(set(categories)):
        idx = np.flatnonzero(cats == cat)
        good = rng.permutation(idx[labels[idx] == 0])
        bad = rng.permutation(idx[labels[idx] == 1])
        n_good = min(len(good), max(per_class // 2, per_class - len(bad)))
        n_bad = min(len(bad), per_class - n_good)
        keep.extend(good[:n_good].tolist() + bad[:n_bad].tolist())
    return np.array(sorted(keep), dtype=np.int64)


class Bench:
    """Holds the state of one benchmark run; ``run()`` returns the JSON document."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.progress = not args.no_progress
        presets = list(args.preset or ["default", "paper"])
        if args.ablations:
            presets += list(ABLATIONS)
        presets = list(dict.fromkeys(presets))
        self.presets = presets
        self.main = "default" if "default" in presets else presets[0]
        # every preset's settings are built and validated before any long work
        self.configs = {name: build_config(args, PRESETS[name]) for name in presets}
        self.main_config = self.config = self.configs[self.main]
        # Every preset is trained on the run's one set of features (the main preset's backbone): the table
        # compares methods, not inputs. A preset that pins another input (`paper`: 224 px, bilinear) is told so.
        self.backbone_note: dict[str, dict[str, Any]] = {}
        main_backbone = self.main_config.backbone
        for name, pcfg in self.configs.items():
            if pcfg.backbone != main_backbone:
                own = dataclasses.asdict(pcfg.backbone)
                run_on = dataclasses.asdict(main_backbone)
                self.backbone_note[name] = {k: own[k] for k in own if own[k] != run_on[k]}
                self.configs[name] = dataclasses.replace(pcfg, backbone=main_backbone)
        t_full = self.main_config.model.diffusion.num_timesteps
        t_start = self.main_config.sampling.start_step or t_full
        steps = args.steps or ",".join([str(n) for n in (1, 2, 5, 10, 25) if n < t_start] + [f"ddpm:{t_start}"])
        self.steps = parse_steps(steps, t_start, self.main_config.sampling.sampler)
        accel = (self.main_config.sampling.sampler, self.main_config.sampling.num_steps)
        if accel not in self.steps:
            self.steps.append(accel)
        self.steps.sort(key=lambda r: (r[1], r[0]))
        if args.timing_images < 1 or args.timing_repeats < 1:
            raise ConfigError("--timing-images and --timing-repeats must be >= 1")
        try:
            self.time_widths = [int(w) for w in args.time_widths.split(",") if w.strip()]
        except ValueError:
            raise ConfigError(f"--time-widths {args.time_widths!r} must be comma-separated integers") from None
        for w in self.time_widths:
            self.main_config.with_overrides({"model.denoiser.width": w}).validate()
        if getattr(args, "onnx", False):  # before any long work: packages, settings, device
            from vpdm.deploy.export import require_package, unsupported_settings
            from vpdm.training import engine

            require_package("onnx")
            require_package("onnxruntime")
            problems = unsupported_settings(self.main_config)
            if problems:
                raise ConfigError("--onnx: the ONNX export cannot do " + "; ".join(problems))
            if engine.select_device(self.main_config.train.device).type != "cpu":
                raise ConfigError(
                    "--onnx times ONNX Runtime on the CPU against torch on the CPU; run the benchmark with --device cpu"
                )
        if args.steps_subset < 0 or args.subset_above < 1:
            raise ConfigError("--steps-subset must be >= 0 and --subset-above >= 1")
        from vpdm.bench.patchcore import PatchCoreConfig

        self.pc_config = PatchCoreConfig(
            coreset_ratio=args.coreset_ratio,
            max_bank=args.max_bank or None,
            max_candidates=args.max_candidates or None,
            k=args.pc_k,
            aggregate=args.pc_aggregate,
            standardise=args.pc_standardise,
            seed=self.config.train.seed,
        )
        self.pc_config.validate()
        self.memory: dict[str, float] = {}

    def log(self, message: str) -> None:
        print(message, flush=True)

    def _mark(self, phase: str) -> None:
        self.memory[phase] = round(_peak_rss_mb(), 1)

    # ---------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from vpdm.evaluation import evaluator
        from vpdm.features.backbone import FeatureExtractor, total_images_seen
        from vpdm.training import engine

        cfg = self.config
        torch.set_num_threads(cfg.train.threads)
        device = engine.select_device(cfg.train.device)
        self.device = device
        started = time.perf_counter()
        doc: dict[str, Any] = {
            "schema": SCHEMA,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": None,  # filled in by main()
            "versions": versions(),
            "machine": {
                "device": str(device),
                "torch_threads": torch.get_num_threads(),
                "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            },
            "config": cfg.to_dict(),
            "presets": {
                name: {"overrides": PRESETS[name], "description": PRESET_DESCRIPTIONS[name]} for name in self.presets
            },
            "main_preset": self.main,
            # what each preset would have used on its own, where it differs from the run's features
            "preset_backbone_differences": self.backbone_note,
        }

        # 1. features, once --------------------------------------------------------------
        extractor = FeatureExtractor(cfg.backbone, precision=cfg.inference.precision).to(device)
        seen = total_images_seen()
        train = engine.load_split(cfg, "train", extractor, progress=self.progress)
        test = engine.load_split(cfg, "test", extractor, progress=self.progress)
        extracted = total_images_seen() - seen
        labels, masks, cats = evaluator.ground_truth(test.dataset)
        self.gt = (labels, masks, cats)
        self.map_size = cfg.scoring.map_size or cfg.backbone.image_size
        doc["data"] = self._data_section(cfg, extractor, train, test, extracted)
        self.log(
            f"features: train {tuple(train.features.shape)} ({'cache hit' if train.cache_hit else 'extracted'}, "
            f"{train.extract_seconds:.1f}s), test {tuple(test.features.shape)} "
            f"({'cache hit' if test.cache_hit else 'extracted'}, {test.extract_seconds:.1f}s)"
        )
        # The calibration hold-out of `vpdm train`: every detector is fitted on the rest (one split for all).
        from vpdm.decision.calibration import holdout_index, subset

        fraction = cfg.train.calibration_fraction
        keep, held_index = holdout_index(train.dataset.samples, fraction, cfg.train.seed)
        fit = subset(train, keep) if held_index else train
        held = subset(train, held_index) if held_index else None
        held_cats = [s.category for s in held.dataset.samples] if held is not None else []
        n_train = len(train.features)
        del train  # fit and held hold their own copies
        doc["data"]["calibration"] = {
            "fraction": fraction,
            "seed": cfg.train.seed,
            "false_alarm_rate": cfg.calibration.false_alarm_rate,
            "held_out_images": len(held_index),
            "fit_images": len(fit.features),
            "per_class": {c: held_cats.count(c) for c in sorted(set(held_cats))},
        }
        if held is not None:
            self.log(
                f"calibration: {len(held_index)} train/good images held out (train.calibration_fraction="
                f"{fraction:g}); the detectors are fitted on the other {len(fit.features)}"
            )
        self._mark("after_features")

        # 2. VPDM, one unified model per preset -----------------------------------------------
        runs: dict[str, Any] = {}
        main_model = None
        for name in self.presets:
            pcfg = self.configs[name]
            self.log(f"training VPDM [{name}] {pcfg.train.epochs} epochs on {len(fit.features)} images ...")
            t0 = time.perf_counter()
            model, history = engine.fit(pcfg, fit, progress=self.progress)
            train_seconds = time.perf_counter() - t0
            statistics_note = ""
            if held is not None:  # as `vpdm train` calibrates: the term statistics first, from the held-out normals
                from vpdm.decision.calibration import refit_term_statistics

                statistics_note = refit_term_statistics(
                    model, pcfg, held.features, held_cats, list(fit.dataset.categories)
                )
                if statistics_note:
                    self.log(f"  [{name}] {statistics_note}")
            scores, maps, seconds = self._score_vpdm(model, pcfg.sampling, test.features, pcfg.scoring)
            metrics = self._metrics(scores, maps)
            decision = None
            if held is not None:
                held_scores, held_maps, _ = self._score_vpdm(model, pcfg.sampling, held.features, pcfg.scoring)
                decision = calibrated_decisions(
                    held_scores, held_maps, held_cats, scores, self.gt[0], self.gt[2], pcfg.calibration.false_alarm_rate
                )
                del held_maps
            runs[name] = {
                "metrics": metrics,
                "defect_sizes": self._defect_sizes(maps),
                "decision": decision,
                "term_statistics": statistics_note or "training images",
                "train_seconds": train_seconds,
                "train_ms_per_image_epoch": 1000 * train_seconds / (pcfg.train.epochs * len(fit.features)),
                "score_seconds": seconds,
                "sampling": dataclasses.asdict(pcfg.sampling),
                "history": [{k: v for k, v in h.items()} for h in history],
            }
            self.log(
                f"  [{name}] image AUROC {_pct(metrics['mean']['image_auroc'], 2)}  pixel AUROC "
                f"{_pct(metrics['mean']['pixel_auroc'], 2)}  (train {train_seconds:.0f}s, score {seconds:.0f}s)"
            )
            if self.args.diagnose and name in (self.main, "paper"):
                from vpdm.bench.diagnose import diagnose

                labels, masks, cats = self.gt
                diag = doc.setdefault("diagnostics", {})
                diag[name] = diagnose(
                    model,
                    pcfg,
                    fit,
                    test,
                    labels,
                    masks,
                    cats,
                    maps,
                    lambda sampling, scoring, m=model, x=test.features: self._score_vpdm(m, sampling, x, scoring)[:2],
                    self.log,
                    start_table=name == self.main,
                )
            if name == self.main:
                main_model, main_scores, main_maps = model, scores, maps
            else:
                del model
            del maps
        self._mark("after_training")
        doc["vpdm"] = runs[self.main]
        if len(self.presets) > 1:
            doc["presets_table"] = {
                name: {
                    "description": PRESET_DESCRIPTIONS[name],
                    "overrides": PRESETS[name],
                    "mean": r["metrics"]["mean"],
                    "decision_mean": None if r["decision"] is None else r["decision"]["mean"],
                    "train_seconds": r["train_seconds"],
                    "paper_mvtec_image_pixel_auroc": PAPER_TABLE3.get(name),
                }
                for name, r in runs.items()
            }
            doc["preset_runs"] = {name: r for name, r in runs.items() if name != self.main}

        # 3. baseline on the same features ----------------------------------------------------

        self.log(f"fitting PatchCore ({self.pc_config}) ...")
        t0 = time.perf_counter()
        pc = fit_baseline(self.pc_config, fit.features, device)
        fit_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        pc_raw = baseline_raw_maps(pc, test.features, cfg.train.batch_size)  # one search for every blur below
        pc_scores, pc_maps, pc_max = score_baseline_maps(pc_raw, self.map_size, cfg.scoring, cfg.train.batch_size)
        pc_seconds = time.perf_counter() - t0
        pc_decision = None
        if held is not None:  # the same quantile rule on the same held-out images, with PatchCore's own scores
            held_scores, held_maps, _ = self._score_baseline(pc, held.features)
            pc_decision = calibrated_decisions(
                held_scores, held_maps, held_cats, pc_scores, self.gt[0], self.gt[2], cfg.calibration.false_alarm_rate
            )
            del held_maps
        doc["baseline"] = {
            "name": "patchcore",
            "settings": pc.summary(),
            "fit_seconds": fit_seconds,
            "score_seconds": pc_seconds,
            "image_score": "max of the average-pooled map (scoring.pool_size), as VPDM",
            "metrics": self._metrics(pc_scores, pc_maps),
            "metrics_plain_max": self._metrics(pc_max, pc_maps),
            "defect_sizes": self._defect_sizes(pc_maps),
            "decision": pc_decision,
        }
        del pc_maps
        if cfg.scoring.blur_sigma != PATCHCORE_PUBLISHED_BLUR_SIGMA:
            own = dataclasses.replace(cfg.scoring, blur_sigma=PATCHCORE_PUBLISHED_BLUR_SIGMA)
            own_scores, own_maps, _ = score_baseline_maps(pc_raw, self.map_size, own, cfg.train.batch_size)
            doc["baseline"]["published_blur"] = {
                "blur_sigma": PATCHCORE_PUBLISHED_BLUR_SIGMA,
                "metrics": self._metrics(own_scores, own_maps),
                "defect_sizes": self._defect_sizes(own_maps),
            }
            del own_maps
        del pc_raw
        self.log(
            f"  PatchCore bank {pc.bank.shape[0]} (fit {fit_seconds:.0f}s): image AUROC "
            f"{_pct(doc['baseline']['metrics']['mean']['image_auroc'], 2)}  pixel AUROC "
            f"{_pct(doc['baseline']['metrics']['mean']['pixel_auroc'], 2)}"
        )
        self._mark("after_baseline")

        # 4. AUROC against sampler steps (main model) ------------------------------------------
        doc["steps"] = self._steps_table(main_model, test.features, main_scores, main_maps)
        del main_maps
        self._mark("after_steps")

        # 5. speed, same process ----------------------------------------------------------------
        doc["timing"] = self._timing(extractor, main_model, pc, test, runs[self.main], doc["steps"])
        self._mark("after_timing")

        # 6. sweep-readiness: a model-setting change reuses the cached features -------------------
        train_key = doc["data"]["train"]["cache_key"]
        del test, fit, held  # the proof reloads the train split; do not hold two copies
        doc["cache"] = self._cache_proof(extractor, train_key, n_train)

        doc["comparison"] = self._comparison(doc)
        doc["memory"] = {
            "peak_rss_mb": round(_peak_rss_mb(), 1),
            "peak_rss_mb_by_phase": self.memory,
            "cuda_peak_allocated_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            if device.type == "cuda"
            else None,
        }
        doc["total_seconds"] = time.perf_counter() - started
        return _clean(doc)

    # ---------------------------------------------------------------------------------------
    def _data_section(self, cfg, extractor, train, test, extracted: int) -> dict[str, Any]:
        def split(s) -> dict[str, Any]:
            per_class: dict[str, dict[str, int]] = {}
            for sample in s.dataset.samples:
                c = per_class.setdefault(sample.category, {"normal": 0, "anomalous": 0})
                c["anomalous" if sample.label else "normal"] += 1
            return {
                "images": len(s.features),
                "per_class": per_class,
                "cache_key": Path(s.cache_path).stem if s.cache_path else None,
                "cache_hit": s.cache_hit,
                "load_seconds": s.extract_seconds,
            }

        return {
            "spec": cfg.data.spec,
            "test_spec": cfg.data.test_spec,
            "classes": train.dataset.categories,
            "backbone_fingerprint": extractor.fingerprint(),
            "feature_shape": list(train.features.shape[1:]),
            "images_through_backbone": extracted,
            "train": split(train),
            "test": split(test),
        }

    def _metrics(self, scores: np.ndarray, maps: np.ndarray, index: np.ndarray | None = None) -> dict[str, Any]:
        """The one metric path for every detector and every row."""
        from vpdm.evaluation.metrics import compute_metrics

        labels, masks, cats = self.gt
        if index is not None:
            labels, masks, cats = labels[index], masks[index], [cats[i] for i in index]
        return compute_metrics(labels, scores, masks, maps, cats)

    def _defect_sizes(self, maps: np.ndarray) -> dict[str, Any]:
        """AUPRO and pixel recall per defect-size stratum (:func:`vpdm.evaluation.metrics.defect_size_metrics`): what
        a detector misses of small defects, which the full-image metrics hide behind the large ones."""
        from vpdm.evaluation.metrics import defect_size_metrics

        _, masks, cats = self.gt
        return defect_size_metrics(masks, maps, cats)

    def _score_vpdm(self, model, sampling, features: Tensor, scoring=None) -> tuple[np.ndarray, np.ndarray, float]:
        from vpdm.evaluation.evaluator import score_features

        t0 = time.perf_counter()
        scores, maps = score_features(
            model,
            features,
            sampling=sampling,
            scoring=scoring or self.config.scoring,
            map_size=self.map_size,
            batch_size=self.config.train.batch_size,
            progress=self.progress,
            precision=self.config.inference.precision,
        )
        return scores.numpy(), maps.numpy(), time.perf_counter() - t0

    def _baseline_batch(self, pc, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return baseline_batch(pc, features, self.map_size, self.config.scoring)

    def _score_baseline(self, pc, features: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return score_baseline(pc, features, self.map_size, self.config.scoring, self.config.train.batch_size)

    def _steps_table(self, model, features: Tensor, main_scores, main_maps) -> dict[str, Any]:
        labels, _, cats = self.gt
        subset = balanced_subset(labels, cats, self.args.steps_subset, self.main_config.sampling.seed)
        main = (self.main_config.sampling.sampler, self.main_config.sampling.num_steps)
        rows = []
        for sampler, steps in self.steps:
            sampling = dataclasses.replace(self.main_config.sampling, sampler=sampler, num_steps=steps)
            row: dict[str, Any] = {"sampler": sampler, "steps": steps, "accelerated_default": (sampler, steps) == main}
            if (sampler, steps) == main:
                scores, maps, seconds, n = main_scores, main_maps, None, len(features)
            elif steps <= self.args.subset_above:
                scores, maps, seconds = self._score_vpdm(model, sampling, features)
                n = len(features)
            else:
                self.log(f"steps table: {sampler} {steps} steps on {len(subset)} images ...")
                scores, maps, seconds = self._score_vpdm(model, sampling, features[torch.from_numpy(subset)])
                n = len(subset)
            if n == len(features):
                full = self._metrics(scores, maps)
                row["test"] = full["mean"]
                row["subset"] = self._metrics(scores[subset], maps[subset], subset)["mean"]
            else:
                row["test"] = None
                row["subset"] = self._metrics(scores, maps, subset)["mean"]
            row["score_seconds"] = seconds
            row["score_ms_per_image"] = None if seconds is None else 1000 * seconds / n
            rows.append(row)
            self.log(
                f"  {sampler:>4} {steps:>4} steps: subset image AUROC {_pct(row['subset']['image_auroc'], 2)}"
                + (f", test {_pct(row['test']['image_auroc'], 2)}" if row["test"] else "")
            )
        full_chain = [r for r in rows if r["steps"] == self.main_config.model.diffusion.num_timesteps]
        ref = next((r for r in full_chain if r["sampler"] == "ddpm"), full_chain[0] if full_chain else None)
        for row in rows:
            if ref is not None and row["subset"] and ref["subset"]:
                for key in ("image_auroc", "pixel_auroc"):
                    row[f"subset_{key}_minus_full_chain_pt"] = 100 * (row["subset"][key] - ref["subset"][key])
        return {
            "subset_per_class": self.args.steps_subset,
            "subset_images": len(subset),
            "subset_index": subset.tolist(),
            "full_chain": None if ref is None else {"sampler": ref["sampler"], "steps": ref["steps"]},
            "rows": rows,
        }

    @torch.no_grad()
    def _timing(self, extractor, model, pc, test, main_run: dict[str, Any], steps: dict[str, Any]) -> dict[str, Any]:
        device, repeats = self.device, self.args.timing_repeats
        n = min(self.args.timing_images, len(test.dataset))
        picks = np.unique(np.linspace(0, len(test.dataset) - 1, n).round().astype(int))  # spread over the classes
        images = torch.stack([test.dataset[int(i)]["image"] for i in picks]).to(device)
        n = len(picks)
        model = model.to(device).eval()
        cfg = self.main_config
        self.log(f"timing on a batch of {n} images, {torch.get_num_threads()} thread(s), {repeats} repeat(s) ...")

        def vpdm_score(features: Tensor, sampling, m=model) -> Tensor:
            return m.detect(features, sampling, cfg.scoring, self.map_size, precision=cfg.inference.precision)[0]

        features = extractor(images)
        accel = cfg.sampling
        short = [(r["sampler"], r["steps"]) for r in steps["rows"] if r["steps"] <= self.args.subset_above]
        fns: dict[str, Callable[[], Any]] = {
            "backbone": lambda: extractor(images),
            "vpdm_end_to_end": lambda: vpdm_score(extractor(images), accel),
            "baseline_model": lambda: self._baseline_batch(pc, features),
            "baseline_end_to_end": lambda: self._baseline_batch(pc, extractor(images)),
        }
        for sampler, n_steps in short:
            sampling = dataclasses.replace(accel, sampler=sampler, num_steps=n_steps)
            fns[f"vpdm_model:{sampler}:{n_steps}"] = lambda s=sampling: vpdm_score(features, s)
        if (accel.sampler, accel.num_steps) not in short:
            fns[f"vpdm_model:{accel.sampler}:{accel.num_steps}"] = lambda: vpdm_score(features, accel)
        from vpdm.model.vpdm_model import VPDM

        for width in self.time_widths:
            wcfg = cfg.with_overrides({"model.denoiser.width": width}).validate()
            other = VPDM(model.channels, model.feature_size, wcfg.model).to(device).eval()
            other.load_state_dict(
                {k: v for k, v in model.state_dict().items() if not k.startswith("denoiser.")}, strict=False
            )
            for sampler, n_steps in short:
                sampling = dataclasses.replace(accel, sampler=sampler, num_steps=n_steps)
                fns[f"width{width}:{sampler}:{n_steps}"] = lambda s=sampling, m=other: vpdm_score(features, s, m)

        onnx = self._onnx_runtime(model, images, fns) if getattr(self.args, "onnx", False) else None

        timed = time_interleaved(fns, device, repeats)

        def per_image(name: str, stat: str = "min") -> float:
            return 1000 * timed[name][stat] / n

        out: dict[str, Any] = {
            "batch_images": n,
            "repeats": repeats,
            "threads": torch.get_num_threads(),
            "device": str(device),
            "statistic": "min over interleaved rounds (median beside)",
            "raw_seconds": {k: v["all"] for k, v in timed.items()},
        }
        out["backbone_ms_per_image"] = b = per_image("backbone")
        out["backbone_ms_per_image_median"] = per_image("backbone", "median")
        out["accelerated_sampler"] = {"sampler": accel.sampler, "steps": accel.num_steps}
        out["vpdm_model_ms_per_image"] = per_image(f"vpdm_model:{accel.sampler}:{accel.num_steps}")
        out["vpdm_end_to_end_ms_per_image"] = e2e = per_image("vpdm_end_to_end")
        out["vpdm_end_to_end_ms_per_image_median"] = per_image("vpdm_end_to_end", "median")
        # model-only time against steps (the short chains of the steps table), for the speed/accuracy trade-off
        per_steps = []
        for sampler, n_steps in short:
            ms = per_image(f"vpdm_model:{sampler}:{n_steps}")
            per_steps.append(
                {
                    "sampler": sampler,
                    "steps": n_steps,
                    "model_ms_per_image": ms,
                    "end_to_end_over_backbone": (b + ms) / b,
                }
            )
        out["vpdm_model_ms_per_image_by_steps"] = per_steps
        # full chain: measured in the steps table (scoring batch), and extrapolated from the per-step cost
        full = steps.get("full_chain")
        if full is not None:
            row = next(r for r in steps["rows"] if (r["sampler"], r["steps"]) == (full["sampler"], full["steps"]))
            measured = row["score_ms_per_image"]
            out["full_chain"] = {
                "sampler": full["sampler"],
                "steps": full["steps"],
                "model_ms_per_image_measured": measured,
                "note": "measured once while scoring the steps-table images (batch "
                f"{self.config.train.batch_size}), includes upsampling and blur",
            }
            if measured is not None:
                out["full_chain"]["end_to_end_over_backbone"] = (b + measured) / b
        if len({r["steps"] for r in per_steps}) >= 2:
            x = np.array([r["steps"] for r in per_steps], dtype=float)
            y = np.array([r["model_ms_per_image"] for r in per_steps])
            slope, intercept = np.polyfit(x, y, 1)
            out["denoiser_step_ms_per_image"] = float(slope)
            out["fixed_ms_per_image"] = float(intercept)
            t_full = cfg.model.diffusion.num_timesteps
            out["full_chain_model_ms_per_image_extrapolated"] = float(intercept + slope * t_full)
        if self.time_widths:
            out["untrained_width_model_ms_per_image_by_steps"] = {
                str(w): [
                    {
                        "sampler": sm,
                        "steps": st,
                        "model_ms_per_image": per_image(f"width{w}:{sm}:{st}"),
                        "end_to_end_over_backbone": (b + per_image(f"width{w}:{sm}:{st}")) / b,
                    }
                    for sm, st in short
                ]
                for w in self.time_widths
            }
        out["baseline_model_ms_per_image"] = per_image("baseline_model")
        out["baseline_end_to_end_ms_per_image"] = pc_e2e = per_image("baseline_end_to_end")
        out["train_ms_per_image_epoch"] = main_run["train_ms_per_image_epoch"]
        out["ratios"] = {
            "vpdm_end_to_end_over_backbone": e2e / b,
            "vpdm_model_over_backbone": out["vpdm_model_ms_per_image"] / b,
            "vpdm_full_chain_end_to_end_over_backbone": out.get("full_chain", {}).get("end_to_end_over_backbone"),
            "baseline_end_to_end_over_backbone": pc_e2e / b,
            "train_image_epoch_over_backbone": main_run["train_ms_per_image_epoch"] / b,
        }
        if onnx is not None:
            onnx["end_to_end_ms_per_image"] = ort_ms = per_image("onnxruntime_end_to_end")
            onnx["end_to_end_ms_per_image_median"] = per_image("onnxruntime_end_to_end", "median")
            onnx["torch_end_to_end_ms_per_image"] = e2e
            onnx["torch_over_onnxruntime"] = e2e / ort_ms
            out["onnxruntime"] = onnx
            self.log(
                f"  ONNX Runtime end-to-end {ort_ms:.1f} ms/img against torch {e2e:.1f} (same images; scores and "
                f"maps within {onnx['parity_relative_difference']:.1e} of the map range)"
            )
        self.log(
            f"  backbone {b:.1f} ms/img; VPDM end-to-end {e2e:.1f} ms/img ({e2e / b:.2f}x backbone, "
            f"{accel.sampler} {accel.num_steps} steps); PatchCore end-to-end {pc_e2e:.1f} ms/img ({pc_e2e / b:.2f}x)"
        )
        return out

    def _onnx_runtime(self, model, images: Tensor, fns: dict[str, Callable[[], Any]]) -> dict[str, Any]:
        """Export the main model's detector (score and map outputs) and add ONNX Runtime on the timing
        images to ``fns``, beside torch's ``vpdm_end_to_end``; returns the export's facts and the parity."""
        import copy
        import tempfile

        from vpdm.deploy.export import PARITY_TOLERANCE, export_onnx, relative_difference
        from vpdm.deploy.runtimes import OnnxDetector
        from vpdm.inference.detector import Detector

        detector = Detector(copy.deepcopy(model).cpu(), self.main_config)
        threads = torch.get_num_threads()
        with tempfile.TemporaryDirectory(prefix="vpdm-bench-onnx-") as tmp:
            start = time.perf_counter()
            result = export_onnx(detector, Path(tmp) / "model.onnx", check=False)
            seconds = time.perf_counter() - start
            runtime = OnnxDetector(result.path, threads=threads)  # the session holds the graph; the file may go
        x = images.cpu()
        array = x.numpy()
        got = runtime.run(x)
        parity = relative_difference(detector.score_tensor(x), (got["score"], got["anomaly_map"]))
        fns["onnxruntime_end_to_end"] = lambda: runtime.session.run(None, {"images": array})
        return {
            "export_seconds": seconds,
            "bytes": result.bytes,
            "opset": result.opset,
            "threads": threads,
            "outputs": list(result.outputs),
            "parity_relative_difference": parity,
            "parity_tolerance": PARITY_TOLERANCE,
            "note": "ONNX Runtime (CPU) on the graph of `vpdm export` without thresholds (score and map), "
            "interleaved with torch's VPDM end to end on the same images",
        }

    def _cache_proof(self, extractor, train_key: str | None, n_train: int) -> dict[str, Any]:
        from vpdm.features.backbone import total_images_seen
        from vpdm.training import engine

        k = self.main_config.model.prototypes.num_prototypes
        changed = {
            "model.prototypes.num_prototypes": k + 1,
            "model.ot_weight": self.main_config.model.ot_weight + 0.5,
            "model.denoiser.width": self.main_config.model.denoiser.width * 2,
        }
        cfg = self.main_config.with_overrides(changed).validate()
        seen = total_images_seen()
        again = engine.load_split(cfg, "train", extractor, progress=False)
        key = Path(again.cache_path).stem if again.cache_path else None
        proof = {
            "changed_settings": changed,
            "cache_hit": again.cache_hit,
            "same_cache_key": key == train_key and key is not None,
            "images_through_backbone": total_images_seen() - seen,
            "images_loaded": len(again.features),
            "expected_images": n_train,
            "load_seconds": again.extract_seconds,
        }
        self.log(
            f"cache proof: after changing {sorted(changed)} the train split loads with cache_hit="
            f"{again.cache_hit}, {proof['images_through_backbone']} images through the backbone"
        )
        return {"proof": proof}

    def _comparison(self, doc: dict[str, Any]) -> dict[str, Any]:
        v, p = doc["vpdm"]["metrics"]["mean"], doc["baseline"]["metrics"]["mean"]
        comp: dict[str, Any] = {
            k: {
                "vpdm": v[k],
                "baseline": p[k],
                "delta_pt": None if v[k] is None or p[k] is None else 100 * (v[k] - p[k]),
            }
            for k in METRICS
        }
        ratio = doc["timing"]["ratios"]["vpdm_end_to_end_over_backbone"]
        accel = next((r for r in doc["steps"]["rows"] if r["accelerated_default"]), None)
        gap = None if accel is None else accel.get("subset_image_auroc_minus_full_chain_pt")
        targets = {
            "vpdm_image_auroc_at_least_baseline": _ge(v["image_auroc"], p["image_auroc"]),
            "vpdm_pixel_auroc_at_least_baseline": _ge(v["pixel_auroc"], p["pixel_auroc"]),
            "end_to_end_at_most_2x_backbone": ratio <= 2.0,
            "accelerated_within_0.5pt_of_full_chain": None if gap is None else gap >= -0.5,
            "cache_hit_after_model_change": bool(doc["cache"]["proof"]["cache_hit"])
            and doc["cache"]["proof"]["images_through_backbone"] == 0,
        }
        # the fewest steps that would meet both speed and accuracy targets, from the measured rows
        b = doc["timing"]["backbone_ms_per_image"]
        candidates = []
        by_steps = {(r["sampler"], r["steps"]): r for r in doc["timing"]["vpdm_model_ms_per_image_by_steps"]}
        for row in doc["steps"]["rows"]:
            t = by_steps.get((row["sampler"], row["steps"]))
            g = row.get("subset_image_auroc_minus_full_chain_pt")
            if t is not None and t["end_to_end_over_backbone"] <= 2.0 and (g is None or g >= -0.5):
                candidates.append(
                    {
                        "sampler": row["sampler"],
                        "steps": row["steps"],
                        "end_to_end_over_backbone": t["end_to_end_over_backbone"],
                        "subset_image_auroc_minus_full_chain_pt": g,
                    }
                )
        return {
            "means": comp,
            "targets": targets,
            "accelerated_gap_to_full_chain_pt": gap,
            "step_settings_meeting_speed_and_accuracy": candidates,
            "backbone_ms_per_image": b,
        }


def _ge(a: float | None, b: float | None) -> bool | None:
    if a is None or b is None or (isinstance(a, float) and math.isnan(a)) or (isinstance(b, float) and math.isnan(b)):
        return None
    return a >= b
