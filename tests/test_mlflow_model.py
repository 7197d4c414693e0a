"""The VPDM pyfunc model against a real MLflow store (temporary sqlite + artifact folder, no mocks).

Covers logging, registering under an alias, loading ``models:/NAME@champion`` in a fresh process,
per-item failures, ``jobs/score.py`` and ``mlflow models serve``.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

mlflow = pytest.importorskip("mlflow")

from mlflow import MlflowClient  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from PIL import Image  # noqa: E402

from tests.conftest import sqlite_mlflow_store, train_checkpoint  # noqa: E402
from tests.images import declared_size_png, png_bytes, raw_png16  # noqa: E402
from tests.test_cli import TINY  # noqa: E402
from tune.mlflow_model import (  # noqa: E402
    OUTPUT_COLUMNS,
    decode_image_bytes,
    images_to_frame,
    load_detector_model,
    log_pyfunc_model,
    predict_frame,
)
from tune.registry import register_champion  # noqa: E402
from vpdm.inference.detector import Detector  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "vpdm-test"
TOL = 1e-4
REL = 1e-6  # a few float32 ulps: standardised scores of an untrained model reach the thousands
# Bounds on child processes and on waits for a server: generous, so that a machine loaded by other jobs
# is slow, not failing; the waits themselves end on the event (the process exits, the server answers).
PATIENCE_S = 1800


# --------------------------------------------------------------------------------------------
# fixtures: one tiny checkpoint, one sqlite store, one champion for the whole module
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A fresh sqlite tracking + registry store with its own artifact root; restores the old URIs."""
    yield from sqlite_mlflow_store(tmp_path_factory.mktemp("mlflow"), "vpdm-tests")


@pytest.fixture(scope="module")
def demo(tiny_demo):
    return tiny_demo


@pytest.fixture(scope="module")
def checkpoint(demo, tmp_path_factory):
    return train_checkpoint(demo, tmp_path_factory, TINY)


@pytest.fixture(scope="module")
def images(demo):
    """Four test images: good and defective, of both classes."""
    files = sorted((demo / "grid" / "test").rglob("*.png"))[:2] + sorted((demo / "blobs" / "test").rglob("*.png"))[-2:]
    assert len(files) == 4
    return files


@pytest.fixture(scope="module")
def reference(checkpoint, images):
    """What the library itself says about the images: {path: (score, map)}."""
    results = Detector.from_checkpoint(checkpoint).predict_files(images, progress=False)
    assert all(r.error is None for r in results)
    return {r.path: (r.score, r.anomaly_map) for r in results}


@pytest.fixture(scope="module")
def champion(store, checkpoint, images):
    with mlflow.start_run(experiment_id=store["experiment_id"]) as run:
        info = log_pyfunc_model(checkpoint, example_images=images[:1])
    version = register_champion(
        run.info.run_id,
        model_name=MODEL_NAME,
        tags={"sweep": "test-sweep", "dataset": "demo", "metrics": {"image_auroc": 0.75}},
    )
    return {"run_id": run.info.run_id, "info": info, "version": version}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _env(store) -> dict[str, str]:
    """Environment of child processes: this store, this interpreter's bin/ first on PATH."""
    env = dict(os.environ, MLFLOW_TRACKING_URI=store["uri"], MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("MLFLOW_REGISTRY_URI", None)
    return env


# --------------------------------------------------------------------------------------------
# logging, registry, fresh-process loading
# --------------------------------------------------------------------------------------------


def test_logged_model_has_signature_example_and_carried_code(champion):
    info = champion["info"]
    assert info.model_uri.startswith("models:/")
    assert info.signature.inputs is None  # predict_frame checks the input: an empty request needs no columns
    assert info.signature.params.to_dict() == [
        {"name": "anomaly_map", "type": "string", "default": "small", "shape": None},
        {"name": "map_side", "type": "long", "default": 16, "shape": None},
        {"name": "png_vmax", "type": "double", "default": 0.0, "shape": None},
        {"name": "image_threshold", "type": "double", "default": None, "shape": None},
        {"name": "pixel_threshold", "type": "double", "default": None, "shape": None},
    ]
    assert [c["name"] for c in info.signature.outputs.to_dict()] == list(OUTPUT_COLUMNS)
    assert info.metadata["image_size"] == 64 and info.metadata["map_size"] == 64
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    assert (local / "artifacts" / "model.pt").is_file()
    assert (local / "code" / "vpdm" / "inference" / "detector.py").is_file()
    assert (local / "code" / "tune" / "mlflow_model.py").is_file()
    assert sorted(p.name for p in (local / "code" / "tune").iterdir()) == ["__init__.py", "mlflow_model.py"]
    assert not list(local.rglob("*.pkl"))  # models from code: nothing in the model is unpickled at load
    requirements = (local / "requirements.txt").read_text()
    for name in ("torch==", "timm==", "numpy==", "pandas==", "mlflow=="):
        assert name in requirements, name
    assert "+cu" not in requirements  # no local version labels pip could not resolve elsewhere


def test_champion_loads_in_a_fresh_process_and_matches_the_detector(champion, store, images, reference, tmp_path):
    script = (
        textwrap.dedent("""
        import base64, json, sys
        import mlflow, pandas as pd
        paths = sys.argv[1:]
        model = mlflow.pyfunc.load_model("models:/%s@champion")
        frame = pd.DataFrame({"image": [base64.b64encode(open(p, "rb").read()).decode() for p in paths]})
        out = model.predict(frame, params={"anomaly_map": "full"})
        import vpdm, tune.mlflow_model
        print(json.dumps({"scores": out["score"].tolist(), "maps": out["anomaly_map"].tolist(),
                          "errors": out["error"].tolist(), "vpdm": vpdm.__file__,
                          "tune": tune.mlflow_model.__file__}))
    """)
        % MODEL_NAME
    )
    # cwd outside the checkout, no PYTHONPATH: the loaded model must bring what it needs
    env = _env(store)
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, "-c", script, *map(str, images)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=PATIENCE_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["errors"] == [None] * len(images)
    for path, score, amap in zip(images, got["scores"], got["maps"]):
        ref_score, ref_map = reference[str(path)]
        assert score == pytest.approx(ref_score, rel=REL, abs=TOL)
        assert np.asarray(amap).shape == ref_map.shape
        assert np.abs(np.asarray(amap) - ref_map).max() < 1e-3
    # the model ran on the library source it carries, not on the checkout
    assert Path("code", "vpdm", "__init__.py").as_posix() in Path(got["vpdm"]).as_posix()
    assert Path("code", "tune", "mlflow_model.py").as_posix() in Path(got["tune"]).as_posix()


def test_champion_version_tags_and_alias(champion):
    client = MlflowClient()
    version = champion["version"]
    assert version.aliases == ["champion"]
    assert version.tags == {"sweep": "test-sweep", "dataset": "demo", "metrics.image_auroc": "0.75"}
    assert version.run_id == champion["run_id"]
    assert client.get_model_version_by_alias(MODEL_NAME, "champion").version == version.version


def test_second_version_takes_the_alias_and_the_first_is_kept(champion, store, checkpoint):
    client = MlflowClient()
    first = champion["version"]
    with mlflow.start_run(experiment_id=store["experiment_id"]) as run:
        log_pyfunc_model(checkpoint)  # synthetic input example
    second = register_champion(run.info.run_id, model_name=MODEL_NAME, tags={"sweep": "second", "trial": 7})
    assert int(second.version) == int(first.version) + 1
    assert second.aliases == ["champion"] and second.tags == {"sweep": "second", "trial": "7"}
    assert client.get_model_version_by_alias(MODEL_NAME, "champion").version == second.version
    old = client.get_model_version(MODEL_NAME, first.version)  # still there, tags intact, alias gone
    assert old.aliases == [] and old.tags["sweep"] == "test-sweep" and old.status == "READY"
    assert len(client.search_model_versions(f"name='{MODEL_NAME}'")) == 2
    assert load_detector_model(f"models:/{MODEL_NAME}/{first.version}") is not None


def test_registry_refuses_bad_names_and_reports_missing_ones(champion):
    for bad in ("", "   ", None, "a/b", "x@y"):
        with pytest.raises(MlflowException, match="registered model name"):
            register_champion(champion["run_id"], model_name=bad)
    with pytest.raises(MlflowException, match="alias"):
        register_champion(champion["run_id"], model_name=MODEL_NAME, alias="latest")
    with pytest.raises(MlflowException, match="not found"):
        register_champion("0" * 32, model_name=MODEL_NAME)
    with pytest.raises(MlflowException, match="no model logged as 'other'"):
        register_champion(champion["run_id"], model_name=MODEL_NAME, artifact_path="other")
    with pytest.raises(MlflowException, match="no registered model named 'nope'"):
        load_detector_model("models:/nope@champion")
    with pytest.raises(MlflowException, match="no alias 'staging'.*@champion"):
        load_detector_model(f"models:/{MODEL_NAME}@staging")
    with pytest.raises(MlflowException, match="no version '99'"):
        load_detector_model(f"models:/{MODEL_NAME}/99")


def test_a_tampered_checkpoint_in_a_logged_model_is_refused_at_load(champion, tmp_path):
    """Replace the weights inside a downloaded copy of the model with a pickle that runs code."""
    import pickle

    import torch

    local = Path(mlflow.artifacts.download_artifacts(champion["info"].model_uri, dst_path=str(tmp_path / "m")))
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": Payload()}, local / "artifacts" / "model.pt")
    assert pickle.dumps(Payload())  # the payload would run on a plain pickle.load
    with pytest.raises(Exception, match="model.pt"):
        mlflow.pyfunc.load_model(str(local))
    assert not marker.exists()


def test_log_needs_an_active_run(checkpoint, store):
    assert mlflow.active_run() is None
    with pytest.raises(MlflowException, match="active run"):
        log_pyfunc_model(checkpoint)


# --------------------------------------------------------------------------------------------
# predict: bad items, empty input, missing column
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(champion):
    return load_detector_model(f"models:/{MODEL_NAME}/{champion['version'].version}")


def test_bad_items_fail_alone(loaded, images, reference):
    good = images[0].read_bytes()
    frame = pd.DataFrame(
        {
            "image": [
                _b64(good),
                _b64(good[:200]),
                _b64(b"hello, not an image"),
                "%%% not base64 %%%",
                None,
                _b64(images[1].read_bytes()),
            ],
            "path": ["a", "b", "c", "d", "e", "f"],  # extra columns are ignored
        }
    )
    out = loaded.predict(frame)
    assert list(out.columns) == list(OUTPUT_COLUMNS) and len(out) == 6
    assert out["score"].iloc[0] == pytest.approx(reference[str(images[0])][0], rel=REL, abs=TOL)
    assert out["score"].iloc[5] == pytest.approx(reference[str(images[1])][0], rel=REL, abs=TOL)
    assert out["error"].iloc[0] is None and out["error"].iloc[5] is None
    assert np.asarray(out["anomaly_map"].iloc[0]).shape == (16, 16)  # the default: a small map
    for i, pattern in [
        (1, "row 1: cannot decode image"),
        (2, "row 2: not a PNG, JPEG, BMP or TIFF"),
        (3, "row 3: not valid base64"),
        (4, "row 4: expected a base64 string"),
    ]:
        assert np.isnan(out["score"].iloc[i]) and out["anomaly_map"].iloc[i] is None
        assert out["error"].iloc[i].startswith(pattern), out["error"].iloc[i]


def test_huge_and_tiny_images_are_refused_per_item(checkpoint, images, reference):
    """Headers claiming 20000 x 20000 (over twice PIL's limit) and 10000 x 10000 (between its warning and its
    error) are refused before any decoding; sides under 8 px are refused; the good items are scored."""
    detector = Detector.from_checkpoint(checkpoint)
    eight = png_bytes(np.full((8, 8, 3), 128, np.uint8))
    payloads = [
        declared_size_png(20000, 20000),
        images[0].read_bytes(),
        declared_size_png(10000, 10000),
        png_bytes(np.zeros((1, 1), np.uint8)),
        png_bytes(np.zeros((2, 3, 3), np.uint8)),
        eight,
        images[1].read_bytes(),
    ]
    out = predict_frame(detector, pd.DataFrame({"image": [_b64(p) for p in payloads]}), batch_size=4)
    assert out["error"].iloc[0].startswith("row 0: refused, image too large (Image size (400000000 pixels) exceeds")
    assert (
        out["error"]
        .iloc[2]
        .startswith(
            "row 2: refused, image too large (Image size (100000000 pixels) exceeds "
            f"limit of {Image.MAX_IMAGE_PIXELS} pixels"
        )
    )
    assert out["error"].iloc[3] == (
        "row 3: 1x1 pixels is too small, expected at least 8 pixels on each side "
        "(small images are refused, not upscaled)"
    )
    assert out["error"].iloc[4].startswith("row 4: 3x2 pixels is too small")
    for i in (0, 2, 3, 4):
        assert np.isnan(out["score"].iloc[i]) and out["anomaly_map"].iloc[i] is None
    for i, path in [(1, images[0]), (6, images[1])]:
        assert out["error"].iloc[i] is None
        assert out["score"].iloc[i] == pytest.approx(reference[str(path)][0], rel=REL, abs=TOL)
    assert out["error"].iloc[5] is None and np.isfinite(out["score"].iloc[5])  # 8 x 8: the smallest accepted


def test_decoding_matches_an_independent_expectation():
    """16-bit gray: round(v * 255 / 65535), a ramp not clipped to white; 16-bit colour: the high byte;
    gray: replicated; RGBA: its RGB part. 64 px sources at image_size 64, so no resampling is involved."""
    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    ramp8 = ((ramp.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    got = decode_image_bytes(png_bytes(ramp), 64)
    assert got.dtype == np.uint8 and got.shape == (64, 64, 3)
    assert np.array_equal(got, np.repeat(ramp8[..., None], 3, axis=-1))
    assert got[0, 0, 0] == 0 and got[-1, -1, 0] == 255 and len(np.unique(got)) == 256  # the full 8-bit ramp
    assert np.abs(got[..., 0].astype(int) - (ramp >> 8)).max() <= 1
    rng = np.random.default_rng(0)
    colour16 = rng.integers(0, 65536, (64, 64, 3)).astype(np.uint16)
    assert np.array_equal(decode_image_bytes(raw_png16(colour16), 64), (colour16 >> 8).astype(np.uint8))
    rgba = rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)
    assert np.array_equal(decode_image_bytes(png_bytes(rgba), 64), rgba[..., :3])
    gray = rgba[..., 0].copy()
    assert np.array_equal(decode_image_bytes(png_bytes(gray), 64), np.repeat(gray[..., None], 3, axis=-1))


def test_converted_images_score_like_their_rgb(loaded):
    """Through the loaded pyfunc model: each converted image scores like the plain RGB file of the same pixels."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    gray = rgb[..., 2].copy()
    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    ramp8 = ((ramp.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    pairs = [
        (png_bytes(np.concatenate([rgb, rng.integers(0, 256, (64, 64, 1), dtype=np.uint8)], -1)), png_bytes(rgb)),
        (png_bytes(gray), png_bytes(np.repeat(gray[..., None], 3, -1))),
        (png_bytes(ramp), png_bytes(np.repeat(ramp8[..., None], 3, -1))),
    ]
    out = loaded.predict(pd.DataFrame({"image": [_b64(b) for pair in pairs for b in pair]}))
    assert out["error"].tolist() == [None] * 6
    for k in range(3):
        assert out["score"].iloc[2 * k] == pytest.approx(out["score"].iloc[2 * k + 1], rel=1e-5), k
        np.testing.assert_allclose(
            out["anomaly_map"].iloc[2 * k], out["anomaly_map"].iloc[2 * k + 1], rtol=1e-5, atol=1e-4
        )


def test_empty_frame_and_missing_column(loaded, checkpoint):
    out = loaded.predict(images_to_frame([]))
    assert list(out.columns) == list(OUTPUT_COLUMNS) and len(out) == 0
    # {"dataframe_records": []} arrives as a frame without any column: still an empty request, an empty answer
    out = loaded.predict(pd.DataFrame([]))
    assert list(out.columns) == list(OUTPUT_COLUMNS) and len(out) == 0
    with pytest.raises(MlflowException, match="input has no 'image' column .*columns: \\['picture'\\]"):
        loaded.predict(pd.DataFrame({"picture": ["x"]}))
    with pytest.raises(MlflowException, match="no 'image' column"):
        predict_frame(Detector.from_checkpoint(checkpoint), pd.DataFrame({"picture": ["x"]}))


def test_the_caller_chooses_what_map_comes_back(loaded, images, reference):
    """Through the loaded model's params: checked against the library's full map, reduced here with numpy."""
    import io
    import json

    frame = images_to_frame(images[:2])
    ref = [reference[str(p)][1].astype(np.float64) for p in images[:2]]  # 64 x 64
    small = loaded.predict(frame)  # default
    for got, full in zip(small["anomaly_map"], ref):
        blocks = full.reshape(16, 4, 16, 4).mean(axis=(1, 3))  # 16 x 16 block means of the 64 px map
        np.testing.assert_allclose(np.asarray(got), blocks, rtol=1e-4, atol=1e-4)
    eight = loaded.predict(frame, params={"map_side": 8})
    np.testing.assert_allclose(
        np.asarray(eight["anomaly_map"].iloc[0]), ref[0].reshape(8, 8, 8, 8).mean(axis=(1, 3)), rtol=1e-4, atol=1e-4
    )
    none = loaded.predict(frame, params={"anomaly_map": "none"})
    assert none["anomaly_map"].tolist() == [None, None] and np.allclose(none["score"], small["score"])
    full = loaded.predict(frame, params={"anomaly_map": "full"})
    for got, want in zip(full["anomaly_map"], ref):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
    png = loaded.predict(frame, params={"anomaly_map": "png"})
    for got, want in zip(png["anomaly_map"], ref):
        with Image.open(io.BytesIO(base64.b64decode(got))) as im:
            assert im.format == "PNG" and im.mode == "L" and im.size == (64, 64)
            assert np.abs(np.asarray(im).astype(int) - np.rint(255 * want / want.max())).max() <= 1
    scaled = loaded.predict(frame, params={"anomaly_map": "png", "png_vmax": float(2 * ref[0].max())})
    with Image.open(io.BytesIO(base64.b64decode(scaled["anomaly_map"].iloc[0]))) as im:
        assert abs(int(np.asarray(im).max()) - 128) <= 1  # a fixed scale: half of it is mid-grey
    # what a 100-image answer weighs: the default stays small, the full float map does not
    per_image = {
        kind: len(json.dumps(out["anomaly_map"].iloc[0]))
        for kind, out in (("small", small), ("full", full), ("none", none))
    }
    assert per_image["small"] * 100 < 1_000_000 < per_image["full"] * 100 * 320**2 / 64**2, per_image
    for bad, needle in [
        ({"anomaly_map": "jpeg"}, "anomaly_map='jpeg'"),
        ({"map_side": 0}, "map_side=0"),
        ({"png_vmax": -1.0}, "png_vmax=-1.0"),
    ]:
        with pytest.raises(MlflowException, match=needle):
            loaded.predict(frame, params=bad)


def test_the_answer_carries_decisions_at_the_calibrated_or_requested_thresholds(checkpoint, images, reference):
    from vpdm.decision.postprocess import normalise

    detector = Detector.from_checkpoint(checkpoint)
    cal = detector.calibration
    frame = images_to_frame(images)
    frame["category"] = ["demo/grid", None, "", "demo/blobs"]
    out = predict_frame(detector, frame)
    assert list(out.columns) == list(OUTPUT_COLUMNS)
    assert out["category"].iloc[0] == "demo/grid" and out["category"].iloc[3] == "demo/blobs"
    for i, path in enumerate(images):
        t = cal.classes[out["category"].iloc[i]]
        score = reference[str(path)][0]
        assert out["score"].iloc[i] == pytest.approx(score, rel=REL, abs=TOL)
        assert out["pred_label"].iloc[i] == int(out["score"].iloc[i] > t.image_threshold)
        assert out["pred_score"].iloc[i] == pytest.approx(
            normalise(out["score"].iloc[i], t.image_threshold, t.image_min, t.image_max)
        )
        small = np.asarray(out["pred_mask"].iloc[i])  # 16 x 16: a block is 1 when any of its pixels is
        full = reference[str(path)][1] > t.pixel_threshold
        assert small.shape == (16, 16) and (small == full.reshape(16, 4, 16, 4).any(axis=(1, 3))).all()
    # a per-call override; the same numbers through the library's own PostProcessor
    over = predict_frame(
        detector, frame, params={"image_threshold": 0.0, "pixel_threshold": 1e9, "anomaly_map": "full"}
    )
    assert over["pred_label"].tolist() == [1, 1, 1, 1]
    assert all(not np.asarray(m).any() for m in over["pred_mask"])
    # an unknown class fails its item only
    frame["category"] = ["demo/nope", None, None, None]
    bad = predict_frame(detector, frame)
    assert "category 'demo/nope' is not one the model was calibrated for" in bad["error"].iloc[0]
    assert np.isnan(bad["score"].iloc[0]) and bad["pred_label"].iloc[0] is None and bad["error"].iloc[1] is None


@pytest.mark.parametrize(
    "params, needle",
    [
        ({"image_threshold": float("nan")}, "image_threshold must be a finite"),
        ({"pixel_threshold": -1.0}, "pixel_threshold must be a finite"),
        ({"image_threshold": "high"}, "image_threshold must be a finite"),
    ],
)
def test_bad_threshold_params_are_refused_by_name(checkpoint, images, params, needle):
    with pytest.raises(MlflowException, match=needle):
        predict_frame(Detector.from_checkpoint(checkpoint), images_to_frame(images[:1]), params=params)


def test_an_uncalibrated_model_answers_scores_without_decisions(checkpoint, images, reference, tmp_path):
    import torch

    payload = torch.load(checkpoint, weights_only=True)
    payload.pop("calibration")
    torch.save(payload, tmp_path / "old.pt")
    detector = Detector.from_checkpoint(tmp_path / "old.pt")
    assert detector.calibration is None
    out = predict_frame(detector, images_to_frame(images[:2]))
    assert out["score"].iloc[0] == pytest.approx(reference[str(images[0])][0], rel=REL, abs=TOL)
    assert out["pred_label"].tolist() == [None, None] and out["pred_score"].isna().all()
    both = predict_frame(detector, images_to_frame(images[:2]), params={"image_threshold": 0.0, "pixel_threshold": 0.0})
    assert both["pred_label"].tolist() == [1, 1] and both["category"].tolist() == ["", ""]
    with pytest.raises(MlflowException, match="an image threshold was given without a pixel threshold"):
        predict_frame(detector, images_to_frame(images[:1]), params={"image_threshold": 0.0})  # decides nothing
    frame = images_to_frame(images[:1])
    frame["category"] = ["demo/nope"]
    out = predict_frame(detector, frame, params={"image_threshold": 0.0, "pixel_threshold": 0.0})
    assert "category 'demo/nope' is not one the model was trained for" in out["error"].iloc[0]


# --------------------------------------------------------------------------------------------
# jobs/score.py
# --------------------------------------------------------------------------------------------


def test_score_job_end_to_end(champion, store, checkpoint, images, reference, tmp_path):
    folder = tmp_path / "incoming"
    (folder / "nested").mkdir(parents=True)
    (folder / "a.png").write_bytes(images[0].read_bytes())
    (folder / "nested" / "b.png").write_bytes(images[3].read_bytes())
    (folder / "nested" / "broken.png").write_bytes(images[0].read_bytes()[:150])
    (folder / "tiny.png").write_bytes(png_bytes(np.zeros((2, 3, 3), np.uint8)))
    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    (folder / "ramp16.png").write_bytes(png_bytes(ramp))
    out = tmp_path / "scored"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "jobs" / "score.py"),
            "--model",
            f"models:/{MODEL_NAME}@champion",
            "--images",
            str(folder),
            "--output",
            str(out),
            "--tracking-uri",
            store["uri"],
        ],
        cwd=tmp_path,
        env=_env(store),
        capture_output=True,
        text=True,
        timeout=PATIENCE_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scored 3 image(s)" in proc.stdout and "2 failed" in proc.stdout
    rows = {r["path"]: r for r in csv.DictReader(open(out / "scores.csv"))}
    assert set(rows) == {"a.png", "nested/b.png", "nested/broken.png", "ramp16.png", "tiny.png"}
    assert float(rows["a.png"]["score"]) == pytest.approx(reference[str(images[0])][0], rel=REL, abs=TOL)
    assert rows["a.png"]["pred_label"] in ("0", "1") and rows["a.png"]["category"] in ("demo/grid", "demo/blobs")
    assert 0 <= float(rows["a.png"]["pred_score"]) <= 1 and rows["a.png"]["pred_mask"] == "masks/a.png"
    with Image.open(out / "masks" / "a.png") as im:
        assert im.size == (64, 64) and set(np.unique(np.asarray(im)).tolist()) <= {0, 255}
    assert rows["tiny.png"]["pred_label"] == "" and rows["tiny.png"]["pred_mask"] == ""
    assert float(rows["nested/b.png"]["score"]) == pytest.approx(reference[str(images[3])][0], rel=REL, abs=TOL)
    assert rows["nested/broken.png"]["score"] == "" and "cannot decode" in rows["nested/broken.png"]["error"]
    assert rows["tiny.png"]["score"] == "" and rows["tiny.png"]["error"].startswith("3x2 pixels is too small")
    assert "failed: tiny.png: 3x2 pixels is too small, expected at least 8 pixels on each side" in proc.stdout
    (lib,) = Detector.from_checkpoint(checkpoint).predict_files([folder / "ramp16.png"], progress=False)
    assert rows["ramp16.png"]["error"] == "" and float(rows["ramp16.png"]["score"]) == pytest.approx(
        lib.score, rel=REL, abs=TOL
    )
    overlays = sorted(p.name for p in (out / "overlays").iterdir())
    assert overlays == ["a.png", "nested__b.png", "ramp16.png"]
    with Image.open(out / "overlays" / "a.png") as im:
        assert im.size == (64, 64) and im.mode == "RGB"


def test_score_job_bad_inputs_exit_2(champion, store, tmp_path, capsys):
    from jobs.score import main as score_main

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "x.png").write_bytes(b"")
    (tmp_path / "blocker").write_text("a file")
    base = ["--images", str(folder), "--output", str(tmp_path / "o")]
    cases = [
        (
            [
                "--model",
                f"models:/{MODEL_NAME}@champion",
                "--images",
                str(folder),
                "--output",
                str(tmp_path / "blocker" / "o"),
                "--tracking-uri",
                store["uri"],
            ],
            f"cannot write output folder {str(tmp_path / 'blocker' / 'o')!r}: {str(tmp_path / 'blocker')!r} is a file, "
            "not a folder",
        ),
        (
            ["--model", f"models:/{MODEL_NAME}@champion", "--images", str(tmp_path / "missing"), "--output", "o"],
            "does not exist",
        ),
        (
            ["--model", "models:/nope@champion", *base, "--tracking-uri", store["uri"]],
            "no registered model named 'nope'",
        ),
        (["--model", f"models:/{MODEL_NAME}@staging", *base, "--tracking-uri", store["uri"]], "no alias 'staging'"),
        (
            ["--model", f"models:/{MODEL_NAME}@champion", *base, "--tracking-uri", f"http://127.0.0.1:{_free_port()}"],
            "unreachable",
        ),
        (
            ["--model", f"models:/{MODEL_NAME}@champion", *base, "--tracking-uri", f"sqlite:///{tmp_path / 'no.db'}"],
            "does not exist",
        ),
    ]
    try:
        for argv, message in cases:
            assert score_main(argv) == 2, argv
            assert message in capsys.readouterr().err, argv
    finally:
        mlflow.set_tracking_uri(store["uri"])


def test_score_job_never_replaces_a_previous_run_or_writes_into_its_input(champion, store, images, tmp_path, capsys):
    """The rule of every vpdm command: an existing scores.csv is refused unless --overwrite, which then replaces
    the previous run as a whole; an output inside --images is refused; every file not scored has a row."""
    from jobs.score import main as score_main

    many, one = tmp_path / "many", tmp_path / "one"
    many.mkdir()
    one.mkdir()
    for i, p in enumerate(images):
        (many / f"{i}.png").write_bytes(p.read_bytes())
    (one / "x.png").write_bytes(images[0].read_bytes())
    with Image.open(images[0]) as im:
        im.save(one / "photo.webp")
    out = tmp_path / "scored"
    base = ["--model", f"models:/{MODEL_NAME}@champion", "--output", str(out), "--tracking-uri", store["uri"]]
    try:
        assert score_main([*base, "--images", str(many)]) == 0
        first = (out / "scores.csv").read_bytes()
        assert len(list((out / "overlays").iterdir())) == 4
        capsys.readouterr()
        assert score_main([*base, "--images", str(one)]) == 2
        assert f"scores {str(out / 'scores.csv')!r} exists; pass --overwrite" in capsys.readouterr().err
        assert (out / "scores.csv").read_bytes() == first
        assert score_main([*base, "--images", str(one), "--overwrite"]) == 0
        assert "1 not scored" in capsys.readouterr().out
        with open(out / "scores.csv", newline="") as f:
            rows = {r["path"]: r for r in csv.DictReader(f)}
        assert set(rows) == {"x.png", "photo.webp"} and "'.webp' files are not read" in rows["photo.webp"]["error"]
        assert sorted(p.name for p in (out / "overlays").iterdir()) == ["x.png"]  # not mixed with the first run's
        assert sorted(p.name for p in out.iterdir()) == ["masks", "overlays", "scores.csv"]
        inside = [
            "--model",
            f"models:/{MODEL_NAME}@champion",
            "--images",
            str(many),
            "--output",
            str(many / "o"),
            "--tracking-uri",
            store["uri"],
            "--overwrite",
        ]
        assert score_main(inside) == 2
        assert f"is inside the input {str(many)!r}" in capsys.readouterr().err
        assert sorted(p.name for p in many.iterdir()) == ["0.png", "1.png", "2.png", "3.png"]
    finally:
        mlflow.set_tracking_uri(store["uri"])


# --------------------------------------------------------------------------------------------
# mlflow models serve
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_models_serve_answers_invocations(champion, store, images, reference, tmp_path):
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    # `mlflow models serve` execs `uvicorn` through the shell, so this env's bin/ must be on PATH.
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            f"models:/{MODEL_NAME}@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-w",
            "1",
        ],
        cwd=tmp_path,
        env=_env(store),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + PATIENCE_S  # it answers /ping once the model is loaded: wait for that
        while True:
            assert proc.poll() is None, (
                f"server exited with {proc.returncode}:\n{(tmp_path / 'serve.log').read_text()[-3000:]}"
            )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=10) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            assert time.monotonic() < deadline, (
                "server did not come up:\n" + (tmp_path / "serve.log").read_text()[-3000:]
            )
            time.sleep(0.5)
        body = {"dataframe_split": {"columns": ["image"], "data": [[_b64(images[2].read_bytes())]]}}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=PATIENCE_S) as r:
            assert r.status == 200
            answer = json.loads(r.read())
        (prediction,) = answer["predictions"]
        assert set(prediction) == set(OUTPUT_COLUMNS) and prediction["error"] is None
        assert prediction["score"] == pytest.approx(reference[str(images[2])][0], rel=REL, abs=TOL)
        assert np.asarray(prediction["anomaly_map"]).shape == (16, 16)  # the default: a small map

        def invoke(payload: dict) -> tuple[int, dict]:
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations",
                json.dumps(payload).encode(),
                {"Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(req, timeout=PATIENCE_S) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as exc:
                return exc.code, json.loads(exc.read())

        status, answer = invoke({**body, "params": {"anomaly_map": "full"}})
        assert status == 200 and np.asarray(answer["predictions"][0]["anomaly_map"]).shape == (64, 64)
        assert invoke({"dataframe_records": []}) == (200, {"predictions": []})  # as SERVING.md promises
        status, answer = invoke({"dataframe_records": [{"picture": "x"}]})
        assert status == 400 and "no 'image' column" in answer["message"], answer
        status, answer = invoke({**body, "params": {"anomaly_map": "jpeg"}})
        assert status == 400 and "anomaly_map='jpeg'" in answer["message"], answer
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=PATIENCE_S)
        log.close()
