"""``--diagnose``: the numbers that explain a preset's result (see :mod:`vpdm.bench.diagnostics`).

Per class: how pure the condition is, the reconstruction error of normal test images, the x0 error
against t on held-out normal features, how much of each defect passes into the reconstruction; and
AUROC against where the reverse chain starts and how many steps it takes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from vpdm.bench import diagnostics
from vpdm.evaluation.metrics import compute_metrics

X0_TIMESTEPS = (50, 100, 250, 500, 750, 1000)
START_STEPS = (None, 750, 500, 250, 100)  # None = T, the paper's N(yhat, I)
START_NUM_STEPS = (1, 3)


def _class_index(names: list[str], categories: list[str]) -> torch.Tensor:
    return torch.tensor([categories.index(n) if n in categories else -1 for n in names], dtype=torch.long)


def diagnose(
    model,
    config,
    train,
    test,
    labels: np.ndarray,
    masks: np.ndarray,
    cats: list[str],
    maps: np.ndarray,
    score: Callable[[Any, Any], tuple[np.ndarray, np.ndarray]],
    log: Callable[[str], None],
    start_table: bool = True,
) -> dict[str, Any]:
    """Diagnostics of one trained preset; ``score(sampling, scoring)`` scores the whole test split."""
    categories = list(train.dataset.categories)
    normal = torch.from_numpy(labels == 0)
    test_class = _class_index(cats, categories)
    good, good_class = test.features[normal], test_class[normal]
    t_max = model.diffusion.num_timesteps
    out: dict[str, Any] = {
        "condition": diagnostics.condition_report(
            model, train.features, train.class_index, good, good_class, categories
        ),
        "normal_reconstruction_error": diagnostics.normal_reconstruction_error(
            model, good, config.sampling, config.scoring, good_class, categories
        ),
        "x0_mse_by_t": {
            str(t): v
            for t, v in diagnostics.x0_error_by_t(model, good, [t for t in X0_TIMESTEPS if t <= t_max]).items()
        },
        "leak": diagnostics.leak_report(maps, masks, labels, cats),
    }
    out["summary"] = {
        "purity": diagnostics.summarise(out["condition"], "purity"),
        "entropy_nats": diagnostics.summarise(out["condition"], "entropy_nats"),
        "top_weight": diagnostics.summarise(out["condition"], "top_weight"),
        "inside_over_outside": diagnostics.summarise(out["leak"], "inside_over_outside"),
    }
    log(
        f"  diagnostics: purity {out['summary']['purity']:.3f}, entropy {out['summary']['entropy_nats']:.2f} nats, "
        f"top weight {out['summary']['top_weight']:.2f}, defect/outside error {out['summary']['inside_over_outside']:.2f}; "
        f"x0 MSE by t {', '.join(f'{k}: {v:.3f}' for k, v in out['x0_mse_by_t'].items())}"
    )
    if start_table:
        rows = []
        starts = list(dict.fromkeys(None if st is None or st >= t_max else st for st in START_STEPS))
        for s in starts:
            for steps in START_NUM_STEPS:
                if steps > (s or t_max):
                    continue
                sampling = dataclasses.replace(config.sampling, start_step=s, num_steps=steps)
                scores, row_maps = score(sampling, config.scoring)
                metrics = compute_metrics(labels, scores, masks, row_maps, cats)["mean"]
                leak = diagnostics.leak_report(row_maps, masks, labels, cats)
                rows.append(
                    {
                        "start_step": s or t_max,
                        "num_steps": steps,
                        "sampler": sampling.sampler,
                        "metrics": metrics,
                        "inside_over_outside": diagnostics.summarise(leak, "inside_over_outside"),
                    }
                )
                log(
                    f"  start {s or t_max:>4} {steps} step(s): image AUROC {100 * metrics['image_auroc']:.1f}, pixel "
                    f"AUROC {100 * metrics['pixel_auroc']:.1f}, defect/outside {rows[-1]['inside_over_outside']:.2f}"
                )
        out["start_steps"] = rows
    return out


def markdown(diag: dict[str, dict[str, Any]]) -> list[str]:
    """Tables of the diagnostics of every diagnosed preset."""
    lines: list[str] = []
    for preset, d in diag.items():
        lines += [
            "",
            f"### Diagnostics: `{preset}`",
            "",
            "| class | purity | entropy (nats, of max) | top weight | prototypes owned | normal error (mean / p99) | "
            "defect / outside error |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, c in d["condition"].items():
            n = d["normal_reconstruction_error"].get(name, {})
            leak = d["leak"].get(name, {})
            lines.append(
                f"| {name} | {c['purity']:.3f} | {c['entropy_nats']:.2f} / {c['max_entropy_nats']:.2f} | "
                f"{c['top_weight']:.2f} | {c['prototypes_owned']} | {_f(n.get('mean'))} / {_f(n.get('p99'))} | "
                f"{_f(leak.get('inside_over_outside'), 2)} |"
            )
        x0 = d["x0_mse_by_t"]
        lines += [
            "",
            "x0-prediction MSE per value on normal test features (one denoiser call at t; t = 0 is the "
            "condition yhat itself): " + ", ".join(f"t={k}: {v:.3f}" for k, v in x0.items()),
        ]
        if d.get("start_steps"):
            lines += [
                "",
                "| start step | steps | image AUROC | pixel AUROC | AUPRO | defect / outside error |",
                "|---|---|---|---|---|---|",
            ]
            for r in d["start_steps"]:
                m = r["metrics"]
                lines.append(
                    f"| {r['start_step']} | {r['num_steps']} | {_p(m['image_auroc'])} | {_p(m['pixel_auroc'])} | "
                    f"{_p(m['aupro'])} | {_f(r['inside_over_outside'], 2)} |"
                )
    return lines


def _f(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _p(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"
