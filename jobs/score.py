"""Score a folder of images with a registered VPDM model.

    python jobs/score.py --model models:/vpdm-demo@champion --images incoming/ --output scored/ \
        [--tracking-uri sqlite:///mlflow.db] [--batch-size 16] [--device auto] [--no-overlays]

Pulls the model from the MLflow registry (``models:/NAME@alias``, ``models:/NAME/VERSION``,
``runs:/...`` or a local model folder), scores every image under ``--images`` (recursively) and
writes ``OUTPUT/scores.csv`` (``path,category,score,pred_score,pred_label,pred_mask,overlay,error``;
``path`` relative to ``--images``; the decision columns as in the model's answer, ``pred_mask`` the
path of a 0/255 mask PNG under ``OUTPUT/masks/``; empty when the model has no calibrated thresholds
and none are given) and one anomaly-map overlay PNG per scored image under ``OUTPUT/overlays/`` (all
on one colour scale: the calibrated range, else a first pass over the maps). Rows are written as each
batch is scored, so memory does not grow with the number of images (``vpdm.inference.scored``, shared with
``vpdm predict``). ``--image-threshold`` / ``--pixel-threshold`` override the calibrated thresholds.
Images that cannot be decoded get an ``error`` and do not stop the others; every other file under
``--images`` (not an image type vpdm reads, a broken link) gets a row saying why it was not scored.
An existing ``scores.csv``, ``overlays/`` or ``masks/`` is replaced only with ``--overwrite``, and
``--output`` may not be inside ``--images``.

Exit codes: 0 some images scored, 1 none could be scored, 2 bad input (missing folder, unknown
model/alias/version, unreachable tracking server, unwritable output).
"""

from __future__ import annotations

import sys
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

import argparse  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

EXIT_OK, EXIT_NONE_SCORED, EXIT_BAD_INPUT = 0, 1, 2


class UsageError(Exception):
    """Bad input that the user can fix; printed without a traceback, exit code 2."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="jobs/score.py", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        required=True,
        help="model URI, e.g. models:/vpdm-demo@champion or models:/vpdm-demo/3 (a sweep registers "
        "vpdm-DATASET unless given --model-name)",
    )
    p.add_argument("--images", required=True, help="image file or folder (searched recursively)")
    p.add_argument("--output", required=True, help="folder for scores.csv and overlays/")
    p.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--batch-size", type=int, default=16, help="images per predict call (default 16)")
    p.add_argument(
        "--device",
        default="auto",
        help="torch device of the backbone and the model: auto (default: cuda when available, else cpu), "
        "cpu, cuda or cuda:N",
    )
    p.add_argument("--no-overlays", action="store_true", help="write scores.csv only (no overlays, no masks)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the scores.csv, overlays/ and masks/ of a previous run in --output (as a whole)",
    )
    p.add_argument(
        "--image-threshold",
        type=float,
        help="raw image score above which an image is anomalous "
        "(default: the model's calibrated threshold of its class)",
    )
    p.add_argument(
        "--pixel-threshold",
        type=float,
        help="raw map value above which a pixel is in pred_mask (default: the calibrated one)",
    )
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    import math

    for name in ("image_threshold", "pixel_threshold"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            p.error(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    return args


def check_tracking_uri(uri: str) -> None:
    """Fail fast (instead of MLflow's minutes of retries) when the store is not there."""
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).close()
        except urllib.error.HTTPError:
            pass  # it answered: reachable (auth or routing is MLflow's to report)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UsageError(f"tracking server {uri} is unreachable: {reason}") from exc
    elif parsed.scheme == "sqlite":
        db = uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else ""
        if db and db != ":memory:" and not Path(db).is_file():
            raise UsageError(f"tracking store {uri}: database file {db!r} does not exist")
    elif parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme == "file" else uri)
        if not path.exists():
            raise UsageError(f"tracking store {uri}: folder {str(path)!r} does not exist")


def run(args: argparse.Namespace) -> int:
    # Cheap checks first: a typo should not cost the seconds it takes to import torch and mlflow.
    images = Path(args.images)
    if not images.exists():
        raise UsageError(f"image folder {str(images)!r} does not exist")
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        check_tracking_uri(uri)

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow
    import numpy as np
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from tune.mlflow_model import _encode_file, decode_image_bytes, load_detector_model
    from vpdm.errors import VPDMError
    from vpdm.inference.detector import scan_images
    from vpdm.inference.scored import ScoredFolder, calibrated_overlay_scale, scored_outputs
    from vpdm.io import check_outputs, staged_outputs, writable_dir
    from vpdm.runtime.device import select_device

    out = Path(args.output)
    try:
        device = select_device(args.device, what="--device")  # before the model is pulled: cuda without CUDA
        scan = scan_images(images)  # every file that will not be scored is named in scores.csv
        # the rule of every vpdm command: never into --images, nothing replaced unless --overwrite
        planned = scored_outputs(out, overlays=not args.no_overlays, masks=True)
        check_outputs(planned, inputs=[images], overwrite=args.overwrite, probe=False)
        writable_dir(out)
        check_outputs(planned, inputs=[images], overwrite=args.overwrite)
    except VPDMError as exc:
        raise UsageError(str(exc)) from exc

    if uri:
        mlflow.set_tracking_uri(uri)  # the registry follows unless MLFLOW_REGISTRY_URI says otherwise
    t0 = time.perf_counter()
    try:
        model = load_detector_model(args.model, model_config={"device": str(device), "batch_size": args.batch_size})
    except MlflowException as exc:
        raise UsageError(f"cannot load model {args.model!r}: {exc.message}") from exc
    except OSError as exc:  # e.g. a local model folder that is not there
        raise UsageError(f"cannot load model {args.model!r}: {exc}") from exc
    meta = model.metadata.metadata or {}
    map_size = int(meta.get("map_size") or 0)
    files = scan.files
    print(
        f"model {args.model} (model id {model.metadata.model_id or '-'}) loaded in {time.perf_counter() - t0:.1f}s "
        f"on {device}; scoring {len(files)} image(s)"
    )
    detector = getattr(model.unwrap_python_model(), "detector", None)
    calibration = getattr(detector, "calibration", None)
    decided = calibration is not None or (args.image_threshold is not None and args.pixel_threshold is not None)
    thresholds = {
        name: float(getattr(args, name))
        for name in ("image_threshold", "pixel_threshold")
        if getattr(args, name) is not None
    }

    def batches(anomaly_map: str):
        """(files, answer, read errors) per batch: the model's answer for one batch at a time."""
        for start in range(0, len(files), args.batch_size):
            chunk = files[start : start + args.batch_size]
            encoded, errors = [], {}
            for i, f in enumerate(chunk):
                try:
                    encoded.append(_encode_file(f))
                except VPDMError as exc:  # unreadable file: keep going
                    encoded.append("")
                    errors[i] = str(exc)
            try:
                result = model.predict(
                    pd.DataFrame({"image": pd.Series(encoded, dtype="object")}),
                    params={"anomaly_map": anomaly_map, **thresholds},
                )
            except MlflowException as exc:  # e.g. one threshold alone for a model without calibrated ones
                raise UsageError(exc.message) from exc
            yield chunk, result, errors

    overlays = not args.no_overlays
    vmax = calibrated_overlay_scale(calibration) if overlays else None
    if overlays and vmax is None:  # no calibrated range: one pass for the run's highest map value first
        print("overlay colour scale: no calibration, so a first scoring pass finds this run's highest map value")
        vmax = 0.0
        for _, result, _ in batches("full"):
            for amap in result["anomaly_map"]:
                if amap is not None:
                    vmax = max(vmax, float(np.max(amap)))
        vmax = vmax if vmax > 0 else None

    outputs = scored_outputs(out, overlays=overlays, masks=decided and overlays)
    root = scan.root
    scores: list[tuple[float, str]] = []  # (score, path): a float and a name per image, for the summary
    failures: list[tuple[str, str]] = []
    t1 = time.perf_counter()
    try:
        with staged_outputs(outputs, overwrite=args.overwrite) as staged:
            folder = ScoredFolder(out, staged, vmax=vmax)
            try:
                # full maps for the overlays (the model's default answer is a small map), none without them
                for chunk, result, errors in batches("none" if args.no_overlays else "full"):
                    for i, f in enumerate(chunk):
                        rel = f.relative_to(root)
                        score = float(result["score"].iloc[i])
                        error = errors.get(i) or result["error"].iloc[i]
                        error = None if error is None or (isinstance(error, float) and np.isnan(error)) else str(error)
                        if error:  # name the file rather than the row of the batch
                            error = error.replace(f"row {i}: ", "", 1)
                        amap = result["anomaly_map"].iloc[i]
                        pred_score = float(result["pred_score"].iloc[i])
                        mask = result["pred_mask"].iloc[i]
                        label, category = result["pred_label"].iloc[i], result["category"].iloc[i]
                        label = None if label is None or (isinstance(label, float) and np.isnan(label)) else int(label)
                        score_or_none = None if np.isnan(score) else score

                        def rgb(_f: Path = f, _amap: Any = amap) -> Any:
                            size = map_size or np.asarray(_amap).shape[0]
                            return decode_image_bytes(_f.read_bytes(), size, name=str(_f))

                        folder.add(
                            str(rel),
                            rel,
                            score=score_or_none,
                            anomaly_map=None if amap is None else np.asarray(amap, dtype=np.float64),
                            rgb=rgb,
                            category=category if isinstance(category, str) else "",
                            pred_score=None if np.isnan(pred_score) else pred_score,
                            pred_label=label,
                            pred_mask=None if mask is None or not overlays else np.asarray(mask, dtype=bool),
                            error=error,
                        )
                        if score_or_none is not None:
                            scores.append((score_or_none, str(rel)))
                        elif error:
                            failures.append((str(rel), error))
                for path, reason in scan.skipped:
                    folder.add(str(path.relative_to(root)), path.relative_to(root), error=reason, skipped=True)
                folder.close()
            except BaseException:
                folder.abort()
                raise
    except VPDMError as exc:  # disk full or folder gone mid-run: exit 2 naming the file
        raise UsageError(str(exc)) from exc
    elapsed = time.perf_counter() - t1

    flagged = f", {folder.flagged} anomalous" if decided and folder.scored else ""
    skipped = f", {folder.skipped} not scored (see error column)" if folder.skipped else ""
    print(
        f"scored {folder.scored} image(s) in {elapsed:.1f}s{flagged}"
        + (f", {folder.failed} failed (see error column)" if folder.failed else "")
        + skipped
    )
    if folder.scored and not decided:
        print(
            "no decisions: the model has no calibrated thresholds (calibrate its checkpoint with 'vpdm calibrate' "
            "and log it again, or pass --image-threshold and --pixel-threshold)"
        )
    if scores:
        s = np.array([v for v, _ in scores])
        print(f"scores: min {s.min():.4f}  median {np.median(s):.4f}  max {s.max():.4f}")
        for value, path in sorted(scores, key=lambda r: -r[0])[:5]:
            print(f"  {value:.4f}  {path}")
    for path, error in failures:
        print(f"  failed: {path}: {error}")
    print(f"-> {out / 'scores.csv'}" + ("" if args.no_overlays or not folder.scored else f", {out / 'overlays'}/"))
    if folder.output_failure:
        raise UsageError(
            f"{folder.output_failure}; every score is in {out / 'scores.csv'}, the rows without an "
            "overlay or mask say so"
        )
    return EXIT_OK if folder.scored else EXIT_NONE_SCORED


def main(argv: list[str] | None = None) -> int:
    from vpdm.runtime.allocator import keep_large_buffers

    args = parse_args(argv)
    keep_large_buffers()  # a fresh process's backbone otherwise maps its work buffers anew in every batch
    try:
        return run(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
