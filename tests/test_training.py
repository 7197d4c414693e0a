"""Training levers: frozen prototypes, the noise of the training chain; retired settings."""

from __future__ import annotations

import pytest
import torch

from tests.test_model import C, S, small_config
from vpdm.config.schema import TrainConfig, VPDMConfig
from vpdm.errors import ConfigError
from vpdm.model.diffusion import NoiseScheduleConfig, ShiftedDiffusion
from vpdm.training.engine import build_model, feature_loader, make_optimizer, train_loop


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


RETIRED_CASES = [
    ("model.feature_jitter", 0.0, 0.5),
    ("train.lr_schedule", "constant", "cosine"),
    ("train.warmup_fraction", 0.0, 0.05),
    ("train.ema_decay", 0.0, 0.99),
    ("scoring.per_stage", False, True),
]


@pytest.mark.parametrize(("key", "kept", "other"), RETIRED_CASES)
def test_a_retired_setting_loads_at_its_remaining_value_and_is_refused_at_another(key, kept, other) -> None:
    """A setting that left the code: a checkpoint's or a user's config naming it at the value every model had
    unless it said otherwise still loads, as the same config; any other value is refused, by name."""
    from vpdm.config.schema import saved_config
    from vpdm.config.values import to_dict

    saved = to_dict(VPDMConfig())
    section, name = key.split(".")
    saved[section][name] = kept  # as a checkpoint written before the retirement stores it
    assert to_dict(saved_config(saved)) == to_dict(VPDMConfig())
    assert to_dict(VPDMConfig().with_overrides([f"{key}={kept}"])) == to_dict(VPDMConfig())
    saved[section][name] = other
    with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')}={other!r}: this setting was retired"):
        saved_config(saved)
    with pytest.raises(ConfigError, match="retired"):
        VPDMConfig().with_overrides([f"{key}={other}"])


def test_a_retired_value_is_refused_and_a_setting_that_only_served_it_is_dropped_at_any_value() -> None:
    """prototypes.ot_scope stays (batch: the paper; none: the default) but its value dataset left the code;
    prototypes.potential_lr, its step size, is dropped whatever it was."""
    from vpdm.config.schema import saved_config
    from vpdm.config.values import to_dict

    saved = to_dict(VPDMConfig())
    saved["model"]["prototypes"]["potential_lr"] = 0.37
    assert to_dict(saved_config(saved)) == to_dict(VPDMConfig())
    saved["model"]["prototypes"]["ot_scope"] = "dataset"
    with pytest.raises(ConfigError, match="model.prototypes.ot_scope='dataset': this setting was retired"):
        saved_config(saved)
    with pytest.raises(ConfigError, match="ot_scope"):
        VPDMConfig().with_overrides(["model.prototypes.ot_scope=dataset"]).validate()


def test_a_training_state_written_before_the_retirements_resumes() -> None:
    """A resumable state's config names the retired settings at their remaining values: it is the same run."""
    from vpdm.config.values import to_dict
    from vpdm.training.resume import check_state

    state_config = to_dict(VPDMConfig())
    state_config["train"].update(lr_schedule="constant", warmup_fraction=0.0, ema_decay=0.0)
    state_config["scoring"]["per_stage"] = False
    check_state({"config": state_config, "features": "x"}, VPDMConfig(), "train-state.pt", "x")
    state_config["train"]["ema_decay"] = 0.99
    with pytest.raises(ConfigError, match="train.ema_decay=0.99: this setting was retired"):
        check_state({"config": state_config, "features": "x"}, VPDMConfig(), "train-state.pt", "x")


@pytest.mark.parametrize("field,value", [("prototype_lr_scale", -1.0), ("epochs", 0)])
def test_bad_training_settings_are_refused_by_name(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"train.{field}"):
        TrainConfig(**{field: value}).validate()
