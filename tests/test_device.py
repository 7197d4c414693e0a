"""``--device`` on every command and ``inference.precision`` (bf16 / fp16 autocast), tested on the CPU.

No GPU is needed: a CUDA device that is not there must be refused by name before any work, the
device a command is given must be the one extraction and scoring run on, and reduced precision is
checked against the independent truth of the same checkpoint scored in float32.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

import vpdm.runtime.device
import vpdm.training.engine as engine
from tests.conftest import train_checkpoint
from tests.test_cli import TINY
from vpdm.cli.commands import main
from vpdm.config.schema import VPDMConfig, saved_config
from vpdm.config.values import to_dict
from vpdm.data.dataset import AnomalyDataset
from vpdm.data.demo import make_demo_dataset
from vpdm.data.layouts import list_samples
from vpdm.errors import ConfigError, VPDMError
from vpdm.features.backbone import FeatureExtractor, total_images_seen
from vpdm.features.cache import extract_features
from vpdm.inference.detector import Detector
from vpdm.model.vpdm_model import VPDM
from vpdm.runtime.precision import check_precision

# bf16 keeps 8 bits of mantissa (relative rounding 2^-9 ~ 0.2% per operation), fp16 11 bits. The default image
# score is a sum of standardised terms whose zero is arbitrary, so its error is measured against the scores' spread
# over the images (std). Measured on this fixture (3 classes, 36 test images, random-init Lite0 at 64 px, 64 fine
# prototypes): bf16 moves scores by at most 26% of their spread (mean 6.6%), Spearman 0.986, maps 8.7% (relative
# L2); fp16 6.6% (mean 1.9%), 0.9997, 2.8%. The fine prototypes' nearest distances carry the backbone's rounding
# (README "Reduced precision"). The bounds leave room for other CPUs' kernels while still failing on a broken cast
# (a float16 overflow, a wrong dtype round trip: errors of the order of the spread itself).
SCORE_RTOL = 0.05  # the denoiser alone under autocast, relative to each score
SPREAD_TOL = 0.4
MAP_RTOL = 0.15
MIN_SPEARMAN = 0.98


@pytest.fixture(scope="module")
def demo3(tmp_path_factory):
    """Three classes, so that image scores spread over a range and their ranking is meaningful."""
    root = tmp_path_factory.mktemp("demo3")
    make_demo_dataset(root, classes=3, train_per_class=8, test_good_per_class=6, test_defect_per_class=6, size=64)
    return root


@pytest.fixture(scope="module")
def checkpoint(demo3, tmp_path_factory):
    return train_checkpoint(demo3, tmp_path_factory, TINY)


@pytest.fixture(scope="module")
def test_files(demo3):
    return [s.image_path for s in list_samples(f"demo:{demo3}", "test")]


@pytest.fixture()
def no_cuda(monkeypatch):
    """A machine without CUDA, also on a GPU runner."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# --------------------------------------------------------------------------------------------
# (a) select_device and refusals on the command line
# --------------------------------------------------------------------------------------------


def test_auto_is_cpu_without_cuda(no_cuda):
    assert engine.select_device("auto") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_auto_is_cpu_on_this_machine():
    assert engine.select_device("auto") == torch.device("cpu")
    assert engine.select_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize(
    "name, needle",
    [
        ("cuda", "--device='cuda' but no CUDA device is available; use 'cpu' or 'auto'"),
        ("cuda:1", "--device='cuda:1' but no CUDA device is available"),
        ("nonsense", "--device='nonsense' is not a torch device (expected 'auto', 'cpu', 'cuda', 'cuda:N')"),
        ("cuda:x", "--device='cuda:x' is not a torch device"),
    ],
)
def test_select_device_names_the_value(name, needle, no_cuda):
    with pytest.raises(VPDMError) as info:
        engine.select_device(name, what="--device")
    assert needle in str(info.value)


def _command(command: str, checkpoint, data, out) -> list[str]:
    """A command line on the demo ``data`` writing under ``out`` (nothing there before)."""
    if command == "evaluate":
        return [
            "evaluate",
            "--checkpoint",
            str(checkpoint),
            "--output",
            str(out / "m.json"),
            "--plots",
            str(out / "plots"),
        ]
    if command == "predict":
        return [
            "predict",
            "--checkpoint",
            str(checkpoint),
            "--images",
            str(data / "grid" / "test"),
            "--output",
            str(out),
        ]
    if command == "calibrate":
        return ["calibrate", "--checkpoint", str(checkpoint), "--output", str(out / "model.pt")]
    return ["train", "--data", f"demo:{data}", "--output", str(out), "--epochs", "1", *TINY]


@pytest.mark.parametrize("command", ["train", "evaluate", "predict", "calibrate"])
@pytest.mark.parametrize(
    "device, needle",
    [
        ("cuda", "--device='cuda' but no CUDA device is available"),
        ("nonsense", "--device='nonsense' is not a torch device"),
    ],
)
def test_a_device_that_is_not_there_fails_before_any_work(
    command, device, needle, checkpoint, demo3, tmp_path, capsys, no_cuda
):
    before = checkpoint.read_bytes()
    out = tmp_path / "out"
    argv = _command(command, checkpoint, demo3, out) + [
        "--device",
        device,
        "--no-progress",
        "--set",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    seen = total_images_seen()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and f"vpdm {command}: error: " in err and needle in err, err
    assert total_images_seen() == seen  # not one image through the backbone
    assert not out.exists()  # nothing written, not even the output folder
    assert checkpoint.read_bytes() == before and not checkpoint.with_name("model.pt.bak").exists()


def test_score_job_refuses_a_missing_cuda_device_before_loading_the_model(test_files, tmp_path, capsys, no_cuda):
    from jobs.score import main as score_main
    from jobs.score import parse_args

    assert parse_args(["--model", "m", "--images", "i", "--output", "o"]).device == "auto"
    out = tmp_path / "scored"
    code = score_main(
        [
            "--model",
            "models:/nothing@champion",
            "--images",
            str(test_files[0].parent),
            "--output",
            str(out),
            "--device",
            "cuda",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--device='cuda' but no CUDA device is available" in err, err
    assert not out.exists()


def test_a_detector_on_a_missing_cuda_device_is_a_clear_error(checkpoint, no_cuda):
    with pytest.raises(VPDMError, match="device='cuda' but no CUDA device is available"):
        Detector.from_checkpoint(checkpoint, device="cuda")
    assert Detector.from_checkpoint(checkpoint, device="auto").device == torch.device("cpu")


# --------------------------------------------------------------------------------------------
# (b) the device given is the one extraction and scoring run on
# --------------------------------------------------------------------------------------------


@pytest.fixture()
def probe(monkeypatch):
    """Where the backbone and the denoiser chain ran, which device names were resolved, and where the two
    networks were moved.

    ``select_device`` maps the made-up ``cuda:7`` to ``cpu:0``: the CPU (the only device here), but a
    ``torch.device`` unequal to the plain ``cpu`` a default would give. A network moved ``.to(cpu:0)``
    was therefore moved to what the command's --device resolved to, not to a default.
    """
    seen: dict[str, list] = {"resolved": [], "backbone": [], "detect": [], "extractor_to": [], "model_to": []}
    real_select, real_forward, real_detect = engine.select_device, FeatureExtractor.forward, VPDM.detect

    def select(name="auto", what="train.device", precision="fp32"):
        seen["resolved"].append((str(name), what))
        return real_select("cpu:0" if str(name) == "cuda:7" else name, what, precision)

    def mover(key):
        def to(self, *args, **kwargs):
            seen[key].append(args[0] if args else kwargs.get("device"))
            return torch.nn.Module.to(self, *args, **kwargs)

        return to

    def forward(self, images):
        seen["backbone"].append((self.device, self.precision))
        return real_forward(self, images)

    def detect(self, features, *args, **kwargs):
        seen["detect"].append((features.device, next(self.parameters()).device, kwargs.get("precision", "fp32")))
        return real_detect(self, features, *args, **kwargs)

    # the commands import it from vpdm.runtime.device when they run; engine bound its own name at import
    monkeypatch.setattr(vpdm.runtime.device, "select_device", select)
    monkeypatch.setattr(engine, "select_device", select)
    monkeypatch.setattr(FeatureExtractor, "forward", forward)
    monkeypatch.setattr(VPDM, "detect", detect)
    monkeypatch.setattr(FeatureExtractor, "to", mover("extractor_to"))
    monkeypatch.setattr(VPDM, "to", mover("model_to"))
    return seen


@pytest.mark.parametrize("command", ["train", "evaluate", "predict", "calibrate"])
def test_the_device_option_reaches_extraction_and_scoring(command, probe, checkpoint, demo3, tmp_path):
    out = tmp_path / "out"
    # a cold cache: the features are extracted now, on the device
    argv = _command(command, checkpoint, demo3, out) + [
        "--device",
        "cuda:7",
        "--no-progress",
        "--set",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    assert main(argv) == 0
    assert ("cuda:7", "--device") in probe["resolved"]
    assert torch.device("cpu:0") in probe["extractor_to"] and torch.device("cpu:0") in probe["model_to"]
    assert probe["backbone"] and all(d == torch.device("cpu") for d, _ in probe["backbone"])
    # train scores its held-out calibration images; the others score what they were asked to
    assert probe["detect"] and all(f == torch.device("cpu") and m == torch.device("cpu") for f, m, _ in probe["detect"])
    if command == "train":  # --device is the shortcut of --set train.device=...
        assert "device: cuda:7" in (out / "config.yaml").read_text()


def test_the_checkpoints_train_device_is_not_where_it_runs_now(checkpoint, tmp_path, probe, no_cuda):
    """A model trained on a GPU (train.device=cuda in its config) still evaluates on a CPU-only machine."""
    from vpdm.inference.checkpoint import read_checkpoint

    payload = read_checkpoint(checkpoint)
    payload["config"]["train"]["device"] = "cuda"
    gpu_trained = tmp_path / "gpu.pt"
    torch.save(payload, gpu_trained)
    assert (
        main(["evaluate", "--checkpoint", str(gpu_trained), "--output", str(tmp_path / "m.json"), "--no-progress"]) == 0
    )
    assert ("auto", "--device") in probe["resolved"]


# --------------------------------------------------------------------------------------------
# (c) reduced precision against float32 on the same checkpoint
# --------------------------------------------------------------------------------------------


def _supported(precision: str) -> bool:
    try:
        check_precision(precision, "cpu")
    except ConfigError:
        return False
    return True


def _scores_and_maps(checkpoint, files, precision: str):
    detector = Detector.from_checkpoint(checkpoint, device="cpu", overrides=[f"inference.precision={precision}"])
    results = detector.predict_files(files, progress=False)
    assert all(r.error is None for r in results)
    return (
        np.array([r.score for r in results], dtype=np.float64),
        np.stack([r.anomaly_map for r in results]).astype(np.float64),
    )


@pytest.fixture(scope="module")
def fp32_results(checkpoint, test_files):
    return _scores_and_maps(checkpoint, test_files, "fp32")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_scores_match_float32_within_tolerance(precision, checkpoint, test_files, fp32_results):
    if not _supported(precision):
        pytest.skip(f"torch {torch.__version__} has no CPU autocast to {precision}")
    scores, maps = _scores_and_maps(checkpoint, test_files, precision)
    ref_scores, ref_maps = fp32_results
    assert scores.dtype == ref_scores.dtype and np.isfinite(scores).all() and np.isfinite(maps).all()
    relative = np.abs(scores - ref_scores) / np.abs(ref_scores)
    spread = np.abs(scores - ref_scores) / ref_scores.std()
    rho = spearmanr(scores, ref_scores)[0]
    map_error = np.linalg.norm(maps - ref_maps) / np.linalg.norm(ref_maps)
    print(
        f"{precision} vs fp32 on {len(scores)} images: image score relative difference max {relative.max():.4f} "
        f"mean {relative.mean():.4f}, over the scores' spread max {spread.max():.4f} mean {spread.mean():.4f}, "
        f"Spearman {rho:.4f}, map relative L2 {map_error:.4f}"
    )
    # Autocast really ran: the answers moved (a silently disabled autocast gives float32 exactly).
    assert relative.max() > 1e-5
    assert spread.max() < SPREAD_TOL
    assert rho > MIN_SPEARMAN
    assert map_error < MAP_RTOL


def test_both_networks_run_under_autocast_and_come_back_as_float32(checkpoint, demo3):
    """bf16 in the backbone alone and in the denoiser alone each change the result a little, not a lot."""
    from vpdm.inference.checkpoint import load_checkpoint

    model, config, _ = load_checkpoint(checkpoint)
    dataset = AnomalyDataset(list_samples(f"demo:{demo3}", "test")[:8], image_size=config.backbone.image_size)
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    f32 = FeatureExtractor(config.backbone)(images)
    b16 = FeatureExtractor(config.backbone, precision="bf16")(images)
    assert b16.dtype == torch.float32 and not torch.equal(b16, f32)
    assert float((b16 - f32).norm() / f32.norm()) < 0.05
    size = config.scoring.map_size or config.backbone.image_size
    s32, m32 = model.detect(f32, config.sampling, config.scoring, size)
    s16, m16 = model.detect(f32, config.sampling, config.scoring, size, precision="bf16")  # the denoiser only
    assert s16.dtype == m16.dtype == torch.float32
    assert not torch.equal(s16, s32)
    assert float(((s16 - s32).abs() / s32.abs()).max()) < SCORE_RTOL
    assert float((m16 - m32).norm() / m32.norm()) < MAP_RTOL


def test_evaluate_precision_option_gives_float32_like_metrics(checkpoint, tmp_path, capsys):
    assert (
        main(["evaluate", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "fp32.json"), "--no-progress"])
        == 0
    )
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(checkpoint),
                "--output",
                str(tmp_path / "bf16.json"),
                "--no-progress",
                "--precision",
                "bf16",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert "device cpu, inference.precision bf16" in out
    # the thresholds were calibrated in float32: the command says they may not hold
    assert "inference.precision differ from the settings the thresholds were calibrated with" in err
    # and what to do about it is something the commands accept (calibrate refuses --set of these settings)
    assert "train with them, or give your own with --image-threshold" in err and "run 'vpdm calibrate'" not in err
    fp32 = json.loads((tmp_path / "fp32.json").read_text())["metrics"]["mean"]
    bf16 = json.loads((tmp_path / "bf16.json").read_text())["metrics"]["mean"]
    # a random-init backbone near chance (image AUROC 0.60 on 36 images): bf16 moved it by 0.065 with the fine
    # prototypes' nearest distances (see SPREAD_TOL), a broken cast by far more
    for key in ("image_auroc", "pixel_auroc"):
        assert bf16[key] == pytest.approx(fp32[key], abs=0.1), key


# --------------------------------------------------------------------------------------------
# (d) the feature cache keeps precisions apart
# --------------------------------------------------------------------------------------------


def test_precision_is_part_of_the_feature_cache_key(demo3, tmp_path):
    config = VPDMConfig().with_overrides([t for t in TINY if t != "--set"][:4])
    fp32, bf16 = FeatureExtractor(config.backbone), FeatureExtractor(config.backbone, precision="bf16")
    assert fp32.fingerprint() != bf16.fingerprint()
    assert "_bf16_" in bf16.fingerprint()
    # fp32 keys are those of before this setting existed: existing cache entries stay valid
    assert fp32.fingerprint().endswith("_i64_area_v2") and "fp32" not in fp32.fingerprint()
    dataset = AnomalyDataset(list_samples(f"demo:{demo3}", "test")[:6], image_size=64)
    cache = tmp_path / "cache"
    a, info_a = extract_features(fp32, dataset, cache_dir=cache, progress=False, return_info=True)
    b, info_b = extract_features(bf16, dataset, cache_dir=cache, progress=False, return_info=True)
    assert not info_a["cache_hit"] and not info_b["cache_hit"]  # fp32's entry is not served for bf16
    assert info_a["path"] != info_b["path"] and len(list(cache.glob("*.pt"))) == 2
    assert not torch.equal(a, b)
    again_a, hit_a = extract_features(fp32, dataset, cache_dir=cache, progress=False, return_info=True)
    again_b, hit_b = extract_features(bf16, dataset, cache_dir=cache, progress=False, return_info=True)
    assert hit_a["cache_hit"] and hit_b["cache_hit"]
    assert torch.equal(again_a, a) and torch.equal(again_b, b)


def test_precision_cannot_change_under_a_memoised_fingerprint():
    extractor = FeatureExtractor(VPDMConfig().with_overrides([t for t in TINY if t != "--set"][:4]).backbone)
    with pytest.raises(AttributeError):
        extractor.precision = "bf16"


# --------------------------------------------------------------------------------------------
# (e) invalid precisions
# --------------------------------------------------------------------------------------------


def test_an_invalid_precision_is_a_clear_error(checkpoint, tmp_path, capsys):
    message = "inference.precision must be one of fp32, bf16, fp16, got 'fp8'"
    with pytest.raises(ConfigError, match=message):
        VPDMConfig().with_overrides(["inference.precision=fp8"]).validate()
    with pytest.raises(ConfigError, match="got 'half'"):
        FeatureExtractor(VPDMConfig().backbone, precision="half")
    code = main(
        [
            "evaluate",
            "--checkpoint",
            str(checkpoint),
            "--output",
            str(tmp_path / "m.json"),
            "--no-progress",
            "--set",
            "inference.precision=fp8",
        ]
    )
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()
    with pytest.raises(SystemExit) as info:
        main(
            [
                "predict",
                "--checkpoint",
                str(checkpoint),
                "--images",
                str(tmp_path),
                "--output",
                str(tmp_path / "o"),
                "--precision",
                "fp8",
            ]
        )
    assert info.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err


def test_a_precision_torch_cannot_autocast_to_is_refused_not_run_in_float32(monkeypatch, checkpoint, tmp_path, capsys):
    """torch only warns and runs float32 when a device lacks autocast to a dtype; vpdm refuses instead."""
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *a: False)
    with pytest.raises(ConfigError, match="inference.precision='bf16' is not supported on device 'cpu'"):
        check_precision("bf16", "cpu")
    check_precision("fp32", "cpu")  # float32 needs no autocast
    seen = total_images_seen()
    code = main(
        [
            "evaluate",
            "--checkpoint",
            str(checkpoint),
            "--output",
            str(tmp_path / "m.json"),
            "--no-progress",
            "--precision",
            "bf16",
        ]
    )
    assert code == 2 and "is not supported on device 'cpu'" in capsys.readouterr().err
    assert total_images_seen() == seen and not (tmp_path / "m.json").exists()


def test_a_config_without_an_inference_section_is_fp32():
    data = to_dict(VPDMConfig())
    del data["inference"]
    assert saved_config(data).inference.precision == "fp32"


def test_export_refuses_reduced_precision():
    from vpdm.deploy.export import unsupported_settings

    assert unsupported_settings(VPDMConfig()) == []
    problems = unsupported_settings(VPDMConfig().with_overrides(["inference.precision=bf16"]))
    assert len(problems) == 1 and problems[0].startswith("inference.precision=bf16: the graph is exported in float32")
