"""results.json and results.md of a benchmark run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

METRICS = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "image_f1_max")
DECISIONS = ("image_precision", "image_recall", "image_f1", "image_false_alarm_rate")


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python, tuples -> lists."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _pct(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.{digits}f}"


def _num(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _metric_table(per_class: dict[str, dict[str, Any]], mean: dict[str, Any], title: str) -> list[str]:
    lines = [f"| {title} | image AUROC | pixel AUROC | AUPRO | pixel AP | image F1-max |", "|---|---|---|---|---|---|"]
    for name, m in list(per_class.items()) + [("**mean**", mean)]:
        lines.append(f"| {name} | " + " | ".join(_pct(m.get(k)) for k in METRICS) + " |")
    return lines


def _size_table(doc: dict[str, Any]) -> list[str]:
    """AUPRO / pixel recall (at 1 % normal-pixel FPR) per defect-size stratum, every detector, mean over
    the classes that have regions of that size."""
    runs = [(f"VPDM `{doc['main_preset']}`", doc["vpdm"])]
    runs += [(f"VPDM `{n}`", r) for n, r in doc.get("preset_runs", {}).items()]
    runs += [("PatchCore", doc["baseline"])]
    own = doc["baseline"].get("published_blur")
    if own:
        runs += [(f"PatchCore (blur {own['blur_sigma']:g})", own)]
    runs = [(n, r["defect_sizes"]) for n, r in runs if r.get("defect_sizes")]
    if not runs:
        return []
    first = runs[0][1]
    lo, hi = (100 * b for b in first["bounds"])
    lines = [
        "",
        "## Defect sizes",
        "",
        f"AUPRO / pixel recall (%) by defect region area: small < {lo:g} % of the image, medium < {hi:g} %, "
        f"large above; recall at the threshold that passes {100 * first['recall_fpr']:g} % of each class's "
        "normal pixels. Mean over the classes with regions of that size.",
        "",
        "| stratum | regions | " + " | ".join(n for n, _ in runs) + " |",
        "|---|---|" + "---|" * len(runs),
    ]
    for name, row in first["mean"].items():
        cells = [f"{_pct(d['mean'][name]['aupro'])} / {_pct(d['mean'][name]['pixel_recall'])}" for _, d in runs]
        lines.append(f"| {name} | {row['regions']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| class: small / medium / large AUPRO | " + " | ".join(n for n, _ in runs) + " |",
        "|---|" + "---|" * len(runs),
    ]
    for cat in first["per_class"]:
        cells = [" / ".join(_pct(d["per_class"][cat][k]["aupro"]) for k in d["per_class"][cat]) for _, d in runs]
        lines.append(f"| {cat} | " + " | ".join(cells) + " |")
    # The stratum means weigh every class alike, however few regions it has: the regions per class say which
    # classes a mean rests on.
    lines += [
        "",
        "| class: small / medium / large pixel recall (regions) | " + " | ".join(n for n, _ in runs) + " |",
        "|---|" + "---|" * len(runs),
    ]
    for cat, strata in first["per_class"].items():
        counts = " / ".join(str(strata[k]["regions"]) for k in strata)
        cells = [" / ".join(_pct(d["per_class"][cat][k]["pixel_recall"]) for k in d["per_class"][cat]) for _, d in runs]
        lines.append(f"| {cat} ({counts}) | " + " | ".join(cells) + " |")
    return lines


def _published_blur_lines(doc: dict[str, Any]) -> list[str]:
    """PatchCore at its own published blur, beside the shared-post-processing row, where VPDM's blur differs."""
    own = doc["baseline"].get("published_blur")
    if not own:
        return []
    vpdm, pc = doc["vpdm"]["metrics"], own["metrics"]
    lines = [
        "",
        f"VPDM's blur (sigma {doc['config']['scoring']['blur_sigma']:g}) is not PatchCore's published one "
        f"(sigma {own['blur_sigma']:g}); PatchCore at its own blur, the same bank and image score:",
        "",
        f"| mean | VPDM `{doc['main_preset']}` | PatchCore (blur {own['blur_sigma']:g}) | VPDM - PatchCore (pt) |",
        "|---|---|---|---|",
    ]
    for k in METRICS:
        a, b = vpdm["mean"].get(k), pc["mean"].get(k)
        d = None if a is None or b is None or math.isnan(a) or math.isnan(b) else 100 * (a - b)
        lines.append(f"| {k} | {_pct(a)} | {_pct(b)} | {'-' if d is None else f'{d:+.1f}'} |")
    lines += [""] + _metric_table(pc["per_class"], pc["mean"], f"PatchCore (blur {own['blur_sigma']:g})")
    return lines


def _decision_table(doc: dict[str, Any]) -> list[str]:
    """Precision, recall, F1 and false-alarm rate at the calibrated thresholds, VPDM beside PatchCore."""
    cal = doc["data"].get("calibration") or {}
    v, p = doc["vpdm"].get("decision"), doc["baseline"].get("decision")
    lines = ["", "## Decisions at calibrated thresholds (%)", ""]
    if v is None or p is None:
        return lines + ["No decisions: no calibration images (`train.calibration_fraction=0`)."]
    lines += [
        f"As `vpdm train`: {cal['held_out_images']} train/good images held out (`train.calibration_fraction="
        f"{cal['fraction']}`, seed {cal['seed']}), the detectors fitted on the other {cal['fit_images']}; per class "
        f"the image threshold is the {1 - cal['false_alarm_rate']:g} quantile of each detector's own scores of the "
        "held-out images (their maximum when there are fewer than 1 / rate + 1 of them); an image is anomalous "
        "when its score is above it. On the test split:",
        "",
        f"| class | VPDM `{doc['main_preset']}` precision | recall | F1 | false alarm | PatchCore precision | recall | "
        "F1 | false alarm |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in list(v["per_class"]) + ["mean"]:
        a = v["mean"] if name == "mean" else v["per_class"][name]
        b = p["mean"] if name == "mean" else p["per_class"].get(name, {})
        label = "**mean**" if name == "mean" else name
        lines.append(
            f"| {label} | "
            + " | ".join(_pct(a.get(k)) for k in DECISIONS)
            + " | "
            + " | ".join(_pct(b.get(k)) for k in DECISIONS)
            + " |"
        )
    return lines


def _backbone_differences(doc: dict[str, Any]) -> list[str]:
    """Where a preset on its own would read other features than the run's (``paper``: 224 px, bilinear)."""
    notes = doc.get("preset_backbone_differences") or {}
    lines = []
    for name, diff in notes.items():
        settings = ", ".join(f"`backbone.{k}={v}`" for k, v in diff.items())
        lines += ["", f"Every preset is trained on these features; on its own `{name}` would use {settings}."]
    return lines


def to_markdown(doc: dict[str, Any]) -> str:
    cfg = doc["config"]
    ver = doc["versions"]
    t = doc["timing"]
    lines = [
        f"# VPDM benchmark: `{doc['data']['spec']}`",
        "",
        f"{doc['created']} · vpdm {ver['vpdm']} · torch {ver['torch']} · timm {ver['timm']} · python {ver['python']} · "
        f"{doc['machine']['device']}, {doc['machine']['torch_threads']} thread(s), {ver['cpu_count']} CPU(s)",
        "",
        f"Backbone `{cfg['backbone']['name']}` ({cfg['backbone']['weights']} weights) at "
        f"{cfg['backbone']['image_size']} px, stages brought to the feature size by "
        f"{cfg['backbone'].get('resize', 'bilinear')}, features "
        f"{' x '.join(str(s) for s in doc['data']['feature_shape'])}; "
        f"{doc['data']['train']['images']} train / {doc['data']['test']['images']} test images, "
        f"{len(doc['data']['classes'])} class(es); one unified model. VPDM: {cfg['train']['epochs']} epochs, "
        f"K={cfg['model']['prototypes']['num_prototypes']}, N={cfg['model']['prototypes']['downsample']}, "
        f"denoiser width {cfg['model']['denoiser']['width']}, scored with {cfg['sampling']['sampler']} "
        f"{cfg['sampling']['num_steps']} steps. Baseline: PatchCore, bank {doc['baseline']['settings']['bank_size']} "
        f"of {doc['baseline']['settings']['training_patches']} patches.",
        *_backbone_differences(doc),
        "",
        "## Detection (%)",
        "",
        "Both detectors go through the same upsampling, blur, image score (max of the "
        f"{cfg['scoring']['pool_size']}px average-pooled map) and metric code.",
        "",
    ]
    comp = doc["comparison"]["means"]
    others = doc.get("preset_runs", {})
    head = f"| mean | VPDM `{doc['main_preset']}` | " + "".join(f"VPDM `{n}` | " for n in others)
    lines += [
        head + "PatchCore | PatchCore (plain max) | VPDM - PatchCore (pt) |",
        "|---|---|" + "---|" * len(others) + "---|---|---|",
    ]
    plain = doc["baseline"]["metrics_plain_max"]["mean"]
    for k in METRICS:
        d = comp[k]["delta_pt"]
        extra = "".join(f"{_pct(r['metrics']['mean'][k])} | " for r in others.values())
        lines.append(
            f"| {k} | {_pct(comp[k]['vpdm'])} | {extra}{_pct(comp[k]['baseline'])} | {_pct(plain[k])} | "
            f"{'-' if d is None else f'{d:+.1f}'} |"
        )
    lines += _published_blur_lines(doc)
    lines += [""] + _metric_table(
        doc["vpdm"]["metrics"]["per_class"], doc["vpdm"]["metrics"]["mean"], f"VPDM `{doc['main_preset']}`"
    )
    for name, run in doc.get("preset_runs", {}).items():
        lines += [""] + _metric_table(run["metrics"]["per_class"], run["metrics"]["mean"], f"VPDM `{name}`")
    lines += [""] + _metric_table(
        doc["baseline"]["metrics"]["per_class"], doc["baseline"]["metrics"]["mean"], "PatchCore"
    )
    lines += _size_table(doc)
    lines += _decision_table(doc)

    r = t["ratios"]
    lines += [
        "",
        f"## Speed (ms per image, batch of {t['batch_images']}, {t['threads']} thread(s), "
        f"min of {t['repeats']} interleaved rounds)",
        "",
        "| what | ms / image | x backbone |",
        "|---|---|---|",
        f"| backbone only | {_num(t['backbone_ms_per_image'])} | 1.00 |",
        f"| VPDM end to end ({t['accelerated_sampler']['sampler']} {t['accelerated_sampler']['steps']} steps) | "
        f"{_num(t['vpdm_end_to_end_ms_per_image'])} | {_num(r['vpdm_end_to_end_over_backbone'], 2)} |",
        f"| VPDM model only (same sampler) | {_num(t['vpdm_model_ms_per_image'])} | {_num(r['vpdm_model_over_backbone'], 2)} |",
    ]
    fc = t.get("full_chain")
    if fc:
        lines.append(
            f"| VPDM model, full chain ({fc['sampler']} {fc['steps']} steps, measured) | "
            f"{_num(fc['model_ms_per_image_measured'])} | {_num(fc.get('end_to_end_over_backbone'), 1)} (end to end) |"
        )
    if "full_chain_model_ms_per_image_extrapolated" in t:
        lines.append(
            f"| VPDM model, {cfg['model']['diffusion']['num_timesteps']} steps (extrapolated: "
            f"{_num(t['fixed_ms_per_image'])} + {_num(t['denoiser_step_ms_per_image'], 2)} per step) | "
            f"{_num(t['full_chain_model_ms_per_image_extrapolated'])} | - |"
        )
    ort = t.get("onnxruntime")
    if ort:
        lines.append(
            f"| VPDM end to end, ONNX Runtime (same graph exported; scores and maps within "
            f"{ort['parity_relative_difference']:.1e} of the map range) | "
            f"{_num(ort['end_to_end_ms_per_image'])} | "
            f"{_num(ort['end_to_end_ms_per_image'] / t['backbone_ms_per_image'], 2)} |"
        )
    lines += [
        f"| PatchCore end to end | {_num(t['baseline_end_to_end_ms_per_image'])} | {_num(r['baseline_end_to_end_over_backbone'], 2)} |",
        f"| PatchCore model only | {_num(t['baseline_model_ms_per_image'])} | - |",
        f"| VPDM training (per image and epoch) | {_num(t['train_ms_per_image_epoch'])} | {_num(r['train_image_epoch_over_backbone'], 2)} |",
        "",
        f"Training {_num(doc['vpdm']['train_seconds'], 0)} s; PatchCore fit {_num(doc['baseline']['fit_seconds'], 0)} s; "
        f"whole run {_num(doc['total_seconds'], 0)} s. Peak RSS {_num(doc['memory']['peak_rss_mb'], 0)} MB"
        + (
            f", CUDA peak {doc['memory']['cuda_peak_allocated_mb']} MB"
            if doc["memory"].get("cuda_peak_allocated_mb")
            else ""
        )
        + f" (by phase: {', '.join(f'{k} {v:.0f}' for k, v in doc['memory']['peak_rss_mb_by_phase'].items())}).",
    ]

    widths = t.get("untrained_width_model_ms_per_image_by_steps")
    if widths:
        rows = next(iter(widths.values()))
        lines += [
            "",
            "Denoiser width against speed (untrained models of other widths, same chains; model ms / image, "
            "end to end x backbone):",
            "",
            "| width | " + " | ".join(f"{r['sampler']} {r['steps']}" for r in rows) + " |",
            "|---|" + "---|" * len(rows),
        ]
        own = {(r["sampler"], r["steps"]): r for r in t["vpdm_model_ms_per_image_by_steps"]}
        trained = f"{cfg['model']['denoiser']['width']} (trained)"
        table = {trained: [own.get((r["sampler"], r["steps"])) for r in rows], **widths}
        for w, vals in table.items():
            cells = [
                "-" if v is None else f"{v['model_ms_per_image']:.1f} ({v['end_to_end_over_backbone']:.2f}x)"
                for v in vals
            ]
            lines.append(f"| {w} | " + " | ".join(cells) + " |")

    st = doc["steps"]
    by_steps = {(x["sampler"], x["steps"]): x for x in t["vpdm_model_ms_per_image_by_steps"]}
    lines += [
        "",
        "## AUROC against sampler steps (%)",
        "",
        f"Subset: {st['subset_images']} test images ({st['subset_per_class'] or 'all'} per class, half normal / half "
        "anomalous where possible); every row is scored on it; chains short enough also on the whole test split.",
        "",
        "| sampler | steps | subset image AUROC | subset pixel AUROC | vs full chain (image, pt) | test image AUROC | "
        "test pixel AUROC | model ms / image | end to end x backbone |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in st["rows"]:
        tm = by_steps.get((row["sampler"], row["steps"]))
        ms = tm["model_ms_per_image"] if tm else row.get("score_ms_per_image")
        b = t["backbone_ms_per_image"]
        ratio = tm["end_to_end_over_backbone"] if tm else (None if ms is None else (b + ms) / b)
        g = row.get("subset_image_auroc_minus_full_chain_pt")
        name = f"**{row['sampler']}**" if row["accelerated_default"] else row["sampler"]
        lines.append(
            f"| {name} | {row['steps']} | {_pct(row['subset']['image_auroc'])} | {_pct(row['subset']['pixel_auroc'])} | "
            f"{'-' if g is None else f'{g:+.1f}'} | {_pct((row['test'] or {}).get('image_auroc'))} | "
            f"{_pct((row['test'] or {}).get('pixel_auroc'))} | {_num(ms)} | {_num(ratio, 2)} |"
        )

    if "presets_table" in doc:
        lines += [
            "",
            "## Presets (mean %, same features)",
            "",
            "| preset | what | image AUROC | pixel AUROC | AUPRO | pixel AP | train s | paper, MVTec-AD (image / pixel) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, a in doc["presets_table"].items():
            paper = a["paper_mvtec_image_pixel_auroc"]
            lines.append(
                f"| {name} | {a['description']} | {_pct(a['mean']['image_auroc'])} | {_pct(a['mean']['pixel_auroc'])} | "
                f"{_pct(a['mean']['aupro'])} | {_pct(a['mean']['pixel_ap'])} | {_num(a['train_seconds'], 0)} | "
                f"{'-' if paper is None else f'{paper[0]} / {paper[1]}'} |"
            )

    if doc.get("diagnostics"):
        from vpdm.bench.diagnose import markdown as diagnostics_markdown

        lines += ["", "## Diagnostics"] + diagnostics_markdown(doc["diagnostics"])

    proof = doc["cache"]["proof"]
    d = doc["data"]
    lines += [
        "",
        "## Feature cache",
        "",
        f"First load: train `{d['train']['cache_key']}` ({'hit' if d['train']['cache_hit'] else 'extracted'}), test "
        f"`{d['test']['cache_key']}` ({'hit' if d['test']['cache_hit'] else 'extracted'}); "
        f"{d['images_through_backbone']} images through the backbone. After changing "
        f"{', '.join(f'`{k}={v}`' for k, v in proof['changed_settings'].items())}: cache_hit={proof['cache_hit']}, "
        f"same key={proof['same_cache_key']}, {proof['images_through_backbone']} images through the backbone "
        f"({_num(proof['load_seconds'], 1)} s).",
        "",
        "## Targets",
        "",
    ]
    for key, ok in doc["comparison"]["targets"].items():
        lines.append(f"- {key.replace('_', ' ')}: {'n/a' if ok is None else ('**yes**' if ok else '**no**')}")
    meeting = doc["comparison"]["step_settings_meeting_speed_and_accuracy"]
    lines.append(
        "- sampler settings meeting both the speed and the accuracy target: "
        + (", ".join(f"{m['sampler']} {m['steps']}" for m in meeting) if meeting else "none measured")
    )
    return "\n".join(lines) + "\n"


def write_results(doc: dict[str, Any], output: Path) -> tuple[Path, Path]:
    output.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output / "results.json", output / "results.md"
    json_path.write_text(json.dumps(doc, indent=2) + "\n")
    md_path.write_text(to_markdown(doc))
    return json_path, md_path
