"""``vpdm export``: a checkpoint as one ONNX / OpenVINO graph, checked against torch."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from vpdm.cli.common import warn_settings
from vpdm.errors import VPDMError


def cmd_export(args: argparse.Namespace) -> int:
    from vpdm.config.schema import inference_overrides
    from vpdm.decision.postprocess import not_calibrated_message
    from vpdm.deploy.export import PARITY_TOLERANCE, export_onnx, require_package, unsupported_settings
    from vpdm.inference.checkpoint import checkpoint_calibration, load_checkpoint
    from vpdm.inference.detector import Detector

    if args.config:
        raise VPDMError("export takes its settings from the checkpoint; use --set to change sampling or scoring")
    suffix = ".onnx" if args.format == "onnx" else ".xml"
    out = Path(args.output) if args.output else Path(args.checkpoint).with_suffix(suffix)
    if out.suffix.lower() != suffix:
        raise VPDMError(f"--output {str(out)!r}: an {args.format} export is written to a {suffix} file")
    targets = [out] if args.format == "onnx" else [out, out.with_suffix(".bin")]
    from vpdm.io import Output, check_outputs

    # before any work: the one rule of every command (never onto the checkpoint, nothing replaced unless --overwrite)
    check_outputs(
        [Output(t, f"{args.format} file") for t in targets], inputs=[args.checkpoint], overwrite=args.overwrite
    )
    require_package("onnx")
    runtime = "OpenVINO" if args.format == "openvino" else "ONNX Runtime"
    if args.format == "openvino":
        require_package("openvino")
    model, config, payload = load_checkpoint(args.checkpoint)
    calibration = checkpoint_calibration(payload, args.checkpoint)
    config = inference_overrides(config, args.overrides, "export").validate()
    problems = unsupported_settings(config)
    if problems:
        raise VPDMError("the export cannot do " + "; ".join(problems))
    detector = Detector(model, config, payload.get("categories"), calibration=calibration, checkpoint=args.checkpoint)
    post = detector.postprocessor(args.image_threshold, args.pixel_threshold)
    if not post.ready:  # a deployment graph without decisions would be a surprise: refuse, say how to get them
        raise VPDMError(f"{not_calibrated_message(args.checkpoint)} (the exported graph bakes the thresholds in)")
    warn_settings(calibration, config)
    start = time.perf_counter()
    result = export_onnx(
        detector,
        out,
        postprocessor=post,
        overwrite=args.overwrite,
        check=not args.no_check,
        source=f"vpdm export --checkpoint {args.checkpoint}",
        fmt=args.format,
    )
    check = (
        "not checked (--no-check)"
        if args.no_check
        else f"not checked ({runtime} is not installed)"
        if result.parity is None
        else f"{runtime} matches torch within {result.parity:.1e} of the map "
        f"range on random images (tolerance {PARITY_TOLERANCE:g})"
    )
    print(
        f"exported in {time.perf_counter() - start:.1f}s -> {' + '.join(map(str, result.files))} "
        f"({result.bytes / 1e6:.1f} MB, opset {result.opset}; outputs {', '.join(result.outputs)}); {check}"
    )
    return 0
