"""The benchmark end to end on a tiny synthetic set: every section of the JSON and Markdown."""

import json

import numpy as np
import pytest

from vpdm.bench import PRESETS, balanced_subset, main, parse_steps
from vpdm.errors import ConfigError

# Random-init Lite0 at 64 px (as tests/test_cli.py): exercises every code path in seconds.
TINY = [
    "--backbone",
    "tf_efficientnet_lite0",
    "--weights",
    "none",
    "--set",
    "backbone.image_size=64",
    "--set",
    "backbone.feature_size=8",
    "--set",
    "model.prototypes.num_prototypes=4",
    "--set",
    "model.prototypes.downsample=2",
    "--set",
    "model.fine.num_prototypes=64",
    "--set",
    "model.diffusion.num_timesteps=50",
    "--set",
    "model.denoiser.width=16",
    "--set",
    "model.denoiser.groups=4",
    "--set",
    "sampling.num_steps=2",
    "--set",
    "train.batch_size=8",
    "--set",
    "scoring.pool_size=4",
    "--set",
    "scoring.blur_sigma=1.0",
    "--threads",
    "1",
    "--timing-images",
    "4",
    "--timing-repeats",
    "1",
    "--no-progress",
]


@pytest.fixture(scope="module")
def bench_run(tiny_demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cache = tmp_path_factory.mktemp("cache")
    code = main(
        [
            "--data",
            f"demo:{tiny_demo}",
            "--output",
            str(out),
            "--epochs",
            "1",
            "--ablations",
            "--diagnose",
            "--steps",
            "1,ddpm:50",
            "--steps-subset",
            "4",
            "--time-widths",
            "8",
            "--onnx",
            "--set",
            f"data.cache_dir={cache}",
            *TINY,
        ]
    )
    assert code == 0
    return out, json.loads((out / "results.json").read_text())


def test_json_has_every_section(bench_run):
    _, doc = bench_run
    for key in (
        "schema",
        "command",
        "versions",
        "machine",
        "config",
        "data",
        "vpdm",
        "baseline",
        "steps",
        "timing",
        "presets_table",
        "cache",
        "comparison",
        "memory",
    ):
        assert key in doc, key
    for key in ("torch", "timm", "numpy", "vpdm", "python", "cpu_count"):
        assert doc["versions"][key]
    assert doc["config"]["train"]["epochs"] == 1 and doc["config"]["train"]["threads"] == 1
    assert doc["data"]["train"]["images"] == 16 and doc["data"]["test"]["images"] == 12
    assert doc["data"]["train"]["cache_key"].startswith(doc["data"]["backbone_fingerprint"])
    assert set(doc["data"]["classes"]) == {"demo/blobs", "demo/grid"}


def test_both_detectors_are_evaluated_with_the_same_metrics(bench_run):
    _, doc = bench_run
    for detector in (doc["vpdm"]["metrics"], doc["baseline"]["metrics"], doc["baseline"]["metrics_plain_max"]):
        assert set(detector["per_class"]) == {"demo/blobs", "demo/grid"}
        for key in ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "image_f1_max"):
            assert 0.0 <= detector["mean"][key] <= 1.0
    assert doc["baseline"]["settings"]["bank_size"] == 77  # ceil(0.1 * 12 images * 8 * 8 patches): 4 held out
    comp = doc["comparison"]["means"]["image_auroc"]
    assert comp["delta_pt"] == pytest.approx(100 * (comp["vpdm"] - comp["baseline"]))


def test_patchcore_is_also_reported_at_its_published_blur_when_vpdms_differs(bench_run):
    """The tiny run blurs with sigma 1: PatchCore is scored a second time at its own sigma 4 (the same bank),
    beside the shared-blur row, so that a change of VPDM's blur cannot flatter the comparison."""
    out, doc = bench_run
    own = doc["baseline"]["published_blur"]
    assert doc["config"]["scoring"]["blur_sigma"] == 1.0 and own["blur_sigma"] == 4.0
    assert set(own["metrics"]["per_class"]) == {"demo/blobs", "demo/grid"}
    assert list(own["defect_sizes"]["mean"]) == ["small", "medium", "large"]
    # another blur of the same maps: the pixel ranking moves, the metric code is the same
    assert own["metrics"]["mean"]["pixel_ap"] != doc["baseline"]["metrics"]["mean"]["pixel_ap"]
    md = (out / "results.md").read_text()
    assert "| mean | VPDM `default` | PatchCore (blur 4) | VPDM - PatchCore (pt) |" in md
    assert "| PatchCore (blur 4) | image AUROC |" in md


def test_every_preset_reads_the_runs_features_and_the_report_says_what_a_preset_would_use_alone(bench_run):
    """The paper preset pins the paper's input (224 px, bilinear stages); the tiny run sets the size for every
    preset, so only the resize differs: the paper is trained on the run's (area) features and the report says
    which setting it would use on its own. The default preset pins nothing, so it is not named."""
    from vpdm.config.presets import PAPER

    out, doc = bench_run
    assert PAPER["backbone.resize"] == "bilinear" and doc["config"]["backbone"]["resize"] == "area"
    notes = doc["preset_backbone_differences"]
    assert set(notes) == {"paper", "paper-no-vague", "paper-no-ot", "paper-no-ot-loss", "paper-ddpm-start"}
    assert all(diff == {"resize": "bilinear"} for diff in notes.values())
    md = (out / "results.md").read_text()
    assert "on its own `paper` would use `backbone.resize=bilinear`." in md


def test_defect_size_table_covers_every_detector_and_every_defect_region(bench_run):
    """Every detector gets AUPRO / pixel recall per size stratum; the strata's regions add up to the
    connected defect regions of the test masks (counted here with scipy), and results.md shows the table."""
    from scipy import ndimage

    from vpdm.data.dataset import AnomalyDataset
    from vpdm.data.layouts import list_samples
    from vpdm.evaluation import evaluator

    out, doc = bench_run
    sizes = [doc["vpdm"]["defect_sizes"], doc["baseline"]["defect_sizes"], doc["preset_runs"]["paper"]["defect_sizes"]]
    for d in sizes:
        assert set(d["per_class"]) == {"demo/blobs", "demo/grid"}
        assert list(d["mean"]) == ["small", "medium", "large"]
        for row in d["mean"].values():
            for key in ("aupro", "pixel_recall"):
                assert row[key] is None or 0.0 <= row[key] <= 1.0
    cfg = doc["config"]
    test = AnomalyDataset(
        list_samples(doc["data"]["spec"], "test"), cfg["backbone"]["image_size"], cfg["scoring"]["map_size"]
    )
    _, masks, _ = evaluator.ground_truth(test)
    regions = sum(ndimage.label(m, structure=np.ones((3, 3)))[1] for m in masks)
    for d in sizes:
        assert sum(r["regions"] for r in d["mean"].values()) == regions > 0
    text = (out / "results.md").read_text()
    assert "## Defect sizes" in text
    # each class's row of the recall table names the regions per stratum its figures rest on
    per_class = doc["vpdm"]["defect_sizes"]["per_class"]
    for cat, strata in per_class.items():
        counts = " / ".join(str(strata[k]["regions"]) for k in ("small", "medium", "large"))
        assert f"| {cat} ({counts}) |" in text
    assert sum(s["regions"] for strata in per_class.values() for s in strata.values()) == regions


def test_both_detectors_decide_at_thresholds_calibrated_on_held_out_train_images(bench_run):
    _, doc = bench_run
    cal = doc["data"]["calibration"]
    # as `vpdm train`: 10 % of each class's 8 train/good images, at least 2, held out; the detectors fit on 12
    assert (
        cal["held_out_images"] == 4
        and cal["fit_images"] == 12
        and cal["per_class"] == {"demo/blobs": 2, "demo/grid": 2}
    )
    assert doc["preset_runs"]["paper"]["history"][0]["images"] == 12
    for decision in (doc["vpdm"]["decision"], doc["baseline"]["decision"], doc["preset_runs"]["paper"]["decision"]):
        assert decision["method"] == "quantile" and decision["calibration_images"] == cal["per_class"]
        assert set(decision["per_class"]) == {"demo/blobs", "demo/grid"}
        for values in list(decision["per_class"].values()) + [decision["mean"]]:
            for key in ("image_precision", "image_recall", "image_f1", "image_false_alarm_rate"):
                assert 0.0 <= values[key] <= 1.0, key
    assert doc["presets_table"]["paper"]["decision_mean"] == doc["preset_runs"]["paper"]["decision"]["mean"]


def test_calibrated_decisions_are_quantile_thresholds_and_sklearns_scores():
    from sklearn.metrics import f1_score, precision_score, recall_score

    from vpdm.bench.run import calibrated_decisions

    rng = np.random.default_rng(0)
    held_cats = ["a"] * 30 + ["b"] * 3
    held = rng.normal(size=33)
    maps = rng.normal(size=(33, 4, 4))
    cats = np.array(["a", "b"])[rng.integers(0, 2, 200)]
    labels = rng.integers(0, 2, 200)
    scores = rng.normal(size=200) + labels
    doc = calibrated_decisions(held, maps, held_cats, scores, labels, cats.tolist(), 0.1)
    for c, idx in (("a", slice(0, 30)), ("b", slice(30, 33))):
        t = np.quantile(held[idx], 0.9, method="higher")
        assert doc["image_thresholds"][c] == t and doc["pixel_thresholds"][c] == np.quantile(
            maps[idx], 0.9, method="higher"
        )
        i = cats == c
        y, p = labels[i], (scores[i] > t).astype(int)
        m = doc["per_class"][c]
        assert m["image_precision"] == pytest.approx(precision_score(y, p, zero_division=0))
        assert m["image_recall"] == pytest.approx(recall_score(y, p))
        assert m["image_f1"] == pytest.approx(f1_score(y, p, zero_division=0))
        assert m["image_false_alarm_rate"] == pytest.approx(p[y == 0].mean())
    assert doc["image_thresholds"]["b"] == held[30:33].max()  # 3 images: the maximum
    with pytest.raises(ConfigError, match="test class\\(es\\) c"):
        calibrated_decisions(held, maps, held_cats, scores[:1], labels[:1], ["c"], 0.1)


def test_timings_and_ratios(bench_run):
    _, doc = bench_run
    t = doc["timing"]
    assert t["batch_images"] == 4 and t["threads"] == 1
    for key in (
        "backbone_ms_per_image",
        "vpdm_model_ms_per_image",
        "vpdm_end_to_end_ms_per_image",
        "baseline_model_ms_per_image",
        "baseline_end_to_end_ms_per_image",
        "train_ms_per_image_epoch",
    ):
        assert t[key] > 0, key
    r = t["ratios"]
    assert r["vpdm_end_to_end_over_backbone"] == pytest.approx(
        t["vpdm_end_to_end_ms_per_image"] / t["backbone_ms_per_image"]
    )
    assert r["vpdm_full_chain_end_to_end_over_backbone"] > 1
    assert t["full_chain"]["sampler"] == "ddpm" and t["full_chain"]["steps"] == 50
    assert [(x["sampler"], x["steps"]) for x in t["vpdm_model_ms_per_image_by_steps"]] == [("ddim", 1), ("ddim", 2)]
    assert "full_chain_model_ms_per_image_extrapolated" in t
    assert [(x["sampler"], x["steps"]) for x in t["untrained_width_model_ms_per_image_by_steps"]["8"]] == [
        ("ddim", 1),
        ("ddim", 2),
    ]
    assert len(t["raw_seconds"]["backbone"]) == 1
    # --onnx: ONNX Runtime on the same images, interleaved with torch, and the two agree
    ort = t["onnxruntime"]
    assert ort["end_to_end_ms_per_image"] > 0 and ort["threads"] == 1
    assert ort["torch_over_onnxruntime"] == pytest.approx(
        t["vpdm_end_to_end_ms_per_image"] / ort["end_to_end_ms_per_image"]
    )
    assert ort["parity_relative_difference"] <= ort["parity_tolerance"]
    assert len(t["raw_seconds"]["onnxruntime_end_to_end"]) == 1
    assert doc["memory"]["peak_rss_mb"] > 0 and "after_training" in doc["memory"]["peak_rss_mb_by_phase"]


def test_steps_table(bench_run):
    _, doc = bench_run
    st = doc["steps"]
    # the configured accelerated sampler (ddim 2) is added to the requested rows
    assert [(r["sampler"], r["steps"]) for r in st["rows"]] == [("ddim", 1), ("ddim", 2), ("ddpm", 50)]
    assert st["full_chain"] == {"sampler": "ddpm", "steps": 50}
    assert st["subset_images"] == 8  # 4 per class
    long_row = st["rows"][-1]
    assert long_row["test"] is None and long_row["subset"]["image_auroc"] is not None
    assert long_row["subset_image_auroc_minus_full_chain_pt"] == 0
    accel = [r for r in st["rows"] if r["accelerated_default"]]
    assert len(accel) == 1 and accel[0]["test"] == doc["vpdm"]["metrics"]["mean"]


def test_ablations_and_cache_proof(bench_run):
    _, doc = bench_run
    assert list(doc["presets_table"]) == list(PRESETS)  # default, paper, then the paper's ablations
    assert doc["main_preset"] == "default"
    for name, a in doc["presets_table"].items():
        assert a["overrides"] == PRESETS[name] and 0 <= a["mean"]["image_auroc"] <= 1
    assert doc["preset_runs"]["paper-no-vague"]["history"][0]["epoch"] == 1
    # the command line holds for every preset: the paper preset trained with the tiny settings
    assert doc["preset_runs"]["paper"]["sampling"]["num_steps"] == 2
    proof = doc["cache"]["proof"]
    assert proof["cache_hit"] is True and proof["same_cache_key"] is True
    assert proof["images_through_backbone"] == 0 and proof["images_loaded"] == 16
    assert doc["comparison"]["targets"]["cache_hit_after_model_change"] is True
    assert doc["data"]["images_through_backbone"] == 28  # first run: 16 train + 12 test extracted once


def test_diagnostics_of_the_default_and_the_paper(bench_run):
    _, doc = bench_run
    diag = doc["diagnostics"]
    assert set(diag) == {"default", "paper"}
    for d in diag.values():
        assert set(d["condition"]) == {"demo/blobs", "demo/grid"}
        for c in d["condition"].values():
            assert 0 <= c["purity"] <= 1 and 0 <= c["entropy_nats"] <= c["max_entropy_nats"] + 1e-6
        assert set(d["x0_mse_by_t"]) == {"0", "50"}  # T = 50 in the tiny settings; 0 = the condition itself
        for leak in d["leak"].values():
            assert leak["inside_over_outside"] > 0
    rows = diag["default"]["start_steps"]
    assert [(r["start_step"], r["num_steps"]) for r in rows] == [(50, 1), (50, 3)]
    assert "start_steps" not in diag["paper"]


def test_markdown_has_every_table(bench_run):
    out, _ = bench_run
    md = (out / "results.md").read_text()
    for heading in (
        "## Detection",
        "## Decisions at calibrated thresholds",
        "## Speed",
        "## AUROC against sampler steps",
        "## Presets",
        "## Diagnostics",
        "## Feature cache",
        "## Targets",
    ):
        assert heading in md, heading
    assert "| demo/grid |" in md and "PatchCore" in md and "cache_hit=True" in md
    assert "| VPDM end to end, ONNX Runtime" in md


def test_second_run_with_other_model_settings_hits_the_cache(bench_run, tiny_demo, tmp_path):
    out, first = bench_run
    cache = json.loads((out / "results.json").read_text())["command"].split("data.cache_dir=")[1].split()[0]
    code = main(
        [
            "--data",
            f"demo:{tiny_demo}",
            "--output",
            str(tmp_path),
            "--epochs",
            "1",
            "--preset",
            "paper-no-ot",
            "--steps",
            "1",
            "--steps-subset",
            "0",
            "--set",
            f"data.cache_dir={cache}",
            *TINY,
            "--set",
            "model.denoiser.width=8",
            # the paper presets pin the paper's bilinear stages; the first run's features were area-pooled
            "--set",
            "backbone.resize=area",
        ]
    )
    assert code == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["data"]["train"]["cache_hit"] and doc["data"]["test"]["cache_hit"]
    assert doc["data"]["images_through_backbone"] == 0
    assert doc["data"]["train"]["cache_key"] == first["data"]["train"]["cache_key"]
    assert "presets_table" not in doc and doc["main_preset"] == "paper-no-ot"


def test_default_steps_follow_the_number_of_timesteps(tiny_demo, tmp_path):
    from vpdm.bench import Bench, build_parser

    args = build_parser().parse_args(["--data", f"demo:{tiny_demo}", "--output", str(tmp_path), *TINY])
    assert Bench(args).steps == [("ddim", 1), ("ddim", 2), ("ddim", 5), ("ddim", 10), ("ddim", 25), ("ddpm", 50)]


def test_parse_steps():
    assert parse_steps("1, 2,ddpm:1000,ddim:5,2", 1000, "ddim") == [
        ("ddim", 1),
        ("ddim", 2),
        ("ddpm", 1000),
        ("ddim", 5),
    ]
    for bad in ("0", "ddpm:1001", "euler:5", "x", ""):
        with pytest.raises(ConfigError):
            parse_steps(bad, 1000, "ddim")


def test_balanced_subset():
    labels = np.array([0] * 5 + [1] * 20 + [0] * 2 + [1] * 1)
    cats = ["a"] * 25 + ["b"] * 3
    idx = balanced_subset(labels, cats, 6, seed=0)
    a = [i for i in idx if cats[i] == "a"]
    assert len(a) == 6 and sum(labels[a]) == 3
    assert [i for i in idx if cats[i] == "b"] == [25, 26, 27]  # fewer than asked: all of them
    assert list(balanced_subset(labels, cats, 0, 0)) == list(range(28))
    assert list(idx) == list(balanced_subset(labels, cats, 6, seed=0))


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--steps", "ddpm:5000"], "ddpm:5000"),
        (["--set", "model.prototypes.downsample=3"], "downsample=3"),
        (["--coreset-ratio", "0"], "coreset_ratio"),
        (["--preset", "paper-no-ot", "--set", "model.ot_weight=-1"], "ot_weight"),
        (
            ["--onnx", "--set", "model.diffusion.num_timesteps=200", "--set", "sampling.num_steps=101"],
            "sampling.num_steps=101",
        ),
    ],
)
def test_bad_settings_fail_before_any_work(args, needle, tiny_demo, tmp_path, capsys):
    code = main(["--data", f"demo:{tiny_demo}", "--output", str(tmp_path / "out"), *TINY, *args])
    assert code == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.json").exists()


def test_existing_results_are_kept_unless_overwrite_and_refused_before_any_work(bench_run, tiny_demo, tmp_path, capsys):
    from vpdm.features.backbone import total_images_seen

    out, _ = bench_run
    before = (out / "results.json").read_bytes()
    seen = total_images_seen()
    argv = [
        "--data",
        f"demo:{tiny_demo}",
        "--output",
        str(out),
        "--epochs",
        "1",
        "--preset",
        "paper-no-ot",
        "--steps",
        "1",
        "--steps-subset",
        "0",
        "--set",
        f"data.cache_dir={tmp_path / 'cache'}",
        *TINY,
    ]
    assert main(argv) == 2
    assert f"results {str(out / 'results.json')!r} exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before and total_images_seen() == seen
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.md").write_text("my notes")
    assert main([*argv[:3], str(mine), *argv[4:], "--overwrite"]) == 0
    assert json.loads((mine / "results.json").read_text())["command"].startswith("python -m vpdm.bench")
    assert (mine / "results.md").read_text() != "my notes"
    assert sorted(p.name for p in mine.iterdir()) == ["results.json", "results.md"]


def _screen_line(label, seed, per_class):
    return json.dumps(
        {
            "label": label,
            "seed": seed,
            "overrides": [],
            "variant": [],
            "metrics": {"per_class": {c: {"image_auroc": i, "pixel_auroc": p} for c, (i, p) in per_class.items()}},
        }
    )


def test_leave_one_out_view_and_the_adoption_rule(tmp_path, capsys):
    """Setting B wins on three categories by a lot and loses 2 points on `d`: the mean says adopt, the rule says
    no, and the leave-one-out view shows `d` would not have chosen it. C is a small gain everywhere, on three
    seeds: it passes."""
    from vpdm.bench.loo import adoption, aggregate, leave_one_out, read_rows
    from vpdm.bench.loo import main as loo_main

    rows = []
    for seed in (0, 1, 2):
        rows.append(
            _screen_line("A", seed, {"a": (0.90, 0.90), "b": (0.90, 0.90), "c": (0.90, 0.90), "d": (0.90, 0.90)})
        )
        rows.append(
            _screen_line("B", seed, {"a": (0.95, 0.95), "b": (0.95, 0.95), "c": (0.95, 0.95), "d": (0.88, 0.90)})
        )
        rows.append(
            _screen_line(
                "C", seed, {"a": (0.91, 0.90), "b": (0.91, 0.90), "c": (0.90 + 0.01 * seed, 0.90), "d": (0.90, 0.91)}
            )
        )
    rows.append(
        _screen_line("PatchCore", 0, {"a": (0.99, 0.99), "b": (0.99, 0.99), "c": (0.99, 0.99), "d": (0.99, 0.99)})
    )
    path = tmp_path / "screen.jsonl"
    path.write_text("\n".join(rows) + "\n")
    settings = aggregate(read_rows([str(path)]))
    assert settings["C"]["seeds"] == [0, 1, 2]
    assert settings["C"]["per_class"]["c"]["image_auroc"] == pytest.approx(0.91)  # mean over the seeds
    rule = adoption(settings, "A", tolerance=0.5, min_seeds=3)
    assert rule["B"]["mean_pt"]["image_auroc"] == pytest.approx(3.25) and not rule["B"]["passes"]
    assert rule["B"]["worst_pt"]["image_auroc"] == pytest.approx(-2.0)
    assert rule["C"]["passes"]
    view = {r["held_out"]: r for r in leave_one_out(settings, "A")}
    assert {c: view[c]["chosen"] for c in "abc"} == {"a": "B", "b": "B", "c": "B"}  # PatchCore is never chosen
    assert view["d"]["chosen"] == "B" and view["d"]["held_out_image"] == pytest.approx(0.88)
    assert view["d"]["reference_image"] == pytest.approx(0.90)
    assert loo_main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "| B | 3 | +3.25 / +3.75 | -2.00 / +0.00 | no |" in out and "Leave one category out" in out
    (tmp_path / "bad.jsonl").write_text("{}\n")
    assert loo_main([str(tmp_path / "bad.jsonl")]) == 2
    assert "is not a line of vpdm.bench.screen --json" in capsys.readouterr().err


def test_the_adoption_rule_compares_on_the_seeds_both_settings_have(tmp_path):
    """The reference has a fourth, lucky seed; E equals it on seeds 0-2 and loses 1 pt on `d` there. Against the
    reference's mean over four seeds E would look 1.5 pt worse everywhere; paired, it is level on a-c and -1 on
    d. F has only two seeds in common with the reference: it cannot pass."""
    from vpdm.bench.loo import adoption, aggregate, read_rows

    base = {c: (0.90, 0.90) for c in "abcd"}
    rows = [_screen_line("A", seed, base) for seed in (0, 1, 2)]
    rows.append(_screen_line("A", 3, {c: (0.96, 0.96) for c in "abcd"}))
    rows += [_screen_line("E", seed, {**base, "d": (0.89, 0.90)}) for seed in (0, 1, 2)]
    rows += [_screen_line("F", seed, base) for seed in (1, 2, 7)]
    path = tmp_path / "screen.jsonl"
    path.write_text("\n".join(rows) + "\n")
    rule = adoption(aggregate(read_rows([str(path)])), "A", tolerance=0.5, min_seeds=3)
    assert rule["E"]["seeds"] == 3 and rule["E"]["worst_pt"]["image_auroc"] == pytest.approx(-1.0)
    assert rule["E"]["mean_pt"]["pixel_auroc"] == pytest.approx(0.0) and not rule["E"]["passes"]
    assert rule["F"]["seeds"] == 2 and rule["F"]["worst_pt"]["image_auroc"] == pytest.approx(0.0)
    assert not rule["F"]["passes"]


def test_leave_one_out_can_choose_by_aupro_and_pixel_ap_too(tmp_path, capsys):
    """Y trades 0.1 pt of image AUROC for 2 pt of AUPRO and pixel AP on every category: the rule's criterion
    (image + pixel AUROC) keeps X, a criterion that counts AUPRO and AP picks Y; an unknown or unmeasured
    metric is refused by name."""
    from vpdm.bench.loo import aggregate, leave_one_out, read_rows
    from vpdm.bench.loo import main as loo_main

    def line(label, seed, image, extra):
        per_class = {
            c: {"image_auroc": image, "pixel_auroc": 0.9, "aupro": 0.8 + extra, "pixel_ap": 0.5 + extra} for c in "abc"
        }
        return json.dumps(
            {"label": label, "seed": seed, "overrides": [], "variant": [], "metrics": {"per_class": per_class}}
        )

    path = tmp_path / "screen.jsonl"
    path.write_text("\n".join(line(n, s, i, e) for s in (0, 1, 2) for n, i, e in (("X", 0.9, 0.0), ("Y", 0.899, 0.02))))
    settings = aggregate(read_rows([str(path)]))
    assert settings["Y"]["per_class"]["a"]["aupro"] == pytest.approx(0.82)
    assert {r["chosen"] for r in leave_one_out(settings, "X")} == {"X"}
    view = leave_one_out(settings, "X", ("image_auroc", "pixel_auroc", "aupro", "pixel_ap"))
    assert {r["chosen"] for r in view} == {"Y"}
    assert view[0]["held_out_criterion"]["pixel_ap"] == pytest.approx(0.52)
    assert view[0]["reference_criterion"]["pixel_ap"] == pytest.approx(0.5)
    assert loo_main([str(path), "--criterion", "image_auroc,pixel_auroc,aupro,pixel_ap"]) == 0
    out = capsys.readouterr().out
    assert "the others choose by the mean of image_auroc, pixel_auroc, aupro, pixel_ap" in out
    assert "| a | Y | 89.9 / 90.0 / 82.0 / 52.0 | 90.0 / 90.0 / 80.0 / 50.0 |" in out
    assert loo_main([str(path), "--criterion", "image_auroc,f1"]) == 2
    assert "--criterion 'f1' is not a metric" in capsys.readouterr().err
    old = tmp_path / "old.jsonl"
    old.write_text(_screen_line("X", 0, {"a": (0.9, 0.9), "b": (0.9, 0.9)}) + "\n")
    assert loo_main([str(old), "--criterion", "image_auroc,aupro"]) == 2
    assert "setting 'X' has no aupro for 'a'" in capsys.readouterr().err


def test_the_predict_memory_benchmark_prints_a_peak_per_count(capsys):
    """benchmarks/predict_memory.py end to end at a tiny size (the figures themselves are the README's)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "predict_memory.py"
    spec = importlib.util.spec_from_file_location("predict_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--counts", "2,5", "--image-size", "64", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| 2 |", "| 5 |"))]
    assert len(rows) == 2 and all(float(r.split("|")[2]) > 100 for r in rows), out  # MiB of a process with torch
    assert "largest / smallest peak: " in out
