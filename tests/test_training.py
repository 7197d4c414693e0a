"""Training levers: learning-rate schedule, weight EMA, feature jitter, frozen prototypes."""

from __future__ import annotations

import math

import pytest
import torch

from tests.test_model import C, S, small_config
from vpdm.config.schema import TrainConfig, VPDMConfig
from vpdm.errors import ConfigError
from vpdm.model.diffusion import NoiseScheduleConfig, ShiftedDiffusion
from vpdm.training.engine import LRSchedule, WeightEMA, build_model, feature_loader, make_optimizer, train_loop


def test_schedule_is_linear_warmup_then_cosine() -> None:
    sched = LRSchedule(TrainConfig(lr_schedule="cosine", warmup_fraction=0.1), total_steps=100)
    assert [sched(i) for i in range(10)] == pytest.approx([(i + 1) / 10 for i in range(10)])
    for step in (10, 32, 55, 77, 99):
        assert sched(step) == pytest.approx(0.5 * (1 + math.cos(math.pi * (step - 10) / 90)))
    constant = LRSchedule(TrainConfig(), total_steps=100)
    assert {constant(i) for i in range(100)} == {1.0}


def test_ema_is_the_closed_form_average() -> None:
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = WeightEMA(model, decay=0.9)
    values = [1.0, 2.0, -1.0, 4.0]
    want = 0.0
    for v in values:
        with torch.no_grad():
            model.weight.fill_(v)
        ema.update(model)
        want = 0.9 * want + 0.1 * v
    raw = ema.swap_in(model)
    assert float(model.weight) == pytest.approx(want)
    ema.swap_out(model, raw)
    assert float(model.weight) == 4.0


def _fit(train_overrides: dict, epochs: int = 3, **model_kw):
    torch.manual_seed(0)
    feats = torch.randn(24, C, S, S) * 2 + 1
    config = VPDMConfig(
        model=small_config(**model_kw), train=TrainConfig(epochs=epochs, batch_size=8, **train_overrides)
    )
    model = build_model(config, feats)
    seen = []
    history = train_loop(
        model,
        feature_loader(feats, 8, 0),
        config.train,
        progress=False,
        callback=lambda e, m: seen.append({k: v.clone() for k, v in model.state_dict().items()}),
    )
    return model, history, seen


def test_training_with_ema_ends_on_the_averaged_weights_and_callbacks_see_them() -> None:
    model, history, seen = _fit({"ema_decay": 0.5})
    raw_model, _, _ = _fit({})
    # Same seed and data: the raw trajectories are the same, so EMA != raw at the end.
    assert not torch.allclose(model.denoiser.out.weight, raw_model.denoiser.out.weight)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, seen[-1][key])
    assert len(history) == 3


def test_cosine_schedule_ends_near_zero_learning_rate() -> None:
    _, history, _ = _fit({"lr_schedule": "cosine", "warmup_fraction": 0.2})
    assert history[-1]["lr"] < 0.1 * 1e-3 and history[0]["lr"] > history[-1]["lr"]


def test_frozen_prototypes_do_not_move_and_have_no_optimizer_state() -> None:
    model, _, _ = _fit({"prototype_lr_scale": 0.0})
    torch.manual_seed(0)
    feats = torch.randn(24, C, S, S) * 2 + 1
    start = build_model(VPDMConfig(model=small_config(), train=TrainConfig(prototype_lr_scale=0.0)), feats)
    torch.testing.assert_close(model.prototypes.prototypes, start.prototypes.prototypes)
    optimizer = make_optimizer(model, TrainConfig(prototype_lr_scale=0.0))
    params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(model.prototypes.prototypes) not in params


def test_jitter_noise_correction_gives_the_same_x_t_from_the_clean_features() -> None:
    d = ShiftedDiffusion(NoiseScheduleConfig(num_timesteps=100, beta_end=0.2))
    g = torch.Generator().manual_seed(0)
    x0, y, n, j = (torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64) for _ in range(4))
    t = torch.tensor([0, 5, 50, 99])
    a = d.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(d.q_sample(x0 + j, y, t, n), d.q_sample(x0, y, t, n + a / (1 - a**2).sqrt() * j))


def test_a_retired_setting_loads_at_its_remaining_value_and_is_refused_at_another() -> None:
    """model.feature_jitter left the code: a checkpoint's or a user's config naming it at 0 (what every model
    had unless it said otherwise) still loads, as the same config; any other value is refused, by name."""
    from vpdm.config.schema import saved_config
    from vpdm.config.values import to_dict
    from vpdm.errors import ConfigError

    saved = to_dict(VPDMConfig())
    saved["model"]["feature_jitter"] = 0.0  # as a checkpoint written before the retirement stores it
    assert to_dict(saved_config(saved)) == to_dict(VPDMConfig())
    assert to_dict(VPDMConfig().with_overrides(["model.feature_jitter=0"])) == to_dict(VPDMConfig())
    saved["model"]["feature_jitter"] = 0.5
    with pytest.raises(ConfigError, match=r"model\.feature_jitter=0\.5: this setting was retired"):
        saved_config(saved)
    with pytest.raises(ConfigError, match="retired"):
        VPDMConfig().with_overrides(["model.feature_jitter=0.5"])


@pytest.mark.parametrize(
    "field,value", [("lr_schedule", "step"), ("warmup_fraction", 1.0), ("ema_decay", 1.0), ("prototype_lr_scale", -1.0)]
)
def test_bad_training_settings_are_refused_by_name(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"train.{field}"):
        TrainConfig(**{field: value}).validate()
