"""``vpdm predict``: scores, maps and decisions of a folder of images, streamed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vpdm.cli.common import command_device, inference_override_args, warn_settings
from vpdm.errors import VPDMError


def cmd_predict(args: argparse.Namespace) -> int:
    from vpdm.config.schema import inference_overrides
    from vpdm.decision.postprocess import not_calibrated_message
    from vpdm.inference.checkpoint import checkpoint_calibration, load_checkpoint
    from vpdm.inference.detector import Detector, scan_images
    from vpdm.inference.scored import ScoredFolder, calibrated_overlay_scale, scored_outputs
    from vpdm.io import staged_outputs
    from vpdm.training.preflight import check_predict

    if args.config:
        raise VPDMError("predict takes its settings from the checkpoint; use --set to change sampling or scoring")
    scan = scan_images(args.images)  # every file that will not be scored is named in scores.csv
    model, config, payload = load_checkpoint(args.checkpoint)
    calibration = checkpoint_calibration(payload, args.checkpoint)
    config = inference_overrides(config, inference_override_args(args), "predict").validate()
    config, device = command_device(args, config)
    out = Path(args.output)
    detector = Detector(
        model, config, payload.get("categories"), device=device, calibration=calibration, checkpoint=args.checkpoint
    )
    post = detector.postprocessor(args.image_threshold, args.pixel_threshold)  # one threshold alone: refused
    if args.category is not None:
        post.category(None, [args.category], 1)  # an unknown class fails here, before any image
    overlays = not args.no_overlays
    outputs = scored_outputs(out, overlays=overlays, masks=post.ready)
    # before the first image: not inside --images, not over a previous run unless --overwrite, writable
    check_predict(config, outputs=outputs, inputs=[args.images, args.checkpoint], overwrite=args.overwrite)
    if not post.ready:
        print(f"note: no decisions (pred_* columns empty): {not_calibrated_message(args.checkpoint)}", file=sys.stderr)
    warn_settings(calibration, config)
    progress = not args.no_progress

    def predictions():
        return detector.iter_predictions(
            scan.files, batch_size=args.batch_size, progress=progress, category=args.category, postprocessor=post
        )

    vmax = calibrated_overlay_scale(calibration) if overlays else None
    if overlays and vmax is None:  # no calibrated range: one pass for the run's highest map value first
        print("overlay colour scale: no calibration, so a first scoring pass finds this run's highest map value")
        vmax = max((float(p.anomaly_map.max()) for p in predictions() if p.anomaly_map is not None), default=0.0)
        vmax = vmax if vmax > 0 else None
    from vpdm.data.dataset import AnomalyDataset
    from vpdm.data.layouts import Sample

    size = detector.map_size
    with staged_outputs(outputs, overwrite=args.overwrite) as staged:
        folder = ScoredFolder(out, staged, vmax=vmax)
        try:
            for r in predictions():
                path = Path(r.path)

                def rgb(_path: Path = path):
                    return AnomalyDataset([Sample(_path, None, 0, "predict", "unknown")], image_size=size).raw_image(0)

                folder.add(
                    r.path,
                    path.relative_to(scan.root),
                    score=r.score,
                    anomaly_map=r.anomaly_map,
                    rgb=rgb,
                    category=r.category,
                    pred_score=r.pred_score,
                    pred_label=r.pred_label,
                    pred_mask=r.pred_mask,
                    error=r.error,
                )
            for path, reason in scan.skipped:
                folder.add(str(path), path.relative_to(scan.root), error=reason, skipped=True)
            folder.close()
        except BaseException:
            folder.abort()
            raise
    decided = f", {folder.flagged} anomalous" if post.ready else ""
    failed = f", {folder.failed} failed (see error column)" if folder.failed else ""
    skipped = (
        f", {folder.skipped} not scored (not an image type vpdm reads, or a link it does not follow; see error column)"
        if folder.skipped
        else ""
    )
    print(f"scored {folder.scored} image(s){decided}{failed}{skipped} -> {out / 'scores.csv'}")
    if folder.output_failure:
        print(
            f"vpdm predict: error: {folder.output_failure}; every score is in {out / 'scores.csv'}, the rows "
            "without an overlay or mask say so",
            file=sys.stderr,
        )
        return 2
    return 0 if folder.scored else 1
