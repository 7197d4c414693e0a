"""Peak memory of ``vpdm predict`` against the number of images it scores (issue 23, item 7).

    python benchmarks/predict_memory.py                                 # 100 and 5,000 images
    python benchmarks/predict_memory.py --counts 100,1000 --threads 1   # a quicker look
    python benchmarks/predict_memory.py --repo ../other-checkout        # the same figures for another version

A model at the real image size (``--image-size``, random-init EfficientNet-Lite0, a small denoiser, 3
sampler steps: scoring speed matters here, not quality) is trained for one epoch on a small demo set.
Then, for each count N, ``vpdm predict`` runs in a fresh process on N copies (hard links) of the demo
test images, with overlays and masks, and its peak resident memory (the child's ``ru_maxrss`` from
``os.wait4``) is printed, with the ratio of the largest peak to the smallest. ``predict`` writes each
batch's rows and pictures before scoring the next, so the peaks should agree within 10 %.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = [
    "backbone.name=tf_efficientnet_lite0",
    "backbone.weights=none",
    "backbone.feature_size=8",
    "model.prototypes.num_prototypes=4",
    "model.prototypes.downsample=2",
    "model.diffusion.num_timesteps=50",
    "model.denoiser.width=16",
    "model.denoiser.groups=4",
    "sampling.num_steps=3",
    "train.batch_size=8",
    "scoring.pool_size=4",
    "scoring.blur_sigma=1.0",
]


def vpdm(repo: Path, args: list[str], threads: int) -> tuple[int, float, float]:
    """Run ``python -m vpdm.cli ARGS`` from ``repo``; (exit code, peak resident MiB, seconds)."""
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vpdm.cli", *args],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak, not the largest of all children
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"vpdm {' '.join(args[:1])} failed ({proc.returncode}):\n{out.decode(errors='replace')[-3000:]}")
    return proc.returncode, usage.ru_maxrss / 1024, time.perf_counter() - start


def image_folder(source: list[Path], n: int, folder: Path) -> Path:
    """``n`` images: hard links to ``source`` in turn (copies where links are refused), 500 to a sub-folder."""
    for i in range(n):
        src = source[i % len(source)]
        dst = folder / f"{i // 500:03d}" / f"{i:05d}{src.suffix}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            dst.write_bytes(src.read_bytes())
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--counts", default="100,5000", help="numbers of images, comma-separated (default 100,5000)")
    p.add_argument("--image-size", type=int, default=224, help="backbone.image_size of the model (default 224)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every run (default 2)")
    p.add_argument("--batch-size", type=int, default=16, help="predict --batch-size (default 16)")
    p.add_argument(
        "--repo",
        type=Path,
        default=Path(__file__).resolve().parents[1],
        help="the checkout whose vpdm runs (default: this one)",
    )
    p.add_argument("--work", type=Path, help="folder for the demo set, the model and the outputs (default: temporary)")
    args = p.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    if not counts or min(counts) < 1:
        p.error(f"--counts must be positive integers, got {args.counts!r}")
    with tempfile.TemporaryDirectory(prefix="vpdm-memory-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        settings = [
            a
            for s in [*SETTINGS, f"backbone.image_size={args.image_size}", f"train.threads={args.threads}"]
            for a in ("--set", s)
        ]
        demo = work / "demo"
        vpdm(
            args.repo,
            [
                "train",
                "--data",
                f"demo:{demo}",
                "--output",
                str(work / "run"),
                "--epochs",
                "1",
                "--no-progress",
                "--set",
                f"data.cache_dir={work / 'cache'}",
                *settings,
            ],
            args.threads,
        )
        source = sorted((demo).glob("*/test/*/*.png"))
        print(
            f"vpdm from {args.repo}; model at {args.image_size} px; {len(source)} demo test images copied; "
            f"{args.threads} thread(s), batch {args.batch_size}"
        )
        print("| images | peak resident memory (MiB) | seconds |\n|---:|---:|---:|")
        peaks = []
        for n in counts:
            images = image_folder(source, n, work / f"images-{n}")
            _, peak, seconds = vpdm(
                args.repo,
                [
                    "predict",
                    "--checkpoint",
                    str(work / "run" / "model.pt"),
                    "--images",
                    str(images),
                    "--output",
                    str(work / f"scored-{n}"),
                    "--no-progress",
                    "--batch-size",
                    str(args.batch_size),
                    "--set",
                    f"train.threads={args.threads}",
                ],
                args.threads,
            )
            peaks.append(peak)
            print(f"| {n} | {peak:.0f} | {seconds:.0f} |", flush=True)
        print(f"largest / smallest peak: {max(peaks) / min(peaks):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
