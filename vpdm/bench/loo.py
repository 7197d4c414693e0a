"""Which setting would each category have chosen? ``python -m vpdm.bench.loo RESULTS.jsonl ...``

Reads the JSON lines of ``python -m vpdm.bench.screen --json`` (one line per trained model and
scoring variant), groups them by setting (the overrides and the variant, without ``train.seed``),
averages each setting over its seeds, and prints three views:

* the per-category table of every setting (image / pixel AUROC, mean over its seeds);
* the adoption rule against the reference setting (``--reference``, default: the first one read):
  a setting passes when no category loses more than ``--tolerance`` points of image or pixel AUROC
  and it was measured on at least ``--min-seeds`` seeds;
* the leave-one-category-out view: for each category, the setting that the *other* categories
  would pick (best mean image + pixel AUROC over them; ``--criterion`` adds AUPRO and pixel AP, which
  the rule does not see), and what the left-out category then scores against the reference. A
  default bought by one category shows up here as a choice that the others would not have made, or
  as a left-out category that loses.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vpdm.errors import ConfigError, VPDMError

KEYS = ("image_auroc", "pixel_auroc")  # the adoption rule's metrics
# What a criterion may choose by, with the names the tables give them.
METRIC_NAMES = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "AUPRO", "pixel_ap": "pixel AP"}
METRIC_KEYS = tuple(METRIC_NAMES)
BASELINE = "PatchCore"  # the screen's --baseline rows: shown for comparison, never chosen


def setting_key(row: dict[str, Any]) -> tuple[str, int | None]:
    """(setting label, seed) of one screen line: its ``--label``, or the overrides except the data and
    the seed, then the preset, the variant, and whether only the condition was scored."""
    seed = row.get("seed")
    parts: list[str] = []
    for item in row.get("overrides") or []:
        key, _, value = item.partition("=")
        if key == "train.seed":
            seed = int(value) if seed is None else seed
        elif key not in ("data.spec", "backbone.name", "backbone.weights", "train.epochs"):
            parts.append(item)
    if row.get("label"):
        parts = [row["label"]]
        if row.get("variant"):
            parts.extend(row["variant"])
        return "; ".join(parts), (0 if seed is None else int(seed))
    if row.get("preset"):
        parts.insert(0, f"preset={row['preset']}")
    if row.get("variant"):
        parts.extend(row["variant"])
    if row.get("condition_only"):
        parts.append("[condition only]")
    return ("; ".join(parts) or "(default)"), (0 if seed is None else int(seed))


def read_rows(paths: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{path!r} is not a file; expected the JSON lines of vpdm.bench.screen --json")
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                row["metrics"]["per_class"]
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f"{path}:{n} is not a line of vpdm.bench.screen --json") from None
            rows.append(row)
    if not rows:
        raise ConfigError(f"no screen results in {', '.join(paths)}")
    return rows


def aggregate(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """setting -> {"seeds": [...], "per_class": {cat: {key: mean over seeds}}, "by_seed": {seed: per_class}}; the
    last line of a (setting, seed) pair wins (a rerun replaces the earlier one)."""
    by_seed: dict[str, dict[int, dict[str, Any]]] = {}
    for row in rows:
        label, seed = setting_key(row)
        by_seed.setdefault(label, {})[seed] = row["metrics"]["per_class"]
    return {
        label: {"seeds": sorted(seeds), "per_class": _mean_over(seeds, sorted(seeds)), "by_seed": seeds}
        for label, seeds in by_seed.items()
    }


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def check_criterion(settings: dict[str, dict[str, Any]], criterion: Sequence[str]) -> None:
    """Every metric of the criterion is known and was measured for every setting and category."""
    if not criterion:
        raise ConfigError(f"--criterion is empty; expected some of {', '.join(METRIC_KEYS)}")
    for key in criterion:
        if key not in METRIC_KEYS:
            raise ConfigError(f"--criterion {key!r} is not a metric the view knows; expected some of {METRIC_KEYS}")
        for label, s in settings.items():
            missing = [c for c, m in s["per_class"].items() if key not in m]
            if missing:
                raise ConfigError(f"--criterion {key!r}: setting {label!r} has no {key} for {missing[0]!r}")


def leave_one_out(
    settings: dict[str, dict[str, Any]], reference: str, criterion: Sequence[str] = KEYS
) -> list[dict[str, Any]]:
    """For each category: the setting the others pick (best mean of the ``criterion`` metrics, by default
    image + pixel AUROC, over the other categories, among settings measured on every category) and the
    left-out category's figures."""
    cats = sorted(set.intersection(*(set(s["per_class"]) for s in settings.values())))
    if len(cats) < 2:
        raise ConfigError("the leave-one-out view needs at least two categories measured by every setting")
    check_criterion(settings, criterion)
    out = []
    for held in cats:
        others = [c for c in cats if c != held]

        def merit(label: str, others: list[str] = others) -> float:
            pc = settings[label]["per_class"]
            return _mean([sum(pc[c][k] for k in criterion) / len(criterion) for c in others])

        chosen = max((label for label in settings if label != BASELINE), key=merit)
        pc, ref = settings[chosen]["per_class"][held], settings[reference]["per_class"][held]
        out.append(
            {
                "held_out": held,
                "chosen": chosen,
                "others_merit": merit(chosen),
                "held_out_image": pc["image_auroc"],
                "held_out_pixel": pc["pixel_auroc"],
                "reference_image": ref["image_auroc"],
                "reference_pixel": ref["pixel_auroc"],
                "held_out_criterion": {k: pc[k] for k in criterion},
                "reference_criterion": {k: ref[k] for k in criterion},
            }
        )
    return out


def adoption(
    settings: dict[str, dict[str, Any]], reference: str, tolerance: float, min_seeds: int
) -> dict[str, dict[str, Any]]:
    """Per setting: the worst per-category change (points) of image and pixel AUROC against the
    reference, and whether it passes the rule. Paired: both are averaged over the seeds both were measured
    on (a setting measured on seeds 0-2 is compared with the reference's seeds 0-2, not with its mean over
    more seeds), and only those seeds count towards ``min_seeds``."""
    ref_seeds = settings[reference].get("by_seed") or {}
    out = {}
    for label, s in settings.items():
        mine = s.get("by_seed") or {}
        common = sorted(set(mine) & set(ref_seeds))
        if common:
            pc, ref = _mean_over(mine, common), _mean_over(ref_seeds, common)
        else:  # no seed in common (or per-seed figures unknown): the means, and no seed counts
            pc, ref = s["per_class"], settings[reference]["per_class"]
        cats = [c for c in pc if c in ref and all(k in pc[c] and k in ref[c] for k in KEYS)]
        worst = {k: min(100 * (pc[c][k] - ref[c][k]) for c in cats) for k in KEYS}
        mean = {k: 100 * _mean([pc[c][k] - ref[c][k] for c in cats]) for k in KEYS}
        out[label] = {
            "worst_pt": worst,
            "mean_pt": mean,
            "seeds": len(common),
            "passes": len(common) >= min_seeds and min(worst.values()) >= -tolerance,
        }
    return out


def _mean_over(by_seed: dict[int, dict[str, Any]], seeds: list[int]) -> dict[str, dict[str, float]]:
    """Per category and metric, the mean over ``seeds`` of per-seed figures (metrics every seed has)."""
    cats = sorted(set.intersection(*(set(by_seed[s]) for s in seeds)))
    return {
        c: {
            k: sum(by_seed[s][c][k] for s in seeds) / len(seeds)
            for k in METRIC_KEYS
            if all(by_seed[s][c].get(k) is not None for s in seeds)
        }
        for c in cats
    }


def report(
    settings: dict[str, dict[str, Any]],
    reference: str,
    tolerance: float,
    min_seeds: int,
    criterion: Sequence[str] = KEYS,
) -> str:
    cats = sorted(set.intersection(*(set(s["per_class"]) for s in settings.values())))
    short = [c.split("/", 1)[-1] for c in cats]
    shown = list(KEYS) + [k for k in criterion if k not in KEYS]
    check_criterion(settings, criterion)
    names = " / ".join(METRIC_NAMES[k] for k in shown)
    lines = [
        f"## Per category ({names}, %, mean over seeds)",
        "",
        "| setting | seeds | mean | " + " | ".join(short) + " |",
        "|---|---|---|" + "---|" * len(cats),
    ]
    for label, s in settings.items():
        pc = s["per_class"]
        mean = "/".join(f"{100 * _mean([pc[c][k] for c in cats]):.1f}" for k in shown)
        cells = " | ".join("/".join(f"{100 * pc[c][k]:.1f}" for k in shown) for c in cats)
        lines.append(f"| {label} | {','.join(map(str, s['seeds']))} | {mean} | {cells} |")
    rule = adoption(settings, reference, tolerance, min_seeds)
    lines += [
        "",
        f"## Against the reference `{reference}` (points; rule: no category below -{tolerance:g} on image "
        f"or pixel AUROC, at least {min_seeds} seeds, each compared on the seeds both have)",
        "",
        "| setting | seeds paired | mean image / pixel | worst category image / pixel | passes |",
        "|---|---|---|---|---|",
    ]
    for label, r in rule.items():
        if label == reference:
            continue
        lines.append(
            f"| {label} | {r['seeds']} | {r['mean_pt']['image_auroc']:+.2f} / {r['mean_pt']['pixel_auroc']:+.2f} | "
            f"{r['worst_pt']['image_auroc']:+.2f} / {r['worst_pt']['pixel_auroc']:+.2f} | "
            f"{'yes' if r['passes'] else 'no'} |"
        )
    chooser = "mean image + pixel AUROC" if list(criterion) == list(KEYS) else f"the mean of {', '.join(criterion)}"
    lines += [
        "",
        f"## Leave one category out (the others choose by {chooser})",
        "",
        f"| left out | chosen by the others | left out: chosen {names} | left out: reference {names} |",
        "|---|---|---|---|",
    ]
    for r in leave_one_out(settings, reference, criterion):
        pc, ref = settings[r["chosen"]]["per_class"][r["held_out"]], settings[reference]["per_class"][r["held_out"]]
        lines.append(
            f"| {r['held_out']} | {r['chosen']} | {' / '.join(f'{100 * pc[k]:.1f}' for k in shown)} | "
            f"{' / '.join(f'{100 * ref[k]:.1f}' for k in shown)} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vpdm.bench.loo", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="JSON lines written by python -m vpdm.bench.screen --json")
    p.add_argument("--reference", help="the setting the others are compared with (default: the first read)")
    p.add_argument(
        "--only",
        action="append",
        default=[],
        help="keep only settings whose label contains this text (repeatable; the reference is always kept)",
    )
    p.add_argument("--tolerance", type=float, default=0.5, help="points a category may lose (default 0.5)")
    p.add_argument("--min-seeds", type=int, default=3, help="seeds a setting needs to pass (default 3)")
    p.add_argument(
        "--criterion",
        default=",".join(KEYS),
        help="comma-separated metrics the others choose by in the leave-one-out view, among "
        f"{', '.join(METRIC_KEYS)} (default: {','.join(KEYS)}, the adoption rule's)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = aggregate(read_rows(args.results))
        reference = args.reference or next((k for k in settings if k != BASELINE), None)
        if reference not in settings:
            raise ConfigError(f"--reference {reference!r} is not among the settings read: {sorted(settings)}")
        if args.only:
            settings = {
                k: v for k, v in settings.items() if k in (reference, BASELINE) or any(o in k for o in args.only)
            }
        criterion = [k.strip() for k in args.criterion.split(",") if k.strip()]
        print(report(settings, reference, args.tolerance, args.min_seeds, criterion))
        return 0
    except VPDMError as exc:
        print(f"vpdm.bench.loo: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
