"""Two labelled halves of each class's test split, as MVTec-layout trees of symbolic links (nothing copied).

    python benchmarks/split_test_halves.py --data-root ../shared/data --output /tmp/halves \
        mvtec_ad/bottle mpdd/metal_plate mvtec_loco/juice_bottle magnetic_tile/magnetic_tile bsdata/ball_screw_drive

For each category folder, ``<output>/h0/<category>`` and ``<output>/h1/<category>`` link everything but ``test/``
(``train/``, ``ground_truth/``, ...) to the original, and ``test/<defect>/`` holds alternate files of the original
folder (sorted names; even positions in h0, odd in h1), so one half can choose settings on labelled defects
(``vpdm calibrate --val-data``) and the other measure them (``vpdm evaluate --data``), with the same class names
as the original spec kinds give (EXPERIMENTS #136).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="folder the category paths are relative to")
    p.add_argument("--output", required=True, help="new folder for h0/ and h1/ (must not exist)")
    p.add_argument("categories", nargs="+", help="category folders (MVTec layout) under --data-root")
    args = p.parse_args(argv)
    root, out = Path(args.data_root).resolve(), Path(args.output)
    if out.exists():
        p.error(f"--output {str(out)!r} exists; give a new folder")
    for rel in args.categories:
        if not (root / rel / "test").is_dir():
            p.error(f"{str(root / rel)!r} has no test/ folder (expected an MVTec-layout category)")
    for rel in args.categories:
        for half in (0, 1):
            target = out / f"h{half}" / rel
            target.mkdir(parents=True)
            for name in os.listdir(root / rel):
                if name != "test":
                    os.symlink(root / rel / name, target / name)
            for defect in sorted(os.listdir(root / rel / "test")):
                (target / "test" / defect).mkdir(parents=True)
                for f in sorted(os.listdir(root / rel / "test" / defect))[half::2]:
                    os.symlink(root / rel / "test" / defect / f, target / "test" / defect / f)
    print(f"halves written to {out / 'h0'} and {out / 'h1'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
