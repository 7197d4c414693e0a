"""What the commands write and check: never onto what they read, never over a file unless told to, never two
runs in one folder, every file under --images accounted for, scores kept when a picture fails, one batch at a
time; a partial calibration keeps the other classes; overrides applied or refused, never ignored; every input
decoded before long work; a killed training run resumes."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.test_cli import TINY
from vpdm.cli.commands import main


def _images_seen() -> int:
    from vpdm.features.backbone import total_images_seen

    return total_images_seen()


@pytest.fixture(scope="module")
def run(tiny_demo, tmp_path_factory):
    """A calibrated tiny model (2 held-out train/good images per class) and its feature cache."""
    out = tmp_path_factory.mktemp("run")
    cache = tmp_path_factory.mktemp("cache")
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
                "--set",
                f"data.cache_dir={cache}",
                *TINY,
            ]
        )
        == 0
    )
    return {"model": out / "model.pt", "cache": cache, "demo": tiny_demo}


def _rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "scores.csv", newline="") as f:
        return list(csv.DictReader(f))


def _incoming(tmp_path: Path, demo: Path, n: int, name: str = "incoming") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for p in sorted((demo / "grid" / "test").rglob("*.png"))[:n]:
        shutil.copy(p, folder / f"{p.parent.name}_{p.name}")
    return folder


# --------------------------------------------------------------------------------------------
# 1. an output never replaces a user's file, and never the input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overwrite", [False, True])
def test_evaluate_never_writes_onto_its_checkpoint(run, tmp_path, capsys, overwrite):
    ckpt = tmp_path / "model.pt"
    shutil.copy(run["model"], ckpt)
    before = ckpt.read_bytes()
    seen = _images_seen()
    code = main(
        [
            "evaluate",
            "--checkpoint",
            str(ckpt),
            "--output",
            str(ckpt),
            "--no-progress",
            "--set",
            f"data.cache_dir={tmp_path / 'cache'}",
        ]
        + (["--overwrite"] if overwrite else [])
    )
    err = capsys.readouterr().err
    assert code == 2 and f"metrics {str(ckpt)!r} is the input {str(ckpt)!r}" in err, err
    assert ckpt.read_bytes() == before and _images_seen() == seen


def test_every_writer_refuses_an_existing_file_unless_told_and_then_replaces_it(run, tmp_path, capsys):
    """evaluate --output / --plots, calibrate --output: the file that is there is kept, and the command says so
    before any image; with --overwrite it is replaced by a complete new one."""
    from vpdm.inference.checkpoint import checkpoint_calibration, load_checkpoint

    theirs = b"the user's own file"
    metrics, plots, other = tmp_path / "m.json", tmp_path / "plots", tmp_path / "other.pt"
    metrics.write_bytes(theirs)
    other.write_bytes(theirs)
    base = ["--no-progress", "--set", f"data.cache_dir={run['cache']}"]
    seen = _images_seen()
    assert main(["evaluate", "--checkpoint", str(run["model"]), "--output", str(metrics), *base]) == 2
    assert f"metrics {str(metrics)!r} exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert main(["calibrate", "--checkpoint", str(run["model"]), "--output", str(other), *base]) == 2
    assert f"checkpoint {str(other)!r} exists; pass --overwrite" in capsys.readouterr().err
    assert metrics.read_bytes() == theirs and other.read_bytes() == theirs and _images_seen() == seen

    plots.mkdir()
    (plots / "notes.txt").write_text("mine")
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(run["model"]),
                "--output",
                str(metrics),
                "--plots",
                str(plots),
                "--overwrite",
                *base,
            ]
        )
        == 2
    )  # --overwrite replaces a folder of pictures, never a folder of other things
    assert f"holds {str(plots / 'notes.txt')!r}, which vpdm does not write there" in capsys.readouterr().err
    assert metrics.read_bytes() == theirs and (plots / "notes.txt").read_text() == "mine"

    (plots / "notes.txt").unlink()
    (plots / "old.png").write_bytes(b"an old picture")
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(run["model"]),
                "--output",
                str(metrics),
                "--plots",
                str(plots),
                "--overwrite",
                *base,
            ]
        )
        == 0
    )
    assert json.loads(metrics.read_text())["num_images"] == 12
    names = sorted(p.name for p in plots.iterdir())
    assert "roc.png" in names and "old.png" not in names  # the folder is the new run's, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "other.pt", "plots"]  # no temporaries left

    assert main(["calibrate", "--checkpoint", str(run["model"]), "--output", str(other), "--overwrite", *base]) == 0
    assert checkpoint_calibration(load_checkpoint(other)[2]) is not None


def test_calibrate_in_place_never_replaces_an_older_backup(run, tmp_path, capsys):
    ckpt = tmp_path / "model.pt"
    shutil.copy(run["model"], ckpt)
    first = ckpt.read_bytes()
    (tmp_path / "model.pt.bak").write_bytes(b"an older backup")
    assert (
        main(
            [
                "calibrate",
                "--checkpoint",
                str(ckpt),
                "--data",
                f"demo:{run['demo']}",
                "--no-progress",
                "--set",
                f"data.cache_dir={run['cache']}",
            ]
        )
        == 0
    )
    assert f"previous model.pt kept as {tmp_path / 'model.pt.bak.2'}" in capsys.readouterr().out
    assert (tmp_path / "model.pt.bak").read_bytes() == b"an older backup"
    assert (tmp_path / "model.pt.bak.2").read_bytes() == first


def test_check_outputs_is_one_rule_for_files_folders_and_inputs(tmp_path):
    """The mechanism itself, against paths built here: same file through a link, inside an input folder,
    a folder output around an input, an existing output, a file where a folder goes."""
    from vpdm.errors import OutputError
    from vpdm.io import Output, check_outputs

    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.png").write_bytes(b"x")
    os.symlink(data / "a.png", tmp_path / "link.png")
    cases = [
        ([Output(tmp_path / "link.png", "overlay")], [data / "a.png"], "is the input"),
        ([Output(data / "sub" / "m.json", "metrics")], [data], "is inside the input"),
        ([Output(tmp_path, "plots folder", folder=True)], [data / "a.png"], "holds the input"),
        ([Output(data / "a.png", "metrics")], [], "exists; pass --overwrite"),
        ([Output(data / "a.png", "masks folder", folder=True)], [], "it is a file, not a folder"),
    ]
    for outputs, inputs, needle in cases:
        with pytest.raises(OutputError, match=needle):
            check_outputs(outputs, inputs=inputs, overwrite=False)
    with pytest.raises(OutputError, match="is the input"):  # --overwrite never allows writing onto an input
        check_outputs(cases[0][0], inputs=cases[0][1], overwrite=True)
    check_outputs([Output(tmp_path / "new.json", "metrics")], inputs=[data])  # a new file beside the input: fine
    assert (data / "a.png").read_bytes() == b"x"


# --------------------------------------------------------------------------------------------
# 4, 8. predict: never into its input, never two runs mixed, every output checked before scoring
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["equal", "inside"])
def test_predict_refuses_an_output_in_its_input_folder(run, tmp_path, capsys, where):
    images = _incoming(tmp_path, run["demo"], 2)
    out = images if where == "equal" else images / "scored"
    seen = _images_seen()
    code = main(
        [
            "predict",
            "--checkpoint",
            str(run["model"]),
            "--images",
            str(images),
            "--output",
            str(out),
            "--no-progress",
            "--overwrite",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and f"is inside the input {str(images)!r}" in err, err
    assert _images_seen() == seen and sorted(p.name for p in images.iterdir())[:2] != []
    assert not (out / "scores.csv").exists() and not (images / "overlays").exists()


def test_a_second_predict_never_mixes_its_files_with_the_first(run, tmp_path, capsys):
    many, one = _incoming(tmp_path, run["demo"], 5, "many"), _incoming(tmp_path, run["demo"], 1, "one")
    out = tmp_path / "scored"
    argv = ["predict", "--checkpoint", str(run["model"]), "--output", str(out), "--no-progress"]
    assert main([*argv, "--images", str(many)]) == 0
    first = (out / "scores.csv").read_bytes()
    assert len(_rows(out)) == 5 and len(list((out / "overlays").iterdir())) == 5
    assert main([*argv, "--images", str(one)]) == 2  # refused: the first run's files are there
    err = capsys.readouterr().err
    assert f"scores {str(out / 'scores.csv')!r} exists; pass --overwrite" in err, err
    assert (out / "scores.csv").read_bytes() == first
    assert main([*argv, "--images", str(one), "--overwrite"]) == 0
    rows = _rows(out)
    assert len(rows) == 1
    assert sorted(p.name for p in (out / "overlays").iterdir()) == [Path(rows[0]["overlay"]).name]
    assert sorted(p.name for p in (out / "masks").iterdir()) == [Path(rows[0]["pred_mask"]).name]
    assert sorted(p.name for p in out.iterdir()) == ["masks", "overlays", "scores.csv"]  # nothing left over
    # --no-overlays with --overwrite: the previous overlays leave with the previous scores
    assert main([*argv, "--images", str(one), "--overwrite", "--no-overlays"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["masks", "scores.csv"]


def test_predict_checks_masks_before_scoring(run, tmp_path, capsys):
    images = _incoming(tmp_path, run["demo"], 3)
    out = tmp_path / "scored"
    out.mkdir()
    (out / "masks").write_text("a file where the masks folder goes")
    seen = _images_seen()
    code = main(
        [
            "predict",
            "--checkpoint",
            str(run["model"]),
            "--images",
            str(images),
            "--output",
            str(out),
            "--no-progress",
            "--overwrite",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and f"cannot write masks folder {str(out / 'masks')!r}: it is a file, not a folder" in err, err
    assert _images_seen() == seen and sorted(p.name for p in out.iterdir()) == ["masks"]


def test_scores_are_kept_when_an_overlay_cannot_be_written(run, tmp_path, capsys, monkeypatch):
    """The disk fills up while overlays are drawn: every image is still scored and in scores.csv, the rows say
    which pictures are missing, and the command exits 2 naming the file that failed."""
    import errno

    from PIL import Image as PILImage

    images = _incoming(tmp_path, run["demo"], 4)
    out = tmp_path / "scored"
    real_save = PILImage.Image.save
    saved = {"n": 0}

    def full_disk(self, fp, *a, **k):
        if "overlays" in str(fp):
            saved["n"] += 1
            if saved["n"] > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, fp, *a, **k)

    monkeypatch.setattr(PILImage.Image, "save", full_disk)
    code = main(
        ["predict", "--checkpoint", str(run["model"]), "--images", str(images), "--output", str(out), "--no-progress"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "no space left on device (ENOSPC)" in err and "every score is in" in err, err
    rows = _rows(out)
    assert len(rows) == 4 and all(r["score"] for r in rows)
    assert rows[0]["overlay"] and all(not r["overlay"] and "overlay not written" in r["error"] for r in rows[1:])
    assert len(list((out / "overlays").iterdir())) == 1


# --------------------------------------------------------------------------------------------
# 5. every file under --images is scored or named
# --------------------------------------------------------------------------------------------


def test_predict_follows_linked_folders_and_names_every_file_it_does_not_score(run, tmp_path, capsys):
    images = _incoming(tmp_path, run["demo"], 2)
    elsewhere = _incoming(tmp_path, run["demo"], 1, "elsewhere")
    os.symlink(elsewhere, images / "linked")  # a linked sub-folder: followed
    os.symlink(images, images / "loop")  # a link back up: scanned once
    os.symlink(tmp_path / "gone.png", images / "broken.png")  # a broken link
    with Image.open(next(elsewhere.iterdir())) as im:
        im.save(images / "photo.webp")
        im.save(images / "anim.gif")
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "scored"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(run["model"]),
                "--images",
                str(images),
                "--output",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    rows = {str(Path(r["path"]).relative_to(images)): r for r in _rows(out)}
    scored = sorted(k for k, r in rows.items() if r["score"])
    assert scored == sorted(
        [p.name for p in images.iterdir() if p.suffix == ".png" and not p.is_symlink()]
        + [f"linked/{p.name}" for p in elsewhere.iterdir()]
    )
    not_scored = {k: r["error"] for k, r in rows.items() if not r["score"]}
    assert set(not_scored) == {"broken.png", "photo.webp", "anim.gif", "notes.txt", "loop"}
    assert "a broken link" in not_scored["broken.png"] and "'.webp' files are not read" in not_scored["photo.webp"]
    assert "already scanned" in not_scored["loop"]
    assert "scored 3 image(s)" in printed and "5 not scored" in printed


# --------------------------------------------------------------------------------------------
# 7. predict streams: each batch's rows are on disk before the next batch is scored
# --------------------------------------------------------------------------------------------


def test_predict_writes_each_batch_before_scoring_the_next(run, tmp_path, monkeypatch):
    from vpdm.inference.detector import Detector

    images = _incoming(tmp_path, run["demo"], 6)
    out = tmp_path / "scored"
    written: list[int] = []
    real = Detector.analyse

    def analyse(self, *a, **k):
        staged = [p for p in out.glob("scores.csv.*.tmp")]
        written.append(len(staged[0].read_text().splitlines()) - 1 if staged else -1)
        return real(self, *a, **k)

    monkeypatch.setattr(Detector, "analyse", analyse)
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(run["model"]),
                "--images",
                str(images),
                "--output",
                str(out),
                "--no-progress",
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    assert written == [0, 2, 4]  # rows of the earlier batches are written, not held
    assert len(_rows(out)) == 6


# --------------------------------------------------------------------------------------------
# 2. a calibration of some classes keeps the others
# --------------------------------------------------------------------------------------------


@pytest.fixture()
def grid_only(tmp_path):
    """The tiny demo's grid class alone (same seed and sizes: the same images), as a demo spec."""
    from vpdm.data.demo import make_demo_dataset

    return make_demo_dataset(
        tmp_path / "grid-only",
        classes=["grid"],
        train_per_class=8,
        test_good_per_class=3,
        test_defect_per_class=3,
        size=64,
    )


def test_calibrating_one_class_keeps_the_others_thresholds(run, grid_only, tmp_path, capsys):
    from vpdm.inference.checkpoint import checkpoint_calibration, load_checkpoint
    from vpdm.inference.detector import Detector

    ckpt = tmp_path / "model.pt"
    shutil.copy(run["model"], ckpt)
    before = checkpoint_calibration(load_checkpoint(ckpt)[2])
    assert (
        main(
            [
                "calibrate",
                "--checkpoint",
                str(ckpt),
                "--data",
                f"demo:{grid_only}",
                "--no-progress",
                "--set",
                f"data.cache_dir={run['cache']}",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "recalibrated: demo/grid; kept from the previous calibration" in printed and ": demo/blobs" in printed
    after = checkpoint_calibration(load_checkpoint(ckpt)[2])
    assert sorted(after.classes) == ["demo/blobs", "demo/grid"]
    assert after.classes["demo/blobs"] == before.classes["demo/blobs"]  # kept exactly
    assert torch.equal(after.histograms["demo/blobs"], before.histograms["demo/blobs"])
    assert after.classes["demo/grid"].num_images == 8  # every grid train/good image
    assert "kept from the previous calibration" in after.source and "demo/blobs" in after.source
    # blobs images are still judged by blobs' own thresholds
    blobs = sorted((run["demo"] / "blobs" / "test" / "good").glob("*.png"))
    detector = Detector.from_checkpoint(ckpt)
    threshold = before.classes["demo/blobs"].image_threshold
    for p in detector.predict_files(blobs, progress=False, category="demo/blobs"):
        assert p.pred_label == int(p.score > threshold)


def test_a_partial_calibration_that_cannot_keep_the_others_is_refused(run, grid_only, tmp_path, capsys):
    from tests.test_postprocess import _uncalibrated_copy

    ckpt = tmp_path / "model.pt"
    shutil.copy(run["model"], ckpt)
    original = ckpt.read_bytes()
    seen = _images_seen()
    base = ["--no-progress", "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    # other method (labelled f1) than the kept classes' (quantile)
    assert main(["calibrate", "--checkpoint", str(ckpt), "--val-data", f"demo:{grid_only}", *base]) == 2
    err = capsys.readouterr().err
    assert "lacks class(es) of the model: demo/blobs" in err and "made the same way" in err, err
    # same method, other false-alarm rate
    assert (
        main(
            [
                "calibrate",
                "--checkpoint",
                str(ckpt),
                "--data",
                f"demo:{grid_only}",
                *base,
                "--set",
                "calibration.false_alarm_rate=0.2",
            ]
        )
        == 2
    )
    assert "target false-alarm rate 0.01" in capsys.readouterr().err
    # nothing to keep
    old = _uncalibrated_copy(ckpt, tmp_path / "old.pt")
    assert main(["calibrate", "--checkpoint", str(old), "--data", f"demo:{grid_only}", *base]) == 2
    assert "the checkpoint has no thresholds to keep for them" in capsys.readouterr().err
    assert ckpt.read_bytes() == original and _images_seen() == seen


# --------------------------------------------------------------------------------------------
# 11. overrides: one threshold alone, an unknown class, backbone.* from Python
# --------------------------------------------------------------------------------------------


def test_threshold_and_category_overrides_on_an_uncalibrated_model(run, tmp_path, capsys):
    from tests.test_postprocess import _uncalibrated_copy

    old = _uncalibrated_copy(run["model"], tmp_path / "old.pt")
    images = _incoming(tmp_path, run["demo"], 1)
    base = ["predict", "--checkpoint", str(old), "--images", str(images), "--no-progress"]
    assert main([*base, "--output", str(tmp_path / "a"), "--image-threshold", "5"]) == 2
    err = capsys.readouterr().err
    assert "an image threshold was given without a pixel threshold" in err and "decisions need both" in err, err
    assert (
        main(
            [
                *base,
                "--output",
                str(tmp_path / "b"),
                "--image-threshold",
                "5",
                "--pixel-threshold",
                "5",
                "--category",
                "demo/nope",
            ]
        )
        == 2
    )
    assert "class 'demo/nope' is not one the model was trained for: demo/blobs, demo/grid" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() or not (tmp_path / "a" / "scores.csv").exists()
    assert (
        main(
            [
                *base,
                "--output",
                str(tmp_path / "c"),
                "--image-threshold",
                "5",
                "--pixel-threshold",
                "5",
                "--category",
                "demo/grid",
            ]
        )
        == 0
    )
    assert _rows(tmp_path / "c")[0]["category"] == "demo/grid"


@pytest.mark.parametrize("override", ["backbone.image_size=32", "model.prototypes.num_prototypes=8"])
def test_the_python_api_applies_the_clis_override_policy(run, override):
    from vpdm.errors import ConfigError
    from vpdm.inference.detector import Detector

    with pytest.raises(ConfigError, match=f"Detector.from_checkpoint cannot change {override.split('=')[0]}"):
        Detector.from_checkpoint(run["model"], overrides=[override])
    detector = Detector.from_checkpoint(run["model"], overrides=["sampling.num_steps=1"])
    assert detector.config.sampling.num_steps == 1


# --------------------------------------------------------------------------------------------
# 9, 12. checks before long work, and the small ones
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["train image", "test mask"])
def test_a_truncated_image_or_mask_fails_before_any_image_goes_through_the_backbone(which, tiny_demo, tmp_path, capsys):
    root = tmp_path / "demo"
    shutil.copytree(tiny_demo, root)
    # the last train image, in a later extraction batch than the first: extraction would reach it only after
    # other images went through the backbone
    victim = (
        max((root / "grid" / "train" / "good").glob("*.png"))
        if which == "train image"
        else min((root / "grid" / "ground_truth").rglob("*_mask.png"))
    )
    victim.write_bytes(victim.read_bytes()[:-40])  # the header is intact: only a decode finds it
    seen = _images_seen()
    code = main(
        [
            "train",
            "--data",
            f"demo:{root}",
            "--output",
            str(tmp_path / "out"),
            "--epochs",
            "1",
            "--evaluate",
            "--no-progress",
            "--set",
            f"data.cache_dir={tmp_path / 'cache'}",
            *TINY,
            "--set",
            "data.extract_batch_size=2",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and f"cannot decode image {str(victim)!r}" in err, err
    assert _images_seen() == seen
    assert not (tmp_path / "out").exists()  # the failed run removed the folder it had made


def test_a_vpdm_checkpoint_given_as_backbone_weights_is_named_in_one_line(run, tiny_demo, tmp_path, capsys):
    code = main(
        [
            "train",
            "--data",
            f"demo:{tiny_demo}",
            "--output",
            str(tmp_path / "out"),
            "--no-progress",
            *TINY,
            "--weights",
            str(run["model"]),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "is a vpdm checkpoint (a model.pt written by 'vpdm train'), not the weights" in err, err
    assert len(err) < 600


def test_evaluate_says_why_metrics_are_empty_on_a_test_split_of_good_images(run, tmp_path, capsys):
    part = tmp_path / "part"
    shutil.copytree(run["demo"] / "grid" / "train", part / "train")
    shutil.copytree(run["demo"] / "grid" / "test" / "good", part / "test" / "good")
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(run["model"]),
                "--data",
                f"folder:{part}",
                "--output",
                str(tmp_path / "m.json"),
                "--no-progress",
                "--set",
                f"data.cache_dir={tmp_path / 'cache'}",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "note: folder/part: every test image is normal (no defect image), so its image AUROC" in printed
    assert json.loads((tmp_path / "m.json").read_text())["notes"][0].startswith("folder/part: every test image")


def test_the_demo_files_are_readable_like_any_new_file(tmp_path):
    from vpdm.data.demo import make_demo_dataset

    old = os.umask(0o022)
    try:
        root = make_demo_dataset(
            tmp_path / "d", classes=1, train_per_class=1, test_good_per_class=1, test_defect_per_class=1, size=32
        )
    finally:
        os.umask(old)
    modes = {p.stat().st_mode & 0o777 for p in root.rglob("*") if p.is_file()}
    assert modes == {0o644}


def test_train_takes_batch_size_as_the_readme_says(tiny_demo, tmp_path):
    import yaml

    out = tmp_path / "run"
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
                "--set",
                f"data.cache_dir={tmp_path / 'cache'}",
                *TINY,
                "--batch-size",
                "5",
            ]
        )
        == 0
    )
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["batch_size"] == 5


# --------------------------------------------------------------------------------------------
# 6. resumable training: a killed run continues to the uninterrupted run's model, bit for bit
# --------------------------------------------------------------------------------------------


def test_a_run_terminated_after_an_epoch_resumes_to_the_same_model_bit_for_bit(
    tiny_demo, tmp_path, capsys, monkeypatch
):
    import signal

    import vpdm.training.resume
    from vpdm.inference.checkpoint import load_checkpoint
    from vpdm.io import exclusive_folder

    base = [
        "train",
        "--data",
        f"demo:{tiny_demo}",
        "--epochs",
        "3",
        "--no-progress",
        "--set",
        f"data.cache_dir={tmp_path / 'cache'}",
        *TINY,
        "--set",
        "train.lr=0.01",
    ]
    assert main([*base, "--output", str(tmp_path / "whole")]) == 0
    assert not (tmp_path / "whole" / "train-state.pt").exists()  # a complete run leaves nothing to resume

    out = tmp_path / "killed"
    real_write = vpdm.training.resume.write_state

    def write_then_sigterm(path, state):
        real_write(path, state)
        os.kill(os.getpid(), signal.SIGTERM)  # `kill` of the run just after its first epoch's state is saved

    monkeypatch.setattr(vpdm.training.resume, "write_state", write_then_sigterm)
    assert main([*base, "--output", str(out)]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "terminated (SIGTERM)" in err and "continue with the same command and --resume" in err, err
    monkeypatch.setattr(vpdm.training.resume, "write_state", real_write)
    assert sorted(p.name for p in out.iterdir()) == ["train-state.pt"]  # no model, no temporaries, no lock
    with exclusive_folder(out):
        pass  # the lock was released

    assert main([*base, "--output", str(out)]) == 2  # the unfinished run is never lost by accident
    assert "holds the state of an unfinished run" in capsys.readouterr().err
    assert main([*base, "--output", str(out), "--resume", "--set", "train.lr=0.02"]) == 2
    assert "train.lr (0.01 in the state, now 0.02)" in capsys.readouterr().err
    (out / "model.pt.x1y2z3.tmp").write_bytes(b"left by a run killed while writing")
    assert main([*base, "--output", str(out), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert f"resuming {out / 'train-state.pt'}: 1 of 3 epochs done" in printed
    assert "removed 1 temporary file(s) a killed run left" in printed
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "history.json", "model.pt"]

    whole, resumed = load_checkpoint(tmp_path / "whole" / "model.pt")[0], load_checkpoint(out / "model.pt")[0]
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[h["loss"] for h in json.loads((d / "history.json").read_text())] for d in (tmp_path / "whole", out)]
    assert losses[0] == losses[1] and len(losses[0]) == 3


def test_a_failed_train_removes_the_output_folders_it_created_and_nothing_else(tiny_demo, tmp_path, capsys):
    argv = [
        "train",
        "--data",
        f"demo:{tiny_demo}",
        "--val-data",
        f"mvtec:{tmp_path / 'missing'}",
        "--no-progress",
        *TINY,
    ]
    assert main([*argv, "--output", str(tmp_path / "new" / "run")]) == 2  # refused once the folder is made
    assert "missing" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert main([*argv, "--output", str(mine)]) == 2
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]  # a folder that was there stays, as it was
