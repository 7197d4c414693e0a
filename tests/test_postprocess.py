"""Thresholds and decisions (vpdm.postprocess, vpdm.calibration): closed forms, sklearn, the CLI, real data."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from vpdm.errors import CheckpointError, ConfigError
from vpdm.postprocess import (
    Calibration,
    ClassThresholds,
    PostProcessor,
    check_threshold,
    nearest_class,
    normalise,
    quantile_threshold,
)

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
    a = ClassThresholds.from_scores(np.array([1.0, 2.0, 3.0]), np.array([[[0.0, 1.0]], [[2.0, 0.5]], [[1.0, 1.0]]]), 0.01)
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
    with pytest.raises(CheckpointError, match=r"'runs/x/model.pt' has no calibrated thresholds.*vpdm calibrate "
                                              r"--checkpoint runs/x/model.pt"):
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


# decision metrics against sklearn
# --------------------------------------------------------------------------------------------


def test_decision_metrics_match_sklearn():
    from sklearn.metrics import confusion_matrix, f1_score, precision_score, recall_score

    from vpdm.metrics import decision_metrics

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
    from vpdm.metrics import decision_metrics

    m = decision_metrics([0, 0, 1], [0, 0, 0], ["a"] * 3)["per_class"]["a"]
    assert m["image_precision"] == 0.0 and m["image_f1"] == 0.0 and m["image_recall"] == 0.0
    assert m["image_false_alarm_rate"] == 0.0
    m = decision_metrics([1, 1], [1, 0], ["a", "a"])["per_class"]["a"]
    assert math.isnan(m["image_false_alarm_rate"]) and m["image_recall"] == 0.5


# the held-out split
# --------------------------------------------------------------------------------------------


def _samples(counts: dict[str, int]):
    from pathlib import Path

    from vpdm.data import Sample

    return [Sample(Path(f"/x/{c}/{i}.png"), None, 0, c, "good") for c, n in counts.items() for i in range(n)]


def test_holdout_is_seeded_per_class_and_at_least_two_images():
    from vpdm.calibration import holdout_split

    samples = _samples({"a": 30, "b": 8})
    train, held = holdout_split(samples, 0.1, seed=0)
    assert sum(s.category == "a" for s in held) == 3 and sum(s.category == "b" for s in held) == 2
    assert len(train) + len(held) == len(samples) and not {s.image_path for s in train} & {s.image_path for s in held}
    assert holdout_split(samples, 0.1, seed=0) == (train, held)
    assert holdout_split(samples, 0.1, seed=1)[1] != held
    assert holdout_split(samples, 0.0, seed=0) == (samples, [])


def test_holdout_refuses_a_class_too_small_to_train_on_by_name():
    from vpdm.calibration import holdout_split

    with pytest.raises(ConfigError, match=r"class 'b' has 3 training image\(s\).*train.calibration_fraction=0"):
        holdout_split(_samples({"a": 30, "b": 3}), 0.1, seed=0)


@pytest.mark.parametrize("setting,value", [("train.calibration_fraction", "1.0"), ("train.calibration_fraction", "-0.1"),
                                           ("calibration.false_alarm_rate", "1"), ("calibration.false_alarm_rate", "-1"),
                                           ("calibration.false_alarm_rate", "nan"), ("train.calibration_fraction", "inf")])
def test_new_settings_are_validated_by_name(setting, value):
    from vpdm.config import load_config

    with pytest.raises(ConfigError, match=setting):
        load_config(None, [f"{setting}={value}"])
