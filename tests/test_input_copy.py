"""``model.input_copy``: the denoiser also sees a copy of the image's own features beside yhat,
perturbed while training (Dinomaly's dropout, UniAD's jitter) and clean at inference."""

from __future__ import annotations

import pytest
import torch

from tests.test_model import C, S, small_config, small_model
from vpdm.config.schema import VPDMConfig
from vpdm.errors import ConfigError
from vpdm.inference.checkpoint import load_checkpoint, save_checkpoint
from vpdm.model.config import ModelConfig, SamplingConfig
from vpdm.model.denoiser import Denoiser, DenoiserConfig


def test_dropout_copy_zeroes_a_fraction_p_and_keeps_the_mean() -> None:
    model = small_model(input_copy="dropout", input_copy_strength=0.3)
    x0 = torch.full((50, C, S, S), 2.0)  # 25 600 values
    copy = model.training_copy(x0, torch.Generator().manual_seed(0))
    zero = copy == 0
    # Binomial(25600, 0.3): standard deviation of the fraction 0.0029
    assert float(zero.float().mean()) == pytest.approx(0.3, abs=0.012)
    torch.testing.assert_close(copy[~zero], torch.full_like(copy[~zero], 2.0 / 0.7))
    assert float(copy.mean()) == pytest.approx(2.0, abs=0.05)


def test_jitter_copy_adds_gaussian_noise_of_the_given_std() -> None:
    model = small_model(input_copy="jitter", input_copy_strength=1.5)
    x0 = torch.randn(50, C, S, S)
    residual = model.training_copy(x0, torch.Generator().manual_seed(0)) - x0
    assert float(residual.mean()) == pytest.approx(0.0, abs=0.03)
    assert float(residual.std()) == pytest.approx(1.5, rel=0.02)
    # Gaussian: 68.3 % within one std, 95.4 % within two
    assert float((residual.abs() < 1.5).float().mean()) == pytest.approx(0.683, abs=0.01)
    assert float((residual.abs() < 3.0).float().mean()) == pytest.approx(0.954, abs=0.006)


def test_without_a_copy_the_network_is_the_papers() -> None:
    model = small_model()
    x0 = torch.randn(2, C, S, S)
    assert model.inference_copy(x0) is None and model.training_copy(x0) is None
    assert model.denoiser.inp.weight.shape[1] == 2 * C
    assert small_model(input_copy="dropout").denoiser.inp.weight.shape[1] == 3 * C


def test_the_copy_reaches_the_network_and_is_required_exactly_when_built_for() -> None:
    net = Denoiser(C, DenoiserConfig(width=16, depth=1, groups=4, time_dim=16), extra_inputs=1)
    torch.nn.init.normal_(net.out.weight, std=0.1)
    x, y, copy = (torch.randn(2, C, S, S) for _ in range(3))
    t = torch.tensor([3, 40])
    assert not torch.allclose(net(x, y, t, copy), net(x, y, t, copy + 1))
    with pytest.raises(ValueError, match="takes a copy"):
        net(x, y, t)
    plain = Denoiser(C, DenoiserConfig(width=16, depth=1, groups=4, time_dim=16))
    with pytest.raises(ValueError, match="without an input for a copy"):
        plain(x, y, t, copy)


def _recording(model):
    seen = []
    forward = model.denoiser.forward

    def record(x_t, yhat, t, copy=None):
        seen.append(copy)
        return forward(x_t, yhat, t, copy)

    model.denoiser.forward = record
    return seen


@pytest.mark.parametrize("steps", [1, 3])
def test_scoring_passes_the_clean_features_to_every_step(steps: int) -> None:
    model = small_model(input_copy="dropout", input_copy_strength=0.5).eval()
    seen = _recording(model)
    feats = torch.randn(3, C, S, S) * 3 + 1
    model.anomaly_maps(feats, SamplingConfig(num_steps=steps))
    assert len(seen) == steps
    for copy in seen:
        torch.testing.assert_close(copy, model.normalise(feats))


def test_training_passes_a_dropped_out_copy() -> None:
    model = small_model(input_copy="dropout", input_copy_strength=0.5).train()
    seen = _recording(model)
    feats = torch.randn(4, C, S, S) * 3 + 1
    model(feats, generator=torch.Generator().manual_seed(0))
    (copy,) = seen
    x0 = model.normalise(feats)
    kept = copy != 0
    assert 0.3 < float(kept.float().mean()) < 0.7
    torch.testing.assert_close(copy[kept], 2 * x0[kept])


def test_checkpoint_round_trip_with_a_copy(tmp_path) -> None:
    model = small_model(input_copy="jitter", input_copy_strength=1.0).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.denoiser.out.weight, std=0.1)
    config = VPDMConfig(model=small_config(input_copy="jitter", input_copy_strength=1.0))
    path = save_checkpoint(tmp_path / "m.pt", model, config, categories=["a/b"])
    loaded, cfg, _ = load_checkpoint(path)
    assert cfg.model.input_copy == "jitter" and loaded.denoiser.inp.weight.shape[1] == 3 * C
    feats = torch.randn(2, C, S, S)
    torch.testing.assert_close(
        loaded.anomaly_maps(feats, SamplingConfig()), model.anomaly_maps(feats, SamplingConfig())
    )


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("input_copy", "mask", "model.input_copy must be one of"),
        ("input_copy_strength", -0.1, "model.input_copy_strength"),
        ("input_copy_strength", float("nan"), "model.input_copy_strength"),
    ],
)
def test_bad_copy_settings_are_refused_by_name(field, value, needle) -> None:
    with pytest.raises(ConfigError, match=needle):
        ModelConfig(**{field: value}).validate()


def test_a_dropout_probability_of_one_is_refused() -> None:
    with pytest.raises(ConfigError, match="model.input_copy_strength"):
        ModelConfig(input_copy="dropout", input_copy_strength=1.0).validate()
    ModelConfig(input_copy="jitter", input_copy_strength=1.0).validate()  # a std may be 1
