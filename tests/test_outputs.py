"""What the commands write: never onto what they read, never over a file unless told to."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.test_cli import TINY
from vpdm.cli import main


def _images_seen() -> int:
    from vpdm.backbone import total_images_seen

    return total_images_seen()


@pytest.fixture(scope="module")
def run(tiny_demo, tmp_path_factory):
    """A calibrated tiny model (2 held-out train/good images per class) and its feature cache."""
    out = tmp_path_factory.mktemp("run")
    cache = tmp_path_factory.mktemp("cache")
    assert main(["train", "--data", f"demo:{tiny_demo}", "--output", str(out), "--epochs", "1", "--no-progress",
                 "--set", f"data.cache_dir={cache}", *TINY]) == 0
    return {"model": out / "model.pt", "cache": cache, "demo": tiny_demo}



# --------------------------------------------------------------------------------------------
# 1. an output never replaces a user's file, and never the input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overwrite", [False, True])
def test_evaluate_never_writes_onto_its_checkpoint(run, tmp_path, capsys, overwrite):
    ckpt = tmp_path / "model.pt"
    shutil.copy(run["model"], ckpt)
    before = ckpt.read_bytes()
    seen = _images_seen()
    code = main(["evaluate", "--checkpoint", str(ckpt), "--output", str(ckpt), "--no-progress",
                 "--set", f"data.cache_dir={tmp_path / 'cache'}"] + (["--overwrite"] if overwrite else []))
    err = capsys.readouterr().err
    assert code == 2 and f"metrics {str(ckpt)!r} is the input {str(ckpt)!r}" in err, err
    assert ckpt.read_bytes() == before and _images_seen() == seen


def test_every_writer_refuses_an_existing_file_unless_told_and_then_replaces_it(run, tmp_path, capsys):
    """evaluate --output / --plots, calibrate --output: the file that is there is kept, and the command says so
    before any image; with --overwrite it is replaced by a complete new one."""
    from vpdm.checkpoint import checkpoint_calibration, load_checkpoint

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
    assert main(["evaluate", "--checkpoint", str(run["model"]), "--output", str(metrics), "--plots", str(plots),
                 "--overwrite", *base]) == 2  # --overwrite replaces a folder of pictures, never a folder of other things
    assert f"holds {str(plots / 'notes.txt')!r}, which vpdm does not write there" in capsys.readouterr().err
    assert metrics.read_bytes() == theirs and (plots / "notes.txt").read_text() == "mine"

    (plots / "notes.txt").unlink()
    (plots / "old.png").write_bytes(b"an old picture")
    assert main(["evaluate", "--checkpoint", str(run["model"]), "--output", str(metrics), "--plots", str(plots),
                 "--overwrite", *base]) == 0
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
    assert main(["calibrate", "--checkpoint", str(ckpt), "--data", f"demo:{run['demo']}", "--no-progress",
                 "--set", f"data.cache_dir={run['cache']}"]) == 0
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
