"""The sweep layer without a cluster: sharding, presets and their validation, validation data,
and refusals of bad input before anything starts (no Ray is started by any test here)."""

from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch

from tune.distributed import StratifiedShardSampler, per_worker_batch_size, validation_metrics
from tune.features import pseudo_anomalies, split_validation
from tune.plan import SweepConfig, dataset_slug, parse_datasets, plan_sweep
from tune.presets import ABLATIONS, PRESETS, Dim, apply_search_overrides, get_preset, parse_dim, validate_space
from tune.sweep import run_sweep
from vpdm.config.schema import VPDMConfig
from vpdm.data.demo import make_demo_dataset
from vpdm.errors import ConfigError, DataError, VPDMError

# -- sharding ---------------------------------------------------------------------------------------


def _shards(class_index, world, batch, epoch, seed=0):
    samplers = [
        StratifiedShardSampler(class_index, num_replicas=world, rank=r, batch_size=batch, seed=seed)
        for r in range(world)
    ]
    for s in samplers:
        s.set_epoch(epoch)
    return samplers, [list(s) for s in samplers]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("counts", [(8, 8), (24, 24, 24), (5, 17, 2, 9), (3, 30)])
def test_each_image_once_per_epoch_and_every_class_spread_over_workers(world, counts):
    class_index = np.repeat(np.arange(len(counts)), counts)
    n = len(class_index)
    if n < 2 * world:
        pytest.skip("too few images for this many workers (refused, tested below)")
    for epoch in range(3):
        samplers, batches = _shards(class_index, world, batch=4, epoch=epoch)
        seen = [i for rank in batches for b in rank for i in b]
        # every image exactly once across all workers: none dropped, none duplicated
        assert sorted(seen) == list(range(n))
        # DDP needs the same number of steps on every rank; no degenerate batch of one
        assert len({len(rank) for rank in batches}) == 1
        assert all(len(b) >= 2 for rank in batches for b in rank)
        assert all(len(rank) == len(s) for rank, s in zip(batches, samplers))
        # every class is spread evenly: each rank holds floor or ceil of n_c / W of class c
        for c, n_c in enumerate(counts):
            per_rank = [sum(class_index[i] == c for b in rank for i in b) for rank in batches]
            assert sum(per_rank) == n_c
            assert max(per_rank) - min(per_rank) <= 1, (c, per_rank)


def test_sharding_reshuffles_per_epoch_deterministically_and_mixes_classes_in_batches():
    class_index = np.repeat(np.arange(3), 24)
    _, a0 = _shards(class_index, 2, 16, epoch=0)
    _, a1 = _shards(class_index, 2, 16, epoch=1)
    _, b0 = _shards(class_index, 2, 16, epoch=0)
    assert a0 == b0  # same seed and epoch -> same shards on every run
    assert a0 != a1  # a new epoch reshuffles
    assert {tuple(sorted(i for b in r for i in b)) for r in a0} != {tuple(sorted(i for b in r for i in b)) for r in a1}
    # a batch is not one class (the OT assignment wants all classes in a batch)
    assert all(len(set(class_index[b])) > 1 for rank in a0 for b in rank)


def test_sharding_refuses_too_few_images_and_bad_ranks():
    with pytest.raises(ConfigError, match="cannot be split over 4 workers"):
        StratifiedShardSampler([0, 0, 1, 1, 1], num_replicas=4, rank=0, batch_size=4)
    with pytest.raises(ConfigError, match="rank 2"):
        StratifiedShardSampler([0] * 10, num_replicas=2, rank=2, batch_size=4)
    with pytest.raises(ConfigError, match=">= 2"):
        StratifiedShardSampler([0] * 10, num_replicas=1, rank=0, batch_size=1)


def test_global_batch_is_split_over_workers():
    assert per_worker_batch_size(32, 1) == 32
    assert per_worker_batch_size(32, 2) == 16
    assert per_worker_batch_size(8, 8) == 2  # never below two images per step


# -- DDP readiness of every ablation ------------------------------------------------------------------


@pytest.mark.parametrize("ablation", list(ABLATIONS))
def test_every_parameter_gets_a_gradient_in_every_ablation(ablation):
    """DDP runs with find_unused_parameters=False: an unused parameter would hang the all-reduce."""
    from vpdm.training import engine

    fixed = {**PRESETS["tiny"].fixed, **ABLATIONS[ablation][1]}
    cfg = VPDMConfig().with_overrides(fixed).with_overrides({"model.prototypes.num_prototypes": 3}).validate()
    x = torch.randn(6, 40, 8, 8)
    model = engine.build_model(cfg, x)
    model(x)["loss"].backward()
    # DDP only waits for parameters that require a gradient: the frozen prototypes (the default) are exempt
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


# -- validation data ----------------------------------------------------------------------------------


def test_validation_split_is_stratified_and_disjoint():
    class_index = np.repeat(np.arange(3), [20, 10, 2])
    train, val = split_validation(class_index, 0.15, seed=0)
    assert set(train).isdisjoint(val) and sorted(np.r_[train, val]) == list(range(32))
    assert [int((class_index[val] == c).sum()) for c in range(3)] == [3, 2, 1]  # >= 1 per class
    again = split_validation(class_index, 0.15, seed=0)
    assert np.array_equal(again[1], val)


def test_validation_keeps_two_images_per_class_for_the_thresholds_when_it_can():
    from tune.features import validation_count

    # round(0.15 * n), at least 2 when 2 remain to train on, at least 1 from 2 images, never all
    assert [validation_count(n, 0.15) for n in (1, 2, 3, 4, 8, 10, 20, 100)] == [0, 1, 1, 2, 2, 2, 3, 15]
    train, val = split_validation(np.repeat(np.arange(2), [8, 4]), 0.15, seed=0)
    assert len(val) == 4 and len(train) == 8


def test_a_trials_model_is_calibrated_on_the_held_out_normal_images_and_answers_with_decisions(tiny_demo, tmp_path):
    """What a sweep trial does after training (tune.thresholds), without Ray: thresholds from the bundle's held-out
    normal images go into the checkpoint, and the pyfunc answers with labels from them."""
    from tune.features import as_tensor, build_bundle
    from tune.thresholds import calibrate_checkpoint, decisions_on_test
    from vpdm.data.layouts import list_samples
    from vpdm.evaluation import evaluator
    from vpdm.features.backbone import FeatureExtractor
    from vpdm.inference.checkpoint import checkpoint_calibration, read_checkpoint, save_checkpoint
    from vpdm.inference.detector import Detector
    from vpdm.training import engine

    cfg = (
        VPDMConfig()
        .with_overrides(
            {
                **PRESETS["tiny"].fixed,
                "model.prototypes.num_prototypes": 4,
                "model.prototypes.downsample": 2,
                "model.diffusion.num_timesteps": 20,
                "sampling.num_steps": 1,
                "data.spec": f"demo:{tiny_demo}",
                "data.cache_dir": str(tmp_path / "cache"),
            }
        )
        .validate()
    )
    bundle, _ = build_bundle("demo", cfg, FeatureExtractor(cfg.backbone), val_fraction=0.15, seed=3)
    model = engine.build_model(cfg, as_tensor(bundle.train_features))
    path = save_checkpoint(tmp_path / "model.pt", model, cfg, categories=bundle.categories)
    assert checkpoint_calibration(read_checkpoint(path)) is None  # as the Train workers save it

    calibration, why = calibrate_checkpoint(path, bundle)
    assert why == "" and calibration is not None and calibration.method == "quantile"
    assert "sweep validation hold-out 0.15" in calibration.source and "seed 3" in calibration.source
    stored = checkpoint_calibration(read_checkpoint(path))
    assert stored.classes == calibration.classes and read_checkpoint(path)["extra"]["calibration_images"] == 4
    if cfg.scoring.combine == "standardised":  # the term statistics the thresholds hold for are saved with them
        saved = read_checkpoint(path)["state_dict"]
        assert "term statistics moved 0.5 of the way" in calibration.source
        assert torch.equal(saved["train_term_mean"], model.term_mean)
        assert not torch.equal(saved["term_mean"], model.term_mean)
    # independent truth: the held-out images, found again from the split and scored from their files
    train = list_samples(cfg.data.spec, "train")
    class_index = np.array([bundle.categories.index(x.category) for x in train])
    held = [train[i] for i in split_validation(class_index, 0.15, seed=3)[1]]
    tests = sorted((tiny_demo / "grid" / "test").rglob("*.png"))
    # the Detector is what the logged pyfunc answers with (tests/test_sweep_ray.py asks a sweep's champion itself)
    results = Detector.from_checkpoint(path).predict_files([x.image_path for x in held] + tests, progress=False)
    found = {r.path: r.score for r in results}
    for c, t in stored.classes.items():
        mine = [found[str(x.image_path)] for x in held if x.category == c]
        assert t.num_images == len(mine) == 2
        assert t.image_threshold == pytest.approx(max(mine), rel=1e-5)  # 2 images, rate 0.01: their maximum
    for r in results[len(held) :]:  # labels from the calibrated thresholds, not empty
        assert r.pred_label == int(r.score > stored.classes[r.category].image_threshold)
    # the decisions the trial logs: the labels of the test scores at each class's threshold
    scores = evaluator.score_features(
        model,
        as_tensor(bundle.test_features),
        sampling=cfg.sampling,
        scoring=cfg.scoring,
        map_size=cfg.scoring.map_size or cfg.backbone.image_size,
        progress=False,
    )[0].numpy()
    decision = decisions_on_test(calibration, bundle, scores)
    grid = np.array(bundle.test_categories) == "demo/grid"
    flagged = scores[grid] > calibration.classes["demo/grid"].image_threshold
    normal = bundle.test_labels[grid] == 0
    assert decision["per_class"]["demo/grid"]["image_false_alarm_rate"] == pytest.approx(flagged[normal].mean())

    # a class with too few held-out images: no thresholds, the reason, and the file untouched
    before = path.read_bytes()
    bundle.val_class = np.r_[0, np.ones(len(bundle.val_class) - 1, dtype=np.int64)]  # class 0: one image left
    calibration, why = calibrate_checkpoint(path, bundle)
    assert calibration is None and "at least 2 normal images per class" in why and path.read_bytes() == before


def test_a_sweep_refuses_a_calibration_method_that_needs_labels(tiny_demo, tmp_path):
    sc = SweepConfig(
        datasets=[f"demo:{tiny_demo}"],
        preset="tiny",
        storage=str(tmp_path / "runs"),
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        overrides=["calibration.method=f1"],
    )
    with pytest.raises(ConfigError, match="calibration.method=f1: a sweep calibrates each trial"):
        plan_sweep(sc)
    sc.overrides = ["calibration.choose_map_weights=true"]
    with pytest.raises(ConfigError, match="choose_map_weights=true: a sweep calibrates on held-out normal images"):
        plan_sweep(sc)


def test_pseudo_anomalies_paste_one_square_from_another_class():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(4, 3, 8, 8)).astype(np.float32)
    classes = np.array([0, 0, 1, 1])
    out = pseudo_anomalies(feats, classes, seed=0)
    for i in range(4):
        changed = np.any(out[i] != feats[i], axis=0)
        assert 0 < changed.sum() <= 4  # a 2x2 square (8 // 4) in the 8x8 map
        ys, xs = np.nonzero(changed)
        assert ys.max() - ys.min() <= 1 and xs.max() - xs.min() <= 1


def test_same_class_pseudo_defects_cycle_through_small_sizes():
    """Each image changes inside one square only; the squares' sides cycle through S/4, S/16 and one
    position per round of the four kinds (a shuffle at least 2x2), so small defects are in the proxy."""
    from tune.features import SAME_CLASS_KINDS, same_class_pseudo_anomalies, same_class_sides

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(24, 3, 32, 32)).astype(np.float32)
    out = same_class_pseudo_anomalies(feats, seed=0)
    assert same_class_sides(32) == (8, 2, 1) and same_class_sides(8) == (2, 1)
    seen = set()
    for i in range(len(feats)):
        kind = SAME_CLASS_KINDS[i % 4]
        side = (8, 2, 1)[(i // 4) % 3]
        side = max(side, 2) if kind == "shuffle" else side
        changed = np.any(out[i] != feats[i], axis=0)
        ys, xs = np.nonzero(changed)
        assert 0 < changed.sum() <= side * side, (i, kind, side)
        assert ys.max() - ys.min() < side and xs.max() - xs.min() < side
        seen.add((kind, side))
    assert len(seen) == 11  # every kind at every size (a shuffle of one position is a 2x2 one)


def test_validation_metrics_are_deterministic_and_in_range():
    from types import SimpleNamespace

    from vpdm.training import engine

    cfg = VPDMConfig().with_overrides({**PRESETS["tiny"].fixed, "model.prototypes.num_prototypes": 3}).validate()
    rng = np.random.default_rng(0)
    val = rng.normal(size=(4, 40, 8, 8)).astype(np.float32)
    bundle = SimpleNamespace(
        val_features=val,
        val_anomalous=pseudo_anomalies(val, np.array([0, 0, 1, 1]), 0),
        val_t_uniform=rng.random(4),
        val_noise=rng.normal(size=val.shape).astype(np.float32),
        feature_shape=(40, 8, 8),
    )
    model = engine.build_model(cfg, torch.from_numpy(val))
    a = validation_metrics(model, bundle, cfg)
    b = validation_metrics(model, bundle, cfg)
    np.testing.assert_equal(a, b)  # NaN-aware
    assert 0.0 <= a["val_pseudo_auroc"] <= 1.0 and a["val_loss"] > 0
    assert math.isnan(a["val_same_class_auroc"])  # no same-class pseudo-defects in this bundle
    assert model.training  # restored to train mode for the next epoch

    # same-class pseudo-defects: unchanged copies tie with the originals (AUROC 1/2 exactly); copies with a
    # huge intensity change are all ranked above them (AUROC 1)
    bundle.val_same_class = val.copy()
    assert validation_metrics(model, bundle, cfg)["val_same_class_auroc"] == 0.5
    bundle.val_same_class = val * 50.0
    assert validation_metrics(model, bundle, cfg)["val_same_class_auroc"] == 1.0


# -- presets ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_validates(name):
    preset = get_preset(name)
    validate_space(VPDMConfig().with_overrides(dict(preset.fixed)), preset.space)
    assert preset.description and preset.trials >= 1 and preset.epochs >= 1


def test_issue_search_dimensions_and_ablations_are_covered():
    keys = set(PRESETS["paper"].space_keys())
    assert {
        "model.prototypes.num_prototypes",
        "model.prototypes.downsample",
        "model.diffusion.schedule",
        "model.diffusion.beta_start",
        "model.diffusion.beta_end",
        "model.diffusion.num_timesteps",
        "train.lr",
    } <= keys
    assert ABLATIONS["no-vague"][1] == {"model.prototypes.downsample": 1}
    assert ABLATIONS["nearest"][1] == {"model.prototypes.assignment": "nearest"}
    assert ABLATIONS["no-ot-loss"][1] == {"model.ot_weight": 0.0}
    assert ABLATIONS["ddpm-start"][1] == {"model.diffusion.shift_to_condition": False}
    pinned = get_preset("demo", "no-vague")
    assert pinned.fixed["model.prototypes.downsample"] == 1
    assert "model.prototypes.downsample" not in pinned.space_keys()
    assert "ablation-ddpm-start" in PRESETS


def test_search_syntax_round_trips():
    for item in ["a.b=int:2:9", "a.b=logint:4:64", "a.b=float:0:1", "a.b=log:0.0001:0.01", "a.b=choice:linear,cosine"]:
        dim = parse_dim(item)
        assert isinstance(dim, Dim) and parse_dim(f"a.b={dim.spec()}") == dim
    assert parse_dim("train.lr=off") == "train.lr"
    space = apply_search_overrides(PRESETS["tiny"].space, ["train.lr=off", "model.prototypes.num_prototypes=int:2:3"])
    keys = [d.key for d in space]
    assert "train.lr" not in keys and space[keys.index("model.prototypes.num_prototypes")].high == 3


@pytest.mark.parametrize(
    "edits, needle",
    [
        (["model.prototypes.num_prototypes=int:0:10"], "num_prototypes"),
        (["model.diffusion.beta_end=log:0.01:1.5"], "beta_end"),
        (["model.prototypes.downsample=choice:1,3"], "downsample"),
        (["model.diffusion.beta_start=log:0.001:0.1", "model.diffusion.beta_end=log:0.01:0.05"], "beta_start"),
        (["model.diffusion.num_timesteps=choice:2,50"], "num_steps"),
        (["backbone.image_size=choice:64,128"], "cannot be searched"),
        (["train.lr=log:0:0.1"], "low > 0"),
        (["train.lr=float:0.1:0.01"], "larger than high"),
        (["no.such.key=int:1:2"], "no.such.key"),
    ],
)
def test_out_of_range_search_bounds_are_refused_naming_the_setting(edits, needle):
    preset = PRESETS["tiny"]
    base = VPDMConfig().with_overrides(dict(preset.fixed))
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        validate_space(base, apply_search_overrides(preset.space, edits))


def test_dataset_arguments():
    assert parse_datasets(["demo"]) == [("demo", "demo")]
    assert parse_datasets(["mvtec:/d/mvtec/bottle,mpdd:/d/mpdd; visa:/v"]) == [
        ("mvtec-bottle+mpdd-mpdd", "mvtec:/d/mvtec/bottle,mpdd:/d/mpdd"),
        ("visa-v", "visa:/v"),
    ]
    assert parse_datasets(["b=mvtec:/x/bottle", "b=mvtec:/y/bottle"]) == [
        ("b", "mvtec:/x/bottle"),
        ("b-2", "mvtec:/y/bottle"),
    ]
    assert dataset_slug("demo:/data/abc/") == "demo-abc"


# -- bad input: a clear error before anything starts --------------------------------------------------


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    make_demo_dataset(root, classes=2, train_per_class=8, test_good_per_class=3, test_defect_per_class=3, size=64)
    return root


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize(
    "change, error, needle",
    [
        ({"preset": "no-such-preset"}, ConfigError, "unknown preset 'no-such-preset'"),
        ({"search": ["model.prototypes.num_prototypes=int:0:8"]}, ConfigError, "num_prototypes"),
        ({"tracking_uri": "http://127.0.0.1:{port}"}, VPDMError, "unreachable"),
        ({"datasets": ["mvtec:/definitely/not/here"]}, DataError, "/definitely/not/here"),
        ({"workers": 0}, ConfigError, "workers"),
        ({"reduction_factor": float("nan")}, ConfigError, "reduction_factor must be a finite number, got nan"),
        ({"reduction_factor": float("inf")}, ConfigError, "reduction_factor must be a finite number, got inf"),
        ({"num_cpus": -2}, ConfigError, "num_cpus must be an integer >= 1, got -2"),
        ({"overrides": ["train.weight_decay=nan"]}, ConfigError, "train.weight_decay must be a finite number"),
        ({"metric": "accuracy"}, ConfigError, "accuracy"),
        ({"resume": True}, ConfigError, "--resume needs --experiment"),
        ({"resume": True, "experiment": "never-ran"}, VPDMError, "no saved sweep"),
    ],
)
def test_bad_input_is_refused_before_any_trial(change, error, needle, tiny_demo, tmp_path):
    import ray

    change = {
        k: (
            [x.format(port=_closed_port()) for x in v]
            if isinstance(v, list)
            else v.format(port=_closed_port())
            if isinstance(v, str)
            else v
        )
        for k, v in change.items()
    }
    sc = SweepConfig(
        datasets=[f"demo:{tiny_demo}"],
        preset="tiny",
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        storage=str(tmp_path / "runs"),
        verbose=0,
    )
    for key, value in change.items():
        setattr(sc, key, value)
    with pytest.raises(error, match=needle.replace("(", r"\(").replace(".", r"\.")):
        run_sweep(sc, progress=False)
    assert not ray.is_initialized()  # no cluster, hence no trial, was started
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    if (tmp_path / "mlflow.db").exists():  # the probe may create the store, but no experiment in it
        from mlflow import MlflowClient

        names = [e.name for e in MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_experiments()]
        assert names == ["Default"]


def test_an_existing_experiment_is_not_reused(tiny_demo, tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(uri).create_experiment("taken")
    sc = SweepConfig(
        datasets=[f"demo:{tiny_demo}"],
        preset="tiny",
        tracking_uri=uri,
        experiment="taken",
        storage=str(tmp_path / "runs"),
    )
    with pytest.raises(VPDMError, match="already has an experiment named 'taken'"):
        plan_sweep(sc)


def test_unwritable_storage_is_named(tiny_demo, tmp_path):
    (tmp_path / "blocker").write_text("a file")
    storage = tmp_path / "blocker" / "runs"
    sc = SweepConfig(
        datasets=[f"demo:{tiny_demo}"],
        preset="tiny",
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        storage=str(storage),
    )
    with pytest.raises(VPDMError) as info:
        plan_sweep(sc)
    assert str(info.value) == (
        f"cannot write storage folder {str(storage)!r}: {str(tmp_path / 'blocker')!r} is a file, not a folder"
    )


def test_plan_resolves_the_embedded_defaults(tiny_demo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    plan = plan_sweep(
        SweepConfig(
            datasets=[f"demo:{tiny_demo}"], preset="tiny", overrides=["train.lr=0.005", "model.denoiser.width=8"]
        )
    )
    assert plan.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"  # sqlite:///mlflow.db in the cwd, made absolute
    assert "train.lr" not in [d.key for d in plan.space.space]  # pinned by --set
    assert plan.space.base.train.lr == 0.005 and plan.space.base.model.denoiser.width == 8
    assert plan.storage == (tmp_path / "runs" / "sweeps") and plan.metric == "val_pseudo_auroc" and plan.mode == "max"
    assert [d.model_name for d in plan.datasets] == [f"vpdm-demo-{tiny_demo.name}"]  # one registered model per dataset


def test_cli_help_and_bad_input_exit_code(tiny_demo, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "sweep_cli", Path(__file__).resolve().parents[1] / "jobs" / "sweep.py"
    )
    sweep_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep_cli)
    with pytest.raises(SystemExit) as exc:
        sweep_cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for word in (
        "--data",
        "--preset",
        "--trials",
        "--workers",
        "--tracking-uri",
        "ray job submit",
        "champion",
        "--promote",
        "challenger",
    ):
        assert word in out
    assert sweep_cli.main(["--list-presets"]) == 0
    assert "ablation-no-vague" in capsys.readouterr().out
    code = sweep_cli.main(
        [
            "--data",
            f"demo:{tiny_demo}",
            "--preset",
            "nope",
            "--storage",
            str(tmp_path / "r"),
            "--tracking-uri",
            f"sqlite:///{tmp_path}/m.db",
        ]
    )
    assert code == 2 and "sweep: error: unknown preset 'nope'" in capsys.readouterr().err


def test_runs_left_running_by_stopped_trials_are_closed(tmp_path):
    """ASHA kills a stopped trial with its Train run; the driver closes its MLflow run afterwards."""
    from mlflow import MlflowClient

    from tune.sweep import _close_unfinished_runs
    from tune.tracking import RunLogger, create_experiment

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp = create_experiment(uri, "stopped")
    stopped = RunLogger.start(uri, exp, "d_1", {"vpdm.dataset": "d"})
    finished = RunLogger.start(uri, exp, "d_2", {"vpdm.dataset": "d"})
    finished.finish("FINISHED")
    other = RunLogger.start(uri, exp, "e_1", {"vpdm.dataset": "e"})
    # the race: Tune stopped d_3, but its trial's handler saw the Train run raise and closed the run as FAILED
    raced = RunLogger.start(uri, exp, "d_3", {"vpdm.dataset": "d"})
    raced.set_tags({"vpdm.status": "failed", "vpdm.error": "actor died"})
    raced.finish("FAILED")
    failed = RunLogger.start(uri, exp, "d_4", {"vpdm.dataset": "d"})  # a trial that really failed
    failed.finish("FAILED")
    _close_unfinished_runs(uri, exp, "d", stopped={"d_1", "d_3"})
    client = MlflowClient(uri)
    assert client.get_run(stopped.run_id).info.status == "KILLED"
    assert "stopped early" in client.get_run(stopped.run_id).data.tags["vpdm.status"]
    assert client.get_run(raced.run_id).info.status == "KILLED"
    assert client.get_run(raced.run_id).data.tags["vpdm.error"] == "actor died"  # what it said is kept
    assert client.get_run(failed.run_id).info.status == "FAILED"
    assert client.get_run(finished.run_id).info.status == "FINISHED"
    assert client.get_run(other.run_id).info.status == "RUNNING"
    assert create_experiment.__doc__ and client.get_experiment(exp).artifact_location.startswith("file://")


def test_tracking_failures_only_warn(caplog):
    from tune.tracking import RunLogger

    log = RunLogger("sqlite:////nonexistent-folder/x.db", "no-such-run")
    log.attempts = 2
    with caplog.at_level("WARNING"):
        log.log_metrics({"loss": 1.0}, step=1)  # must not raise
    assert "MLflow: logging metrics failed" in caplog.text


def test_a_local_ray_is_started_on_loopback_and_a_cluster_is_joined_as_it_is(monkeypatch, tmp_path):
    """What start_ray asks of Ray (the real binding is checked on a real Ray in test_sweep_ray.py)."""
    import os

    import ray
    from ray._private import ray_constants

    from tune.cluster import start_ray

    calls = []

    def fake_init(**kwargs):
        calls.append(
            {
                "kwargs": kwargs,
                "env": os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"),
                "cluster_mode": ray_constants.ENABLE_RAY_CLUSTER,
            }
        )

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    before = ray_constants.ENABLE_RAY_CLUSTER
    start_ray(SweepConfig(num_cpus=2, dashboard=False, ray_temp_dir=str(tmp_path)))
    (local,) = calls
    assert local["kwargs"]["_node_ip_address"] == "127.0.0.1" and local["kwargs"]["dashboard_host"] == "127.0.0.1"
    assert local["env"] == "0" and local["cluster_mode"] is False  # Ray keeps 127.0.0.1 only in this mode
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ and ray_constants.ENABLE_RAY_CLUSTER == before
    start_ray(SweepConfig(address="ray://head:10001"))
    assert calls[1]["kwargs"] == {"address": "ray://head:10001", "log_to_driver": False}  # Ray's output: its logs
    assert calls[1]["cluster_mode"] == before  # joining a cluster: Ray's own addressing
    assert local["kwargs"]["log_to_driver"] is False
    start_ray(SweepConfig(address="ray://head:10001", verbose=2))  # --verbose: every Ray process's output here too
    assert calls[2]["kwargs"]["log_to_driver"] is True


def test_the_pause_hook_stops_the_chosen_trial_once_until_released(tmp_path, monkeypatch):
    """The fault tests' pause (tune.distributed._maybe_pause): marker first, then wait for the release file."""
    import threading
    import time

    from tune.distributed import _maybe_pause

    monkeypatch.setenv("VPDM_FAULT_PAUSE_AFTER_EPOCH", "1")
    monkeypatch.setenv("VPDM_FAULT_PAUSE_TRIALS", "2")
    monkeypatch.setenv("VPDM_FAULT_MARKER_DIR", str(tmp_path))
    monkeypatch.setenv("VPDM_FAULT_PAUSE_TIMEOUT_S", "600")
    _maybe_pause(1, 0, "trial-a")  # the first trial to arrive is not chosen: returns at once
    _maybe_pause(2, 0, "trial-b")  # another epoch
    _maybe_pause(1, 1, "trial-b")  # another rank
    assert not list(tmp_path.glob("*.paused"))
    done = threading.Event()
    worker = threading.Thread(target=lambda: (_maybe_pause(1, 0, "trial-b"), done.set()), daemon=True)
    worker.start()
    deadline = time.monotonic() + 600
    while not (tmp_path / "trial-b.paused").exists():  # event: the trial says it has stopped
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert not done.wait(0.5)  # stopped until released
    (tmp_path / "release").write_text("go")
    assert done.wait(600)
    _maybe_pause(1, 0, "trial-b")  # once per trial: a resumed trial does not stop again
