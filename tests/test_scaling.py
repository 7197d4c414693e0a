"""The scaling benchmark's code path on a tiny set, and the demo generator's classes beyond the named nine."""

import json

import numpy as np
import pytest

from tests.test_bench import TINY as BENCH_TINY
from vpdm.bench.scaling import main, parse_args, plan_runs
from vpdm.data.demo import DEMO_CLASSES, SMALL_DEFECTS, _defects_of, _demo_class_names, make_demo_dataset
from vpdm.errors import ConfigError

TINY = BENCH_TINY[: BENCH_TINY.index("--timing-images")]  # the model settings, not the bench's own options


def test_many_demo_classes_are_distinct_variants_with_their_bases_defects(tmp_path):
    names = _demo_class_names(20)
    assert names[:9] == [n for n, _ in DEMO_CLASSES] and names[9:11] == ["grid-1", "blobs-1"]
    assert len(set(names)) == 20 and names[18] == "grid-2"
    assert _defects_of("screw-3") == SMALL_DEFECTS
    with pytest.raises(ConfigError, match="1..999"):
        _demo_class_names(1000)
    with pytest.raises(ConfigError, match="variants"):
        _demo_class_names(["grid-x"])
    settings = dict(classes=["grid", "grid-1", "screw-2"], train_per_class=2, test_good_per_class=1, size=48)
    root = make_demo_dataset(tmp_path / "d", test_defect_per_class=2, **settings)
    from PIL import Image

    def image(cls, split="train/good", name="000.png"):
        return np.asarray(Image.open(root / cls / split / name).convert("RGB"), dtype=np.float64)

    # a variant is not its base: another orientation, scale or colour statistics, same size
    assert image("grid").shape == image("grid-1").shape == (48, 48, 3)
    assert np.abs(image("grid") - image("grid-1")).mean() > 5
    # deterministic, and every defect image has a non-empty mask of its own
    again = make_demo_dataset(tmp_path / "e", test_defect_per_class=2, **settings)
    assert np.array_equal(image("grid-1"), np.asarray(Image.open(again / "grid-1/train/good/000.png").convert("RGB")))
    masks = sorted((root / "screw-2" / "ground_truth").glob("*/*.png"))
    assert len(masks) == 2 and all(np.asarray(Image.open(m)).any() for m in masks)


def test_the_plan_trains_each_real_class_alone_then_together_then_with_synthetic_classes(tmp_path):
    args = parse_args(["--data", "x", "--output", str(tmp_path), "--synthetic", "0,8,16", "--subsets", "1,2,4"])
    classes = {"a:1": ["a/one"], "b:2": ["b/two"], "c:3": ["c/three", "c/four"]}
    runs = plan_runs(args, list(classes), classes)
    assert [r["name"] for r in runs] == [
        "alone a/one",
        "alone b/two",
        "2 real",
        "3 real + 8 synthetic",
        "3 real + 16 synthetic",
    ]
    args = parse_args(["--data", "x", "--output", str(tmp_path), "--no-alone", "--subsets", "1", "--synthetic", ""])
    assert [r["name"] for r in plan_runs(args, list(classes), classes)] == ["1 real"]
    with pytest.raises(ConfigError, match="--synthetic"):
        parse_args(["--data", "x", "--output", str(tmp_path), "--synthetic", "a"])


def test_the_scaling_benchmark_runs_and_reports_every_column(tiny_demo, tmp_path, capsys):
    """Two real classes (the tiny demo's) with 2 synthetic ones, each size in its own processes: the JSON has
    per-class metrics, prototypes per class, times and both peak memories; the Markdown has a row per run."""
    out = tmp_path / "scaling"
    argv = [
        "--data",
        f"demo:{tiny_demo}",
        "--output",
        str(out),
        "--demo-dir",
        str(tmp_path / "synthetic"),
        "--synthetic",
        "2",
        "--subsets",
        "1",
        "--demo-train",
        "6",
        "--demo-test",
        "2",
        "--demo-size",
        "64",
        "--epochs",
        "1",
        "--threads",
        "1",
        "--baseline",
        *TINY,
    ]
    assert main(argv) == 0
    report = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in report["runs"]] == ["1 real", "1 real + 2 synthetic"]
    small, large = report["runs"]
    assert len(small["classes"]) == 2 and len(large["classes"]) == 4
    for r in (small, large):
        assert set(r["metrics"]["per_class"]) == set(r["classes"]) and "baseline_metrics" in r
        counts = r["prototypes_per_class"]
        # the budgets are per class: 4 coarse and 64 fine prototypes for each
        assert sum(counts["coarse"].values()) + counts["coarse_unused"] == r["num_prototypes"] == 4 * len(r["classes"])
        assert sum(counts["fine"].values()) == r["num_fine_prototypes"] == 64 * len(r["classes"])
        assert set(counts["fine"].values()) == {64}
        assert r["model_ms_per_image"] > 0 and r["end_to_end_over_backbone"] > 1
        assert r["train_peak_rss_mb"] > 100 and r["infer_peak_rss_mb"] > 100 and r["kmeans_seconds"] >= 0
    md = (out / "results.md").read_text()
    assert "| 1 real + 2 synthetic | 4 |" in md
    assert main(argv) == 2 and "exists" in capsys.readouterr().err  # nothing replaced without --overwrite
