"""``vpdm evaluate``: the metrics of a checkpoint on a test split, its decisions and plots."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from vpdm.cli.common import cache_note, command_device, device_note, inference_override_args, warn_settings
from vpdm.errors import VPDMError
from vpdm.io import atomic_write_text, writing


def _decisions(result, calibration, *, image_threshold: float | None = None) -> dict[str, Any] | None:
    """Decision metrics at the calibrated (or given) image threshold of each test image's own class."""

    from vpdm.decision.postprocess import PostProcessor
    from vpdm.evaluation.metrics import decision_metrics

    if calibration is None and image_threshold is None:
        return None
    post = PostProcessor(calibration, image_threshold=image_threshold)
    thresholds = {c: post.image_threshold_for(c) for c in sorted(set(result.categories))}
    doc = decision_metrics(result.labels, post.image_labels(result.scores, result.categories), result.categories)
    doc["thresholds"] = thresholds
    return doc


def write_metrics(
    result,
    path: Path,
    config,
    *,
    calibration=None,
    checkpoint: str = "checkpoint",
    image_threshold: float | None = None,
    staged: Path | None = None,
) -> dict[str, Any]:
    """Print the metrics and write them to ``path`` (or into ``staged``, its temporary, that a caller commits)."""
    from vpdm.config.values import to_dict
    from vpdm.decision.postprocess import not_calibrated_message
    from vpdm.evaluation.evaluator import format_metrics

    decision = _decisions(result, calibration, image_threshold=image_threshold)
    if decision is not None:  # beside the threshold-free metrics, per class and in the mean
        for c, values in decision["per_class"].items():
            result.metrics["per_class"].setdefault(c, {}).update(values)
        result.metrics["mean"].update(decision["mean"])
    doc = {
        "metrics": _nan_to_none(result.metrics),
        "num_images": int(len(result.scores)),
        # Anomalous images without a mask (data.missing_masks=image_only): scored, but not in the pixel metrics.
        "pixel_metrics_left_out": len(result.pixel_left_out),
        "pixel_metrics_left_out_images": list(result.pixel_left_out),
        "seconds": result.seconds,
        "sampling": to_dict(config.sampling),
        "data": config.data.test_spec or config.data.spec,
        "decision": None
        if decision is None
        else {
            "image_thresholds": decision["thresholds"],
            "source": "--image-threshold" if image_threshold is not None else "calibrated",
            # how the calibrated thresholds were chosen: quantile (normal images), f1 or recall (labelled images)
            "method": None if calibration is None or image_threshold is not None else calibration.method,
            "calibration": None if calibration is None else calibration.describe(),
            "false_alarm_rate_target": None
            if calibration is None or calibration.method != "quantile"
            else calibration.false_alarm_rate,
            "target_recall": None if calibration is None else calibration.target_recall,
        },
    }
    print(format_metrics(result.metrics))
    if decision is None:
        print(f"no decision metrics: {not_calibrated_message(checkpoint)}")
    print(json.dumps(doc["metrics"]["mean"], indent=2))
    if result.pixel_left_out:
        print(
            f"{len(result.pixel_left_out)} anomalous image(s) without a mask left out of the pixel metrics "
            f"(data.missing_masks=image_only), e.g. {result.pixel_left_out[0]}"
        )
    notes = []
    for c in sorted(set(result.categories)):  # AUROC, AUPRO, AP and F1-max need normal and defect images of a class
        found = {int(x) for x, k in zip(result.labels, result.categories) if k == c}
        if len(found) < 2:
            kind, lacking = ("normal", "defect") if found == {0} else ("defective", "normal")
            notes.append(
                f"{c}: every test image is {kind} (no {lacking} image), so its image AUROC, pixel AUROC, "
                "AUPRO, pixel AP and F1-max are undefined (shown as -; left out of the mean)"
            )
    if notes:
        doc["notes"] = notes
        for note in notes:
            print(f"note: {note}")
    if staged is None:
        atomic_write_text(path, json.dumps(doc, indent=2), what="metrics")
    else:
        with writing(path, "metrics"):
            staged.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    print(f"metrics written to {path}")
    return doc


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def cmd_evaluate(args: argparse.Namespace) -> int:
    from vpdm.config.schema import inference_overrides
    from vpdm.evaluation import evaluator
    from vpdm.inference.checkpoint import load_checkpoint
    from vpdm.io import Output, staged_outputs
    from vpdm.training import engine
    from vpdm.training.preflight import check_evaluate

    if args.config:
        raise VPDMError("evaluate takes its settings from the checkpoint; use --set to change sampling or scoring")
    from vpdm.inference.checkpoint import checkpoint_calibration

    model, config, payload = load_checkpoint(args.checkpoint)
    calibration = checkpoint_calibration(payload, args.checkpoint)
    config = inference_overrides(config, inference_override_args(args), "evaluate")
    if args.data:
        config = config.with_overrides({"data.test_spec": args.data})
    config.validate()
    config, device = command_device(args, config)
    model.to(device)
    progress = not args.no_progress
    out = Path(args.output) if args.output else Path(args.checkpoint).with_name("metrics.json")
    plots = Path(args.plots) if args.plots else None
    outputs = [Output(out, "metrics")] + ([Output(plots, "plots folder", folder=True)] if plots else [])
    # test split (decoded), outputs (never the checkpoint or the data, not there unless --overwrite): before any image
    plan = check_evaluate(config, outputs=outputs, inputs=[args.checkpoint], overwrite=args.overwrite)
    print(device_note(device, config))
    test = engine.load_split(config, "test", progress=progress, samples=plan.samples["test"], device=device)
    print(f"test: {len(test.features)} images, features {cache_note(test)}")
    result = evaluator.evaluate(model, config, test, progress=progress)
    warn_settings(calibration, config)
    with staged_outputs(outputs, overwrite=args.overwrite) as staged:
        write_metrics(
            result,
            out,
            config,
            calibration=calibration,
            checkpoint=args.checkpoint,
            image_threshold=args.image_threshold,
            staged=staged[out],
        )
        if plots is not None:
            _write_plots(result, test, staged[plots], calibration, shown=plots)
    if plots is not None:
        print(f"plots written to {plots}")
    return 0


def _write_plots(result, test, folder: Path, calibration, *, shown: Path) -> None:
    """ROC curves and a few overlays per class into ``folder`` (``shown``: the name in messages), on one colour
    scale: the calibrated range, else the highest map value of the test images."""
    from vpdm.evaluation.plots import save_overlay, save_roc_curves
    from vpdm.inference.scored import calibrated_overlay_scale

    per_class = {
        c: (result.labels[[x == c for x in result.categories]], result.scores[[x == c for x in result.categories]])
        for c in sorted(set(result.categories))
    }
    with writing(shown / "roc.png", "plot"):
        save_roc_curves(per_class, folder / "roc.png")
    vmax = calibrated_overlay_scale(calibration) or float(result.maps.max()) or None
    for c in sorted(set(result.categories)):
        idx = [i for i, x in enumerate(result.categories) if x == c]
        picks = [i for i in idx if result.labels[i] == 1][:3] + [i for i in idx if result.labels[i] == 0][:1]
        for i in picks:
            s = test.dataset.samples[i]
            name = f"{c.replace('/', '_')}_{s.defect}_{s.image_path.stem}.png"
            with writing(shown / name, "plot"):
                save_overlay(
                    test.dataset.raw_image(i),
                    result.maps[i],
                    folder / name,
                    mask=result.masks[i],
                    score=float(result.scores[i]),
                    vmax=vmax,
                )
