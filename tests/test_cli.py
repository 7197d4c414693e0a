"""The ``vpdm`` command end to end on a tiny synthetic set, and its refusals of bad input."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.images import declared_size_png, png_bytes
from tests.test_io import file_size_limit
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
    with Image.open(src[1]) as im:
        gray = np.asarray(im.convert("RGB"))[..., 1].copy()
    (images / "gray16.png").write_bytes(png_bytes(gray.astype(np.uint16) * 257))  # 16-bit, v * 257 -> exactly v
    (images / "gray8.png").write_bytes(png_bytes(gray))
    (images / "tiny.png").write_bytes(png_bytes(np.zeros((2, 3, 3), np.uint8)))
    (images / "bomb.png").write_bytes(declared_size_png(20000, 20000))
    out = tmp_path / "scored"
    code = main(["predict", "--checkpoint", str(trained / "model.pt"), "--images", str(images), "--output", str(out),
                 "--no-progress"])
    assert code == 0
    rows = {Path(r["path"]).name: r for r in csv.DictReader(open(out / "scores.csv"))}
    assert len(rows) == 8
    for name, needle in [("broken.png", "cannot decode image"), ("tiny.png", "3x2 pixels is too small"),
                         ("bomb.png", "refused, too large")]:
        assert rows[name]["score"] == "" and rows[name]["overlay"] == "", name
        assert str(images / name) in rows[name]["error"] and needle in rows[name]["error"], rows[name]["error"]
    good = [r for r in rows.values() if r["score"]]
    assert len(good) == 5 and all((out / r["overlay"]).is_file() and not r["error"] for r in good)
    assert float(rows["gray16.png"]["score"]) == pytest.approx(float(rows["gray8.png"]["score"]), abs=1e-5)


def test_predict_overlays_of_same_named_images_in_two_folders_are_kept_apart(trained, tiny_demo, tmp_path):
    """in/a/x.png and in/b/x.png: each row links its own overlay, named by the relative path like jobs/score.py."""
    from vpdm.data import AnomalyDataset, Sample
    from vpdm.pipeline import Detector
    from vpdm.plots import overlay_array

    images = tmp_path / "in"
    sources = {"a": sorted((tiny_demo / "grid" / "test").rglob("*.png"))[0],
               "b": sorted((tiny_demo / "blobs" / "test").rglob("*.png"))[-1]}
    for sub, src in sources.items():
        (images / sub).mkdir(parents=True)
        (images / sub / "x.png").write_bytes(src.read_bytes())
    out = tmp_path / "scored"
    assert main(["predict", "--checkpoint", str(trained / "model.pt"), "--images", str(images), "--output", str(out),
                 "--no-progress"]) == 0
    rows = {Path(r["path"]).parent.name: r for r in csv.DictReader(open(out / "scores.csv"))}
    assert {k: r["overlay"] for k, r in rows.items()} == {"a": "overlays/a__x.png", "b": "overlays/b__x.png"}
    # the overlay each row links is the one of its own image (recomputed here from the library's maps)
    detector = Detector.from_checkpoint(trained / "model.pt")
    preds = detector.predict_files([images / "a" / "x.png", images / "b" / "x.png"], progress=False)
    vmax = float(np.quantile(np.stack([p.anomaly_map for p in preds]), 0.999))
    for sub, pred in zip("ab", preds):
        rgb = AnomalyDataset([Sample(Path(pred.path), None, 0, "p", "u")], image_size=detector.map_size).raw_image(0)
        with Image.open(out / rows[sub]["overlay"]) as im:
            assert np.array_equal(np.asarray(im), overlay_array(rgb, pred.anomaly_map, vmax=vmax)), sub


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


def test_unwritable_output_exits_2_naming_the_path(trained, tiny_demo, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the run folder should go")
    out = blocker / "run"
    code = main(["train", "--data", f"demo:{tiny_demo}", "--output", str(out), "--no-progress", *TINY])
    assert code == 2
    assert capsys.readouterr().err.strip() == (f"vpdm train: error: cannot write output folder {str(out)!r}: "
                                               f"{str(blocker)!r} is a file, not a folder")
    images = sorted((tiny_demo / "grid" / "test").rglob("*.png"))[0]
    code = main(["predict", "--checkpoint", str(trained / "model.pt"), "--images", str(images), "--output", str(blocker),
                 "--no-progress"])
    assert code == 2
    assert f"cannot write output folder {str(blocker)!r}: {str(blocker)!r} is a file, not a folder" in capsys.readouterr().err
    assert blocker.read_text() == "a file where the run folder should go"


def test_train_over_the_file_size_limit_keeps_the_old_model(tiny_demo, tmp_path):
    """A real EFBIG (RLIMIT_FSIZE): the feature cache is skipped with a warning, the checkpoint write fails with
    exit code 2 naming model.pt, the model.pt already there survives and no temporary file is left."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    out.mkdir()
    (out / "model.pt").write_bytes(b"the previous model")
    proc = subprocess.run(
        [sys.executable, "-m", "vpdm.cli", "train", "--data", f"demo:{tiny_demo}", "--output", str(out), "--overwrite",
         "--epochs", "1", "--no-progress", "--set", f"data.cache_dir={cache}", *TINY],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
        preexec_fn=file_size_limit(256 * 1024))  # the cache (~0.8 MB) and the checkpoint (~1.7 MB) are bigger
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "cannot write feature cache" in proc.stderr and "file too large (EFBIG)" in proc.stderr
    assert f"vpdm train: error: cannot write checkpoint {str(out / 'model.pt')!r}: file too large (EFBIG)" in proc.stderr
    assert (out / "model.pt").read_bytes() == b"the previous model"
    assert sorted(p.name for p in out.iterdir()) == ["model.pt"]
    assert not cache.exists() or not any(cache.iterdir())


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
