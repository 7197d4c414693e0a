"""Safe promotion in the MLflow registry (tune/registry.py) against a real sqlite store, without Ray.

Tiny VPDM checkpoints are trained with the ``vpdm`` command and logged with the project's own
``log_pyfunc_model``; the validation data is a real ``DatasetBundle`` of the tiny demo set. The truth
the decisions are checked against is computed here, independently of the registry: the metric of each
*local* checkpoint file on the same bundle, and a checkpoint made worse on purpose (a constant offset
of 10 on every predicted noise value raises the held-out eps-MSE by about 100).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")

import torch  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from tests.conftest import sqlite_mlflow_store  # noqa: E402
from tests.test_cli import TINY  # noqa: E402
from tune.distributed import validation_metrics  # noqa: E402
from tune.features import FeatureStats, build_bundle  # noqa: E402
from tune.mlflow_model import log_pyfunc_model  # noqa: E402
from tune.registry import (  # noqa: E402
    CHALLENGER,
    CHAMPION,
    ValidationData,
    beats,
    decide,
    default_model_name,
    register_challenger,
    register_champion,  # noqa: E402
    registered_name,
)
from vpdm.cli.commands import main as vpdm_main  # noqa: E402
from vpdm.config.values import to_dict  # noqa: E402
from vpdm.errors import ConfigError  # noqa: E402
from vpdm.features.backbone import FeatureExtractor  # noqa: E402
from vpdm.inference.checkpoint import load_checkpoint, read_checkpoint  # noqa: E402

SEED, VAL_FRACTION = 0, 0.25


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A fresh sqlite tracking + registry store; restores the previous URIs afterwards."""
    yield from sqlite_mlflow_store(tmp_path_factory.mktemp("registry"), "registry-tests")


def _train(demo: Path, out: Path, cache: Path, *extra: str) -> Path:
    code = vpdm_main(
        [
            "train",
            "--data",
            f"demo:{demo}",
            "--output",
            str(out),
            "--epochs",
            "2",
            "--no-progress",
            "--set",
            f"data.cache_dir={cache}",
            *TINY,
            *extra,
        ]
    )
    assert code == 0
    return out / "model.pt"


@pytest.fixture(scope="module")
def checkpoints(tiny_demo, tmp_path_factory):
    """good: trained; worse: good with +10 on the denoiser's output bias; other: 4x4 instead of 8x8 features."""
    root = tmp_path_factory.mktemp("checkpoints")
    good = _train(tiny_demo, root / "good", root / "cache")
    payload = read_checkpoint(good)
    payload["state_dict"]["denoiser.out.bias"] = payload["state_dict"]["denoiser.out.bias"] + 10.0
    worse = root / "worse.pt"
    torch.save(payload, worse)
    other = _train(tiny_demo, root / "other", root / "cache", "--set", "backbone.feature_size=4")
    return {"good": good, "worse": worse, "other": other, "cache": root / "cache"}


@pytest.fixture(scope="module")
def runs(store, checkpoints, tiny_demo):
    """One MLflow run per logged model."""
    example = sorted((tiny_demo / "grid" / "test").rglob("*.png"))[:1]
    out = {}
    for key in ("good", "worse", "other"):
        path = checkpoints[key]
        with mlflow.start_run(experiment_id=store["experiment_id"], run_name=key) as run:
            log_pyfunc_model(path, example_images=example)
        out[key] = run.info.run_id
    return out


@pytest.fixture(scope="module")
def validation(checkpoints, tiny_demo):
    """This 'sweep's' held-out validation data, built from the good checkpoint's own settings."""
    _, config, _ = load_checkpoint(checkpoints["good"])
    config = config.with_overrides({"data.spec": f"demo:{tiny_demo}", "data.cache_dir": str(checkpoints["cache"])})
    bundle, _ = build_bundle("demo", config, FeatureExtractor(config.backbone), val_fraction=VAL_FRACTION, seed=SEED)
    assert len(bundle.val_features) >= 4
    data = ValidationData(
        data_spec=f"demo:{tiny_demo}",
        backbone=to_dict(config.backbone),
        seed=SEED,
        val_fraction=VAL_FRACTION,
        bundle=lambda: bundle,
    )
    return {"data": data, "bundle": bundle, "config": config}


def _truth(path: Path, bundle, metric: str) -> float:
    """The metric of a local checkpoint file on the bundle (no registry involved)."""
    model, config, _ = load_checkpoint(path)
    return validation_metrics(model, bundle, config)[metric]


def _promote(name, run_id, validation, metric="val_loss", mode="min", force=False, trial_value=None):
    return register_challenger(
        run_id,
        model_name=name,
        metric=metric,
        mode=mode,
        sweep="test-sweep",
        data_spec=validation["data"].data_spec,
        validation=validation["data"],
        force=force,
        trial_value=trial_value,
        tags={"sweep": "test-sweep", "trial": run_id[:8]},
    )


def _no_data():
    raise FileNotFoundError("demo:/gone: no such folder")


def _state(name):
    client = MlflowClient()
    found = client.search_model_versions(f"name = '{name}'")  # (search results carry no aliases)
    versions = [client.get_model_version(name, v.version) for v in sorted(found, key=lambda v: int(v.version))]
    return {str(v.version): sorted(v.aliases) for v in versions}, {str(v.version): v for v in versions}


# -- names ---------------------------------------------------------------------------------------------


def test_registered_name_is_one_per_dataset_slug_unless_overridden(tiny_demo, tmp_path):
    from tune.plan import SweepConfig, plan_sweep
    from vpdm.data.demo import make_demo_dataset

    assert default_model_name("mvtec-bottle") == "vpdm-mvtec-bottle"
    assert registered_name(None, "demo", 1) == "vpdm-demo"
    assert registered_name("mine", "demo", 1) == "mine"  # an explicit name for a one-dataset sweep
    assert registered_name("mine", "demo", 2) == "mine-demo"  # a prefix for several
    with pytest.raises(ConfigError, match="'a/b'.*models:/"):
        registered_name("a/b", "demo", 1)

    other = make_demo_dataset(
        tmp_path / "other",
        classes=1,
        train_per_class=8,
        test_good_per_class=2,
        test_defect_per_class=2,
        size=64,
        seed=1,
    )
    base = {
        "preset": "tiny",
        "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
        "storage": str(tmp_path / "runs"),
        "workers": 1,
    }
    plan = plan_sweep(SweepConfig(datasets=[f"demo:{tiny_demo}", f"demo:{other}"], **base))
    names = [d.model_name for d in plan.datasets]
    assert names == [f"vpdm-demo-{tiny_demo.name}", "vpdm-demo-other"]  # two products, two names
    assert registered_name(None, "bottle", 1) == "vpdm-bottle"  # --data bottle=SPEC names it
    with pytest.raises(ConfigError, match="x@y"):  # refused before anything starts
        plan_sweep(SweepConfig(datasets=[f"demo:{tiny_demo}"], model_name="x@y", **base))
    with pytest.raises(ConfigError, match="--promote.*--no-register"):
        plan_sweep(SweepConfig(datasets=[f"demo:{tiny_demo}"], promote=True, register=False, **base))


def test_beats_is_strict_in_the_metrics_direction():
    assert beats(0.9, 0.8, "max") and not beats(0.8, 0.9, "max") and not beats(0.8, 0.8, "max")
    assert beats(0.1, 0.2, "min") and not beats(0.2, 0.1, "min") and not beats(0.2, 0.2, "min")
    assert not beats(float("nan"), 0.5, "max") and not beats(0.5, float("nan"), "min")
    with pytest.raises(ConfigError, match="'up'"):
        beats(1.0, 0.0, "up")


# -- decisions -----------------------------------------------------------------------------------------


def test_first_version_becomes_champion(store, runs, validation):
    p = _promote("first", runs["good"], validation, trial_value=0.25)
    aliases, versions = _state("first")
    assert aliases == {"1": [CHALLENGER, CHAMPION]}
    assert (p.decision, p.champion, p.previous_champion, p.challenger_value) == ("first version", "1", None, 0.25)
    tags = versions["1"].tags
    assert tags["promotion.decision"] == "first version" and tags["promotion.sweep"] == "test-sweep"
    assert tags["promotion.metric"] == "val_loss" and tags["promotion.data_spec"] == validation["data"].data_spec
    assert tags["sweep"] == "test-sweep"  # the caller's tags are there too


def test_a_worse_challenger_leaves_the_champion_and_both_versions_stay(store, runs, checkpoints, validation):
    good = _truth(checkpoints["good"], validation["bundle"], "val_loss")
    worse = _truth(checkpoints["worse"], validation["bundle"], "val_loss")
    assert worse > good + 50  # the premise: the offset makes it clearly worse

    _promote("worse-challenger", runs["good"], validation)
    p = _promote("worse-challenger", runs["worse"], validation)
    aliases, versions = _state("worse-challenger")
    assert aliases == {"1": [CHAMPION], "2": [CHALLENGER]}  # champion unchanged, the challenger kept as v2
    assert p.decision == "kept champion v1" and not p.promoted and p.champion == "1"
    assert p.champion_value == pytest.approx(good, rel=1e-5) and p.challenger_value == pytest.approx(worse, rel=1e-5)
    tags = versions["2"].tags
    assert tags["promotion.decision"] == "kept champion v1" and tags["promotion.previous_champion"] == "1"
    assert float(tags["promotion.champion_value"]) == pytest.approx(good, rel=1e-5)
    assert float(tags["promotion.challenger_value"]) == pytest.approx(worse, rel=1e-5)
    assert "--promote" in tags["promotion.reason"] and "not better" in tags["promotion.reason"]
    assert versions["1"].status == versions["2"].status == "READY"


def test_a_better_challenger_takes_the_champion(store, runs, checkpoints, validation):
    _promote("better-challenger", runs["worse"], validation)
    p = _promote("better-challenger", runs["good"], validation)
    aliases, versions = _state("better-challenger")
    assert aliases == {"1": [], "2": [CHALLENGER, CHAMPION]}
    assert p.decision == "promoted" and p.promoted and p.previous_champion == "1"
    assert p.challenger_value < p.champion_value
    assert versions["2"].tags["promotion.decision"] == "promoted"


def test_a_tie_keeps_the_champion(store, runs, checkpoints, validation):
    """Two versions of the same logged model score the same: not a reason to move the champion."""
    metric = "val_same_class_auroc"
    register_champion(runs["good"], model_name="tie")
    register_champion(runs["good"], model_name="tie", alias=CHALLENGER)
    p = decide("tie", "2", champion="1", metric=metric, mode="max", validation=validation["data"])
    assert (
        p.challenger_value
        == p.champion_value
        == pytest.approx(_truth(checkpoints["good"], validation["bundle"], metric))
    )
    assert p.decision == "kept champion v1" and p.champion == "1" and "a tie" in p.reason


def test_a_max_metric_is_compared_upwards(store, runs, checkpoints, validation):
    """Whichever way the two checkpoints rank on the AUROC, the decision follows the values computed here."""
    metric = "val_pseudo_auroc"
    worse, good = (_truth(checkpoints[k], validation["bundle"], metric) for k in ("worse", "good"))
    _promote("max-metric", runs["worse"], validation, metric=metric, mode="max")
    p = _promote("max-metric", runs["good"], validation, metric=metric, mode="max")
    assert (p.champion_value, p.challenger_value) == (pytest.approx(worse), pytest.approx(good))
    assert p.promoted == (good > worse)


def test_promote_forces_a_worse_challenger_and_records_the_comparison(store, runs, validation):
    _promote("forced", runs["good"], validation)
    p = _promote("forced", runs["worse"], validation, force=True)
    aliases, versions = _state("forced")
    assert aliases == {"1": [], "2": [CHALLENGER, CHAMPION]}
    assert p.decision == "forced" and p.challenger_value > p.champion_value  # worse, and promoted anyway
    assert versions["2"].tags["promotion.decision"] == "forced"
    assert "--promote" in versions["2"].tags["promotion.reason"]


def test_an_unscoreable_champion_is_kept_with_the_reason(store, runs, validation):
    """The champion was trained on 4x4 features: it cannot be scored on this sweep's 8x8 ones."""
    _promote("unscoreable", runs["other"], validation)
    p = _promote("unscoreable", runs["good"], validation)
    aliases, versions = _state("unscoreable")
    assert aliases == {"1": [CHAMPION], "2": [CHALLENGER]}
    assert p.decision == "kept champion v1" and p.champion_value is None and p.challenger_value is not None
    reason = versions["2"].tags["promotion.reason"]
    assert "champion v1 cannot be scored" in reason and "backbone.feature_size=4" in reason and "--promote" in reason
    assert versions["2"].tags["promotion.champion_value"] == ""


def test_a_champion_whose_checkpoint_is_gone_is_kept(store, runs, validation):
    _promote("no-artifact", runs["good"], validation)
    root = MlflowClient().get_model_version_download_uri("no-artifact", "1")
    stored = Path(root.removeprefix("file://"), "artifacts", "model.pt")
    stored.rename(stored.with_suffix(".away"))  # lost from the artifact store (the other tests share it)
    try:
        p = _promote("no-artifact", runs["worse"], validation)
    finally:
        stored.with_suffix(".away").rename(stored)
    assert p.decision == "kept champion v1" and "checkpoint artifact" in p.reason and "--promote" in p.reason
    assert _state("no-artifact")[0] == {"1": [CHAMPION], "2": [CHALLENGER]}


def test_deciding_again_neither_registers_nor_decides_twice(store, runs, validation):
    _promote("again", runs["worse"], validation)
    first = _promote("again", runs["good"], validation)
    assert first.decision == "promoted"
    # a resumed sweep or a replay: the recorded decision stands (with data that cannot even be built now,
    # deciding again would keep v1)
    gone = {
        **validation,
        "data": ValidationData(
            data_spec="demo:/gone",
            backbone=validation["data"].backbone,
            seed=SEED,
            val_fraction=VAL_FRACTION,
            bundle=_no_data,
        ),
    }
    again = _promote("again", runs["good"], gone)
    assert (again.version, again.decision, again.champion) == ("2", "promoted", "2")
    assert _state("again")[1]["2"].tags["promotion.reason"] == first.reason
    # a crash after the decision was written but before the alias moved: the next call finishes it
    MlflowClient().set_registered_model_alias("again", CHAMPION, "1")
    finished = _promote("again", runs["good"], validation)
    assert finished.champion == "2" and _state("again")[0] == {"1": [], "2": [CHALLENGER, CHAMPION]}
    # ... unless someone moved the champion elsewhere meanwhile: that choice stands
    register_champion(runs["other"], model_name="again", alias=CHAMPION)  # v3, moved by hand
    assert _promote("again", runs["good"], validation).champion == "3"
    assert _state("again")[0] == {"1": [], "2": [CHALLENGER], "3": [CHAMPION]}


def test_the_replay_of_a_registration_applies_the_same_rule(store, runs, checkpoints, validation, tmp_path):
    """MLflow was down when the sweep ended: the replay rebuilds the validation data from the record."""
    from tune.recover import replay
    from tune.tracking import PENDING_DIR

    _promote("replayed", runs["good"], validation)
    record = {
        "op": "register",
        "run_id": "parent",
        "tracking_uri": store["uri"],
        "model_name": "replayed",
        "challenger_run_id": runs["worse"],
        "tags": {"sweep": "s2", "data_spec": validation["data"].data_spec},
        "promotion": {
            "metric": "val_loss",
            "mode": "min",
            "force": False,
            "sweep": "s2",
            "dataset": "demo",
            "data_spec": validation["data"].data_spec,
            "config": to_dict(validation["config"]),
            "seed": SEED,
            "val_fraction": VAL_FRACTION,
            "trial_value": 1.5,
        },
    }
    spool = tmp_path / "sweep" / PENDING_DIR
    spool.mkdir(parents=True)
    (spool / "driver.jsonl").write_text(json.dumps(record) + "\n")
    report = replay(tmp_path / "sweep")
    assert report.errors == [] and report.done == {"register": 1}
    assert len(report.registered) == 1 and "replayed v2 @challenger: kept champion v1" in report.registered[0]
    aliases, versions = _state("replayed")
    assert aliases == {"1": [CHAMPION], "2": [CHALLENGER]}
    good = _truth(checkpoints["good"], validation["bundle"], "val_loss")
    assert float(versions["2"].tags["promotion.champion_value"]) == pytest.approx(good, rel=1e-5)
    assert versions["2"].tags["promotion.sweep"] == "s2"


def test_the_sweep_summary_says_what_the_registry_decided():
    from tune.registry import Promotion
    from tune.results import DatasetResult, SweepResult, TrialSummary

    best = TrialSummary("t1", "demo_t1", "completed", 2, 0.8, 0.5, {"image_auroc": 0.9}, {}, "r1", "models:/m-1")
    kept = Promotion(
        "vpdm-demo",
        "2",
        "kept champion v1",
        "1",
        "1",
        "val_pseudo_auroc",
        0.8,
        0.9,
        "not better: val_pseudo_auroc 0.8000 vs champion v1's 0.9000; pass --promote to make it champion anyway",
    )
    d = DatasetResult(
        "demo",
        "demo",
        FeatureStats("demo", 10, 10, 0, 1.0),
        [best],
        best,
        registered_model="vpdm-demo",
        registered_version="2",
        promotion=kept,
    )
    result = SweepResult(
        "s", "e", "1", "sqlite:///x.db", None, "val_pseudo_auroc", "max", "demo", [d], 1.0, 10, 0, 0, 10, "runs/s", 1, 1
    )
    text = result.summary_text()
    assert "vpdm-demo v2 @challenger" in text and "@champion" not in text.split("\n")[3]
    assert "registry: vpdm-demo v2 @challenger: kept champion v1: not better" in text
    assert result.to_dict()["datasets"][0]["promotion"]["decision"] == "kept champion v1"
