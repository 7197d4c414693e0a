"""The ``vpdm`` command end to end on a tiny synthetic set, and its refusals of bad input."""

import csv
import json
import sys

import pytest
import torch

from vpdm.cli import main

# Random-init Lite0 at 64 px: exercises every code path in seconds (quality is the benchmark's job).
TINY = [
    "--set", "backbone.name=tf_efficientnet_lite0", "--set", "backbone.weights=none",
    "--set", "backbone.image_size=64", "--set", "backbone.feature_size=8",
    "--set", "model.prototypes.num_prototypes=4", "--set", "model.prototypes.downsample=2",
    "--set", "model.diffusion.num_timesteps=50", "--set", "model.denoiser.width=16",
    "--set", "model.denoiser.groups=4", "--set", "sampling.num_steps=3", "--set", "train.batch_size=8",
    "--set", "scoring.pool_size=4", "--set", "scoring.blur_sigma=1.0",
]


@pytest.fixture(scope="module")
def trained(tiny_demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cache = tmp_path_factory.mktemp("cache")
    code = main(["train", "--data", f"demo:{tiny_demo}", "--output", str(out), "--epochs", "2", "--no-progress",
                 "--evaluate", "--set", f"data.cache_dir={cache}", *TINY])
    assert code == 0
    return out


def test_train_writes_model_config_history_and_metrics(trained):
    for name in ("model.pt", "config.yaml", "history.json", "metrics.json"):
        assert (trained / name).is_file(), name
    history = json.loads((trained / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    metrics = json.loads((trained / "metrics.json").read_text())["metrics"]
    assert set(metrics["per_class"]) == {"demo/blobs", "demo/grid"}
    for key in ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "image_f1_max"):
        assert 0.0 <= metrics["mean"][key] <= 1.0


def test_evaluate_prints_and_writes_json_and_plots(trained, tiny_demo, tmp_path, capsys):
    out = tmp_path / "m.json"
    code = main(["evaluate", "--checkpoint", str(trained / "model.pt"), "--output", str(out), "--plots",
                 str(tmp_path / "plots"), "--no-progress"])
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["num_images"] == 12
    printed = capsys.readouterr().out
    assert "demo/grid" in printed and "image_auroc" in printed
    assert (tmp_path / "plots" / "roc.png").stat().st_size > 1000
    assert len(list((tmp_path / "plots").glob("demo_*.png"))) >= 2
    # Same checkpoint, same data -> same numbers as the evaluation right after training.
    first = json.loads((trained / "metrics.json").read_text())["metrics"]["mean"]
    assert doc["metrics"]["mean"] == pytest.approx(first)


def test_predict_scores_a_folder_and_marks_bad_files(trained, tiny_demo, tmp_path):
    images = tmp_path / "incoming"
    images.mkdir()
    src = sorted((tiny_demo / "grid" / "test").rglob("*.png"))[:3]
    for p in src:
        (images / p.name.replace(".png", f"_{p.parent.name}.png")).write_bytes(p.read_bytes())
    (images / "broken.png").write_bytes(src[0].read_bytes()[:200])
    out = tmp_path / "scored"
    code = main(["predict", "--checkpoint", str(trained / "model.pt"), "--images", str(images), "--output", str(out),
                 "--no-progress"])
    assert code == 0
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert len(rows) == 4
    bad = [r for r in rows if r["path"].endswith("broken.png")][0]
    assert bad["score"] == "" and "broken.png" in bad["error"]
    good = [r for r in rows if r["score"]]
    assert len(good) == 3 and all((out / r["overlay"]).is_file() for r in good)


def test_predict_score_matches_evaluate_score(trained, tiny_demo):
    """The deployed image path (files -> Detector) and the evaluation path (cached features) agree."""
    from vpdm import engine
    from vpdm.checkpoint import load_checkpoint
    from vpdm.pipeline import Detector

    model, config, _ = load_checkpoint(trained / "model.pt")
    test = engine.load_split(config, "test", progress=False)
    result = engine.evaluate(model, config, test, progress=False)
    detector = Detector.from_checkpoint(trained / "model.pt")
    preds = detector.predict_files([s.image_path for s in test.dataset.samples[:4]], progress=False)
    torch.testing.assert_close(torch.tensor([p.score for p in preds]), torch.tensor(result.scores[:4]), rtol=1e-4, atol=1e-5)


def test_existing_model_is_not_overwritten(trained, tiny_demo, capsys):
    before = (trained / "model.pt").read_bytes()
    code = main(["train", "--data", f"demo:{tiny_demo}", "--output", str(trained), "--epochs", "1", "--no-progress", *TINY])
    assert code == 2
    assert "already exists" in capsys.readouterr().err
    assert (trained / "model.pt").read_bytes() == before


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--data", "nosuchkind:/x"], "nosuchkind"),
        (["--data", "mvtec:/definitely/not/here"], "/definitely/not/here"),
        (["--set", "model.prototypes.num_prototypes=0"], "num_prototypes"),
        (["--set", "model.prototypes.downsample=3"], "downsample=3"),
        (["--set", "model.diffusion.num_timesteps=1"], "num_timesteps"),
        (["--backbone", "resnet_does_not_exist"], "resnet_does_not_exist"),
    ],
)
def test_bad_input_fails_fast_with_a_named_error(args, needle, tmp_path, capsys, tiny_demo):
    base = ["train", "--output", str(tmp_path / "out"), "--no-progress", "--data", f"demo:{tiny_demo}"]
    code = main(base + TINY + args)
    err = capsys.readouterr().err
    assert code == 2 and "error" in err and needle in err, err
    assert not (tmp_path / "out" / "model.pt").exists()


def test_foreign_checkpoint_is_refused(tmp_path, capsys):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, path)
    assert main(["evaluate", "--checkpoint", str(path), "--no-progress"]) == 2
    assert "not a vpdm checkpoint" in capsys.readouterr().err


def test_console_script_is_installed():
    import shutil
    import subprocess

    exe = shutil.which("vpdm") or str(__import__("pathlib").Path(sys.executable).with_name("vpdm"))
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "train" in out.stdout and "predict" in out.stdout


def test_core_library_imports_no_ray_or_mlflow():
    import subprocess

    code = "import vpdm, vpdm.cli, vpdm.engine, vpdm.pipeline, sys; " \
           "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow')]; assert not bad, bad"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
