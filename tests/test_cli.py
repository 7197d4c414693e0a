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
from vpdm.cli.commands import main

# Random-init Lite0 at 64 px: exercises every code path in seconds (quality is the benchmark's job).
TINY = [
    "--set",
    "backbone.name=tf_efficientnet_lite0",
    "--set",
    "backbone.weights=none",
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
    "sampling.num_steps=3",
    "--set",
    "train.batch_size=8",
    "--set",
    "scoring.pool_size=4",
    "--set",
    "scoring.blur_sigma=1.0",
]
# Bound on child processes: generous, so that a machine loaded by other jobs is slow, not failing.
PATIENCE_S = 1800


@pytest.fixture(scope="module")
def trained(tiny_demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cache = tmp_path_factory.mktemp("cache")
    code = main(
        [
            "train",
            "--data",
            f"demo:{tiny_demo}",
            "--output",
            str(out),
            "--epochs",
            "2",
            "--no-progress",
            "--evaluate",
            "--set",
            f"data.cache_dir={cache}",
            *TINY,
        ]
    )
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
    code = main(
        [
            "evaluate",
            "--checkpoint",
            str(trained / "model.pt"),
            "--output",
            str(out),
            "--plots",
            str(tmp_path / "plots"),
            "--no-progress",
        ]
    )
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
    code = main(
        [
            "predict",
            "--checkpoint",
            str(trained / "model.pt"),
            "--images",
            str(images),
            "--output",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    rows = {Path(r["path"]).name: r for r in csv.DictReader(open(out / "scores.csv"))}
    assert len(rows) == 8
    for name, needle in [
        ("broken.png", "cannot decode image"),
        ("tiny.png", "3x2 pixels is too small"),
        ("bomb.png", "refused, too large"),
    ]:
        assert rows[name]["score"] == "" and rows[name]["overlay"] == "", name
        assert str(images / name) in rows[name]["error"] and needle in rows[name]["error"], rows[name]["error"]
    good = [r for r in rows.values() if r["score"]]
    assert len(good) == 5 and all((out / r["overlay"]).is_file() and not r["error"] for r in good)
    assert float(rows["gray16.png"]["score"]) == pytest.approx(float(rows["gray8.png"]["score"]), abs=1e-5)


def test_predict_overlays_of_same_named_images_in_two_folders_are_kept_apart(trained, tiny_demo, tmp_path):
    """in/a/x.png and in/b/x.png: each row links its own overlay, named by the relative path like jobs/score.py."""
    from vpdm.data.dataset import AnomalyDataset
    from vpdm.data.layouts import Sample
    from vpdm.evaluation.plots import overlay_array
    from vpdm.inference.detector import Detector

    images = tmp_path / "in"
    sources = {
        "a": sorted((tiny_demo / "grid" / "test").rglob("*.png"))[0],
        "b": sorted((tiny_demo / "blobs" / "test").rglob("*.png"))[-1],
    }
    for sub, src in sources.items():
        (images / sub).mkdir(parents=True)
        (images / sub / "x.png").write_bytes(src.read_bytes())
    out = tmp_path / "scored"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(trained / "model.pt"),
                "--images",
                str(images),
                "--output",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    rows = {Path(r["path"]).parent.name: r for r in csv.DictReader(open(out / "scores.csv"))}
    assert {k: r["overlay"] for k, r in rows.items()} == {"a": "overlays/a__x.png", "b": "overlays/b__x.png"}
    # the overlay each row links is the one of its own image (recomputed here from the library's maps), on the
    # fixed colour scale: 0 to the highest map value of the calibration images
    detector = Detector.from_checkpoint(trained / "model.pt")
    preds = detector.predict_files([images / "a" / "x.png", images / "b" / "x.png"], progress=False)
    vmax = max(t.pixel_max for t in detector.calibration.classes.values())
    for sub, pred in zip("ab", preds):
        rgb = AnomalyDataset([Sample(Path(pred.path), None, 0, "p", "u")], image_size=detector.map_size).raw_image(0)
        with Image.open(out / rows[sub]["overlay"]) as im:
            assert np.array_equal(np.asarray(im), overlay_array(rgb, pred.anomaly_map, vmax=vmax)), sub


def test_predict_score_matches_evaluate_score(trained, tiny_demo):
    """The deployed image path (files -> Detector) and the evaluation path (cached features) agree."""
    from vpdm.evaluation import evaluator
    from vpdm.inference.checkpoint import load_checkpoint
    from vpdm.inference.detector import Detector
    from vpdm.training import engine

    model, config, _ = load_checkpoint(trained / "model.pt")
    test = engine.load_split(config, "test", progress=False)
    result = evaluator.evaluate(model, config, test, progress=False)
    detector = Detector.from_checkpoint(trained / "model.pt")
    preds = detector.predict_files([s.image_path for s in test.dataset.samples[:4]], progress=False)
    torch.testing.assert_close(
        torch.tensor([p.score for p in preds]), torch.tensor(result.scores[:4]), rtol=1e-4, atol=1e-5
    )


def test_existing_model_is_not_overwritten(trained, tiny_demo, capsys):
    before = (trained / "model.pt").read_bytes()
    code = main(
        ["train", "--data", f"demo:{tiny_demo}", "--output", str(trained), "--epochs", "1", "--no-progress", *TINY]
    )
    assert code == 2
    assert f"checkpoint {str(trained / 'model.pt')!r} exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert (trained / "model.pt").read_bytes() == before


def test_unwritable_output_exits_2_naming_the_path(trained, tiny_demo, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the run folder should go")
    out = blocker / "run"
    code = main(["train", "--data", f"demo:{tiny_demo}", "--output", str(out), "--no-progress", *TINY])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"vpdm train: error: cannot write output folder {str(out)!r}: {str(blocker)!r} is a file, not a folder"
    )
    images = sorted((tiny_demo / "grid" / "test").rglob("*.png"))[0]
    code = main(
        [
            "predict",
            "--checkpoint",
            str(trained / "model.pt"),
            "--images",
            str(images),
            "--output",
            str(blocker),
            "--no-progress",
        ]
    )
    assert code == 2
    assert (
        f"cannot write output folder {str(blocker)!r}: {str(blocker)!r} is a file, not a folder"
        in capsys.readouterr().err
    )
    assert blocker.read_text() == "a file where the run folder should go"


def test_train_over_the_file_size_limit_keeps_the_old_model(tiny_demo, tmp_path):
    """A real EFBIG (RLIMIT_FSIZE): the feature cache is skipped with a warning, the checkpoint write fails with
    exit code 2 naming model.pt, the model.pt already there survives and no temporary file is left."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    out.mkdir()
    (out / "model.pt").write_bytes(b"the previous model")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vpdm.cli",
            "train",
            "--data",
            f"demo:{tiny_demo}",
            "--output",
            str(out),
            "--overwrite",
            "--epochs",
            "1",
            "--no-progress",
            "--set",
            f"data.cache_dir={cache}",
            *TINY,
        ],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=PATIENCE_S,
        preexec_fn=file_size_limit(256 * 1024),
    )  # the cache (~0.8 MB) and the checkpoint (~1.7 MB) are bigger
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "cannot write feature cache" in proc.stderr and "file too large (EFBIG)" in proc.stderr
    assert (
        f"vpdm train: error: cannot write checkpoint {str(out / 'model.pt')!r}: file too large (EFBIG)" in proc.stderr
    )
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


def _pickled_payload(path: Path, marker: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"format": "vpdm.inference.checkpoint", "version": 1, "state_dict": Payload()}, path)


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("random bytes", "it is not a PyTorch checkpoint archive"),
        ("plain text", "it is not a PyTorch checkpoint archive"),
        ("empty file", "the file is empty"),
        ("pickled objects", "it is a PyTorch archive that holds Python objects a vpdm checkpoint never contains"),
    ],
)
def test_an_unloadable_checkpoint_is_named_in_our_words_never_with_unsafe_advice(kind, reason, tmp_path, capsys):
    import os

    path, marker = tmp_path / "model.pt", tmp_path / "ran"
    if kind == "random bytes":
        path.write_bytes(os.urandom(4096))
    elif kind == "plain text":
        path.write_text("hello, not a checkpoint")
    elif kind == "empty file":
        path.write_bytes(b"")
    else:
        _pickled_payload(path, marker)
    for command in (
        ["evaluate", "--checkpoint", str(path)],
        ["predict", "--checkpoint", str(path), "--images", str(path), "--output", str(tmp_path / "o")],
    ):
        assert main(command + ["--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"error: {str(path)!r} is not a vpdm checkpoint: {reason}" in err, err
        assert "weights_only" not in err and "False" not in err and "Traceback" not in err
    assert not marker.exists()  # the payload never ran


def test_a_checkpoint_of_the_wrong_shape_names_the_tensors_that_differ(trained, tmp_path, capsys):
    payload = torch.load(trained / "model.pt", weights_only=True)
    # a weight (the per-class statistics are resized from the checkpoint, one row per class it knows)
    key = next(k for k, v in payload["state_dict"].items() if v.ndim == 2 and not k.startswith("term_"))
    shape = tuple(payload["state_dict"][key].shape)
    payload["state_dict"][key] = torch.zeros(shape[0] + 1, shape[1])
    payload["state_dict"]["extra.weight"] = torch.zeros(1)
    torch.save(payload, tmp_path / "model.pt")
    assert main(["evaluate", "--checkpoint", str(tmp_path / "model.pt"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    expected = "x".join(map(str, shape))
    assert (
        f"does not match the model its settings describe: tensors of another shape: {key} (checkpoint "
        f"{shape[0] + 1}x{shape[1]}, model {expected}); unexpected: extra.weight"
    ) in err, err


def test_a_folder_given_as_checkpoint_is_called_a_folder(trained, capsys):
    assert main(["evaluate", "--checkpoint", str(trained), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {str(trained)!r} is a folder, not a file" in err
    assert f"did you mean {str(trained / 'model.pt')!r}?" in err


def test_console_script_is_installed():
    import shutil
    import subprocess

    exe = shutil.which("vpdm") or str(__import__("pathlib").Path(sys.executable).with_name("vpdm"))
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=PATIENCE_S)
    assert out.returncode == 0 and "train" in out.stdout and "predict" in out.stdout


def test_core_library_imports_no_ray_or_mlflow():
    import subprocess

    code = (
        "import vpdm, vpdm.cli.commands, vpdm.training.engine, vpdm.inference.detector, sys; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow')]; assert not bad, bad"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=PATIENCE_S).returncode == 0


# --------------------------------------------------------------------------------------------
# everything a command needs is checked before the first image goes through the backbone
# --------------------------------------------------------------------------------------------


def _images_seen() -> int:
    from vpdm.features.backbone import total_images_seen

    return total_images_seen()


def _copy_category(src: Path, dst: Path, *, test: bool = True) -> Path:
    """A folder: copy of one demo class (train/good, and test/ + ground_truth/ unless test=False)."""
    import shutil

    shutil.copytree(src / "train", dst / "train")
    if test:
        shutil.copytree(src / "test", dst / "test")
        shutil.copytree(src / "ground_truth", dst / "ground_truth")
    return dst


@pytest.mark.parametrize("fault", ["no test folder", "mask of the wrong size"])
def test_train_evaluate_checks_the_test_split_before_extracting(fault, tiny_demo, tmp_path, capsys):
    part = _copy_category(tiny_demo / "grid", tmp_path / "part", test=fault != "no test folder")
    if fault == "mask of the wrong size":
        mask = sorted((part / "ground_truth").rglob("*_mask.png"))[0]
        Image.fromarray(np.zeros((20, 20), np.uint8)).save(mask)
        needle = str(mask)
    else:
        needle = str(part / "test")
    seen = _images_seen()
    code = main(
        [
            "train",
            "--data",
            f"folder:{part}",
            "--output",
            str(tmp_path / "out"),
            "--epochs",
            "1",
            "--evaluate",
            "--no-progress",
            "--set",
            f"data.cache_dir={tmp_path / 'cache'}",
            *TINY,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and needle in err, err
    assert _images_seen() == seen  # refused before any feature was extracted
    assert not (tmp_path / "out" / "model.pt").exists()


def test_train_on_a_missing_cuda_device_fails_before_extracting(tiny_demo, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without CUDA, also on a GPU runner
    seen = _images_seen()
    code = main(
        [
            "train",
            "--data",
            f"demo:{tiny_demo}",
            "--output",
            str(tmp_path / "out"),
            "--epochs",
            "1",
            "--no-progress",
            "--set",
            f"data.cache_dir={tmp_path / 'cache'}",
            *TINY,
            "--set",
            "train.device=cuda",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "train.device='cuda' but no CUDA device is available" in err, err
    assert _images_seen() == seen


def _unwritable_dir(tmp_path: Path) -> Path:
    """A folder nobody can create files in: read-only for a normal user; root needs /proc (Linux)."""
    import os

    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o500)
        return folder
    if not Path("/proc/self").is_dir():
        pytest.skip("running as root without /proc: no folder is unwritable")
    return Path("/proc")


@pytest.mark.parametrize(
    "case", ["--output is a folder", "--output below a file", "--output unwritable", "--plots is a file"]
)
def test_evaluate_checks_its_outputs_before_extracting(case, trained, tmp_path, capsys):
    (tmp_path / "blocker").write_text("a file")
    metrics, plots = tmp_path / "m.json", None
    if case == "--output is a folder":
        metrics = tmp_path / "folder"
        metrics.mkdir()
        needle = f"cannot write metrics {str(metrics)!r}: it is a folder"
    elif case == "--output below a file":
        metrics = tmp_path / "blocker" / "m.json"
        needle = f"cannot write metrics {str(metrics)!r}: {str(tmp_path / 'blocker')!r} is a file, not a folder"
    elif case == "--output unwritable":
        metrics = _unwritable_dir(tmp_path) / "vpdm-metrics.json"
        needle = f"cannot write metrics {str(metrics)!r}"
    else:
        plots = tmp_path / "blocker"
        needle = f"cannot write plots folder {str(plots)!r}"
    seen = _images_seen()
    argv = [
        "evaluate",
        "--checkpoint",
        str(trained / "model.pt"),
        "--output",
        str(metrics),
        "--no-progress",
        "--set",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]  # a fresh cache: the old code extracted first
    code = main(argv + (["--plots", str(plots)] if plots else []))
    err = capsys.readouterr().err
    assert code == 2 and needle in err, err
    assert _images_seen() == seen
    assert (tmp_path / "blocker").read_text() == "a file"


@pytest.fixture()
def thread_probe(monkeypatch):
    """Records torch's intra-op thread count at every backbone forward and every model scoring call (VPDM.detect, the inference path)."""
    from vpdm.features.backbone import FeatureExtractor
    from vpdm.model.vpdm_model import VPDM

    seen: dict[str, list[int]] = {"backbone": [], "model": []}
    forward, maps = FeatureExtractor.forward, VPDM.detect

    def probe_forward(self, images):
        seen["backbone"].append(torch.get_num_threads())
        return forward(self, images)

    def probe_maps(self, *a, **k):
        seen["model"].append(torch.get_num_threads())
        return maps(self, *a, **k)

    monkeypatch.setattr(FeatureExtractor, "forward", probe_forward)
    monkeypatch.setattr(VPDM, "detect", probe_maps)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # what the process had before; train.threads=1 must hold in every phase
    yield seen
    torch.set_num_threads(before)


def test_train_threads_holds_for_extraction_evaluation_and_prediction(thread_probe, trained, tiny_demo, tmp_path):
    one = ["--set", "train.threads=1", "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    assert (
        main(
            [
                "train",
                "--data",
                f"demo:{tiny_demo}",
                "--output",
                str(tmp_path / "run"),
                "--epochs",
                "1",
                "--no-progress",
                *TINY,
                *one,
            ]
        )
        == 0
    )
    assert thread_probe["backbone"] and set(thread_probe["backbone"]) == {1}
    for phase in thread_probe.values():
        phase.clear()
    torch.set_num_threads(2)
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(trained / "model.pt"),
                "--output",
                str(tmp_path / "m.json"),
                "--no-progress",
                "--set",
                f"data.cache_dir={tmp_path / 'cache2'}",
                "--set",
                "train.threads=1",
            ]
        )
        == 0
    )
    assert thread_probe["backbone"] and thread_probe["model"]
    assert set(thread_probe["backbone"]) == set(thread_probe["model"]) == {1}
    for phase in thread_probe.values():
        phase.clear()
    torch.set_num_threads(2)
    image = sorted((tiny_demo / "grid" / "test").rglob("*.png"))[0]
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(trained / "model.pt"),
                "--images",
                str(image),
                "--output",
                str(tmp_path / "scored"),
                "--no-progress",
                "--set",
                "train.threads=1",
            ]
        )
        == 0
    )
    assert set(thread_probe["backbone"]) == set(thread_probe["model"]) == {1}


# --------------------------------------------------------------------------------------------
# one run per output folder
# --------------------------------------------------------------------------------------------

HOLD_LOCK = """
import sys
from vpdm.io import exclusive_folder
with exclusive_folder(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


def test_a_second_train_into_a_busy_folder_fails_at_once_naming_the_other_pid(tiny_demo, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)],
        cwd=Path(__file__).resolve().parents[1],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"  # event: the other run holds the folder
        seen = _images_seen()
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
                f"data.cache_dir={tmp_path / 'cache'}",
                *TINY,
            ]
        )
        err = capsys.readouterr().err
        assert code == 2, err
        assert f"output folder {str(out)!r} is in use by another vpdm run (pid {holder.pid})" in err
        assert _images_seen() == seen and not (out / "model.pt").exists()
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=PATIENCE_S) == 0
    assert not (out / ".vpdm.lock").exists()  # released and removed


def test_a_model_that_appears_while_training_is_never_replaced(tiny_demo, tmp_path, capsys, monkeypatch):
    """Something that ignores the lock writes model.pt while we train: it is kept, ours is kept beside it."""
    import os

    from vpdm.inference.checkpoint import load_checkpoint
    from vpdm.training import engine

    out = tmp_path / "run"
    real_fit = engine.fit

    def fit_while_another_writes(*a, **k):
        (out / "model.pt").write_bytes(b"the other writer's model")
        return real_fit(*a, **k)

    monkeypatch.setattr(engine, "fit", fit_while_another_writes)
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
            f"data.cache_dir={tmp_path / 'cache'}",
            *TINY,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "appeared while this run was working" in err and "it was not replaced" in err, err
    assert (out / "model.pt").read_bytes() == b"the other writer's model"
    ours = out / f"model.pt.new-{os.getpid()}"
    assert str(ours) in err
    load_checkpoint(ours)  # nothing lost: this run's model is complete beside it


def test_overwrite_replaces_the_previous_run_as_a_whole(trained, tiny_demo, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(trained, out)
    (out / "plots").mkdir()
    (out / "plots" / "roc.png").write_bytes(b"old plot")
    (out / "notes.txt").write_text("the user's own file")
    old_model = (out / "model.pt").read_bytes()
    assert (out / "metrics.json").is_file()
    assert (
        main(
            [
                "train",
                "--data",
                f"demo:{tiny_demo}",
                "--output",
                str(out),
                "--epochs",
                "1",
                "--no-progress",
                "--overwrite",
                "--set",
                "train.seed=1",
                "--set",
                f"data.cache_dir={tmp_path / 'cache'}",
                *TINY,
            ]
        )
        == 0
    )
    assert (out / "model.pt").read_bytes() != old_model
    # the old run's metrics and plots left with its model; nothing of the machinery is left behind
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "history.json", "model.pt", "notes.txt"]
    assert len(json.loads((out / "history.json").read_text())) == 1


# --------------------------------------------------------------------------------------------
# settings a trained model cannot change
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["evaluate", "predict"])
@pytest.mark.parametrize(
    "setting",
    [
        "backbone.image_size=32",
        "backbone.feature_size=4",
        "backbone.name=resnet18",
        "model.prototypes.num_prototypes=8",
    ],
)
def test_inference_refuses_settings_that_change_what_the_checkpoint_means(
    command, setting, trained, tiny_demo, tmp_path, capsys
):
    image = sorted((tiny_demo / "grid" / "test").rglob("*.png"))[0]
    extra = (
        ["--images", str(image), "--output", str(tmp_path / "o")]
        if command == "predict"
        else ["--output", str(tmp_path / "m.json")]
    )
    seen = _images_seen()
    code = main(
        [
            command,
            "--checkpoint",
            str(trained / "model.pt"),
            *extra,
            "--no-progress",
            "--set",
            setting,
            "--set",
            f"data.cache_dir={tmp_path / 'cache'}",
        ]
    )
    err = capsys.readouterr().err
    key = setting.split("=")[0]
    assert code == 2 and f"vpdm {command}: error: {command} cannot change {key}" in err, err
    assert "Traceback" not in err and _images_seen() == seen


def test_predict_refuses_a_config_file_it_would_ignore(trained, tiny_demo, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("sampling:\n  num_steps: 2\n")
    image = sorted((tiny_demo / "grid" / "test").rglob("*.png"))[0]
    code = main(
        [
            "predict",
            "--checkpoint",
            str(trained / "model.pt"),
            "--images",
            str(image),
            "--output",
            str(tmp_path / "o"),
            "--config",
            str(tmp_path / "c.yaml"),
            "--no-progress",
        ]
    )
    assert code == 2 and "predict takes its settings from the checkpoint" in capsys.readouterr().err


def test_evaluate_reports_defect_images_left_out_of_the_pixel_metrics(trained, tiny_demo, tmp_path, capsys):
    part = _copy_category(tiny_demo / "grid", tmp_path / "part")
    mask = sorted((part / "ground_truth").rglob("*_mask.png"))[0]
    mask.unlink()
    image = part / "test" / mask.parent.name / mask.name.replace("_mask", "")
    base = [
        "evaluate",
        "--checkpoint",
        str(trained / "model.pt"),
        "--data",
        f"folder:{part}",
        "--no-progress",
        "--output",
        str(tmp_path / "m.json"),
        "--set",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    assert main(base) == 2  # refused by default, naming the image and the mask looked for
    err = capsys.readouterr().err
    assert str(image) in err and str(mask) in err and not (tmp_path / "m.json").exists()
    assert main(base + ["--set", "data.missing_masks=image_only"]) == 0
    assert "1 anomalous image(s) without a mask left out of the pixel metrics" in capsys.readouterr().out
    doc = json.loads((tmp_path / "m.json").read_text())
    assert doc["pixel_metrics_left_out"] == 1 and doc["pixel_metrics_left_out_images"] == [str(image)]
    assert doc["num_images"] == 6  # still scored: in the image metrics


# --------------------------------------------------------------------------------------------
# numbers: NaN, infinity, zero and negative counts are refused by name, before any work
# --------------------------------------------------------------------------------------------


def _settings(kind: type) -> list[str]:
    """Dotted names of every setting of type ``kind`` in VPDMConfig (walked here, not taken from the library)."""
    import dataclasses
    import typing

    from vpdm.config.schema import VPDMConfig

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if dataclasses.is_dataclass(hint):
                yield from walk(hint, f"{prefix}{f.name}.")
            elif hint is kind or kind in typing.get_args(hint):
                yield f"{prefix}{f.name}"

    return list(walk(VPDMConfig, ""))


FLOAT_SETTINGS = _settings(float)
INT_SETTINGS = _settings(int)
# Counts where zero means something (documented): torch's default threads, no residual blocks; seeds are not counts.
ZERO_ALLOWED = {
    "train.threads",
    "model.denoiser.depth",
    "train.seed",
    "sampling.seed",
    "train.checkpoint_every",
    "model.prototypes.list_size",
    "model.fine.list_size",
    "model.prototypes.route",
    "model.fine.route",
}  # 0 = no short lists, no routing


def test_the_walk_finds_the_settings():
    assert {"train.lr", "train.weight_decay", "train.grad_clip", "sampling.eta", "scoring.blur_sigma"} <= set(
        FLOAT_SETTINGS
    )
    assert {"train.epochs", "train.batch_size", "data.extract_batch_size", "backbone.image_size"} <= set(INT_SETTINGS)


@pytest.mark.parametrize("name", FLOAT_SETTINGS)
@pytest.mark.parametrize("value", [".nan", "nan", ".inf", "-.inf", "inf", "1e999"])
def test_every_float_setting_refuses_nan_and_infinity_by_name(name, value):
    from vpdm.config.schema import load_config
    from vpdm.errors import ConfigError

    with pytest.raises(ConfigError, match=f"^{name} must be a finite number, got "):
        load_config(None, [f"{name}={value}"])


@pytest.mark.parametrize("name", INT_SETTINGS)
@pytest.mark.parametrize("value", [0, -1])
def test_every_count_refuses_zero_and_negative_values_by_name(name, value):
    from vpdm.config.schema import load_config
    from vpdm.errors import ConfigError

    if name in ZERO_ALLOWED and (value == 0 or name.endswith("seed")):
        load_config(None, [f"{name}={value}"])  # meaningful: accepted
        return
    leaf = name.rsplit(".", 1)[-1]
    with pytest.raises(ConfigError, match=leaf):
        load_config(None, [f"{name}={value}"])


@pytest.mark.parametrize("name", [n for n in INT_SETTINGS if n.endswith("seed")] + ["train.epochs"])
@pytest.mark.parametrize("value", [99999999999999999999999, 2**63, -(2**63) - 1])
def test_an_integer_beyond_64_bits_is_refused_by_name(name, value):
    from vpdm.config.schema import load_config
    from vpdm.errors import ConfigError

    with pytest.raises(ConfigError, match=f"^{name} must be an integer that fits in 64 bits"):
        load_config(None, [f"{name}={value}"])
    assert load_config(None, [f"train.seed={2**63 - 1}"]).train.seed == 2**63 - 1  # the edge itself is fine


def test_a_seed_beyond_64_bits_fails_the_command_before_any_work(tiny_demo, tmp_path, capsys):
    seen = _images_seen()
    code = main(
        [
            "train",
            "--data",
            f"demo:{tiny_demo}",
            "--output",
            str(tmp_path / "out"),
            "--no-progress",
            *TINY,
            "--set",
            "sampling.seed=99999999999999999999999",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "sampling.seed must be an integer that fits in 64 bits" in err and "Traceback" not in err, err
    assert _images_seen() == seen and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "text, key, lines",
    [
        ("train:\n  epochs: 3\ntrain:\n  lr: 0.01\n", "train", (1, 3)),
        ("train:\n  epochs: 3\n  lr: 0.01\n  epochs: 5\n", "epochs", (2, 4)),
    ],
)
def test_a_key_given_twice_in_a_settings_file_is_an_error_naming_it_and_both_lines(text, key, lines, tmp_path):
    from vpdm.config.schema import load_config
    from vpdm.errors import ConfigError

    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(
        ConfigError, match=f"setting '{key}' is given twice in {path}, on lines {lines[0]} and {lines[1]}"
    ):
        load_config(path)


def test_a_section_set_merges_into_earlier_settings_of_that_section():
    from vpdm.config.schema import load_config
    from vpdm.errors import ConfigError

    config = load_config(None, ["train.lr=0.01", "train={epochs: 3}"])
    assert (config.train.lr, config.train.epochs) == (0.01, 3)  # the earlier lr is kept, not reset to the default
    with pytest.raises(ConfigError, match="'train' is a section; give a mapping"):
        load_config(None, ["train=3"])
    with pytest.raises(ConfigError, match="setting 'epochs' is given twice"):
        load_config(None, ["train={epochs: 3, epochs: 4}"])


def test_a_nan_setting_fails_the_command_before_any_work(tiny_demo, tmp_path, capsys):
    seen = _images_seen()
    code = main(
        [
            "train",
            "--data",
            f"demo:{tiny_demo}",
            "--output",
            str(tmp_path / "out"),
            "--no-progress",
            *TINY,
            "--set",
            "train.weight_decay=nan",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == "vpdm train: error: train.weight_decay must be a finite number, got nan", err
    assert _images_seen() == seen and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv, needle",
    [
        (
            ["predict", "--checkpoint", "m.pt", "--images", ".", "--output", "o", "--batch-size", "0"],
            "argument --batch-size: expected an integer >= 1, got 0",
        ),
        (
            ["predict", "--checkpoint", "m.pt", "--images", ".", "--output", "o", "--batch-size", "-4"],
            "argument --batch-size: expected an integer >= 1, got -4",
        ),
        (["train", "--output", "o", "--epochs", "0"], "argument --epochs: expected an integer >= 1, got 0"),
        (["train", "--output", "o", "--set", "train.lr=[1"], "train.lr=[1': the value is not valid YAML"),
    ],
)
def test_bad_command_line_numbers_are_one_line_errors(argv, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own refusal: usage and one line, exit code 2
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_evaluate_says_whether_it_used_the_feature_cache_and_which_entry(trained, tmp_path, capsys):
    import re

    argv = [
        "evaluate",
        "--checkpoint",
        str(trained / "model.pt"),
        "--output",
        str(tmp_path / "m.json"),
        "--no-progress",
        "--set",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    assert main(argv) == 0
    first = re.search(r"^test: 12 images, features extracted, cached as (\S+)$", capsys.readouterr().out, re.M)
    assert first and Path(first.group(1)).parent == tmp_path / "cache" and Path(first.group(1)).is_file()
    assert main(argv + ["--overwrite"]) == 0  # the metrics of the first run are there: replaced only when told to
    assert (
        f"test: 12 images, features cache hit {first.group(1)} (content checksum verified)\n" in capsys.readouterr().out
    )


def test_config_preset_paper_is_the_papers_method_and_set_still_wins(capsys):
    import yaml

    from vpdm.cli.commands import main
    from vpdm.config.presets import PAPER
    from vpdm.config.schema import VPDMConfig
    from vpdm.config.values import flatten_dict, to_dict

    assert main(["config", "--preset", "paper", "--set", "train.epochs=7"]) == 0
    printed = flatten_dict(yaml.safe_load(capsys.readouterr().out))
    want = flatten_dict(to_dict(VPDMConfig().with_overrides(PAPER)))
    assert printed["train.epochs"] == 7
    assert {k: v for k, v in printed.items() if k != "train.epochs"} == {
        k: v for k, v in want.items() if k != "train.epochs"
    }
    assert printed["model.prototypes.level"] == "image" and printed["model.diffusion.prediction"] == "eps"
