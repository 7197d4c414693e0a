"""The VPDM model on features: losses, gradients, reconstruction, maps, scores, checkpoints, config."""

import copy

import pytest
import torch

from vpdm.config.presets import PAPER
from vpdm.config.schema import VPDMConfig, load_config
from vpdm.errors import CheckpointError, ConfigError
from vpdm.evaluation.evaluator import score_features
from vpdm.inference.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from vpdm.model.config import ModelConfig, SamplingConfig
from vpdm.model.denoiser import Denoiser, DenoiserConfig
from vpdm.model.diffusion import NoiseScheduleConfig
from vpdm.model.scoring import ScoringConfig, gaussian_blur, image_scores
from vpdm.model.vpdm_model import VPDM
from vpdm.model.vpot import VPOTConfig
from vpdm.training.engine import feature_loader, train_loop

C, S = 8, 8


def small_config(**kw) -> ModelConfig:
    return ModelConfig(
        prototypes=VPOTConfig(num_prototypes=4, downsample=2),
        diffusion=NoiseScheduleConfig(num_timesteps=50),
        denoiser=DenoiserConfig(width=16, depth=1, groups=4, time_dim=16),
        **kw,
    )


def small_model(seed=0, **kw) -> VPDM:
    torch.manual_seed(seed)
    feats = torch.randn(16, C, S, S) * 3 + 1
    model = VPDM(C, S, small_config(**kw))
    model.fit_normalisation(feats)
    model.init_prototypes(feats, torch.Generator().manual_seed(seed))
    return model


def test_normalisation_standardises_training_features():
    torch.manual_seed(0)
    feats = torch.randn(32, C, S, S) * torch.arange(1, C + 1).view(1, C, 1, 1) + 5
    model = VPDM(C, S, small_config())
    model.fit_normalisation(feats)
    x = model.normalise(feats)
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(C), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3)), torch.ones(C), atol=1e-5, rtol=0)


def test_loss_is_diffusion_loss_plus_weighted_ot():
    model = small_model(ot_weight=0.3).train()
    out = model(torch.randn(6, C, S, S), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out["loss"].detach(), out["diffusion_loss"] + 0.3 * out["ot_loss"])
    # the paper's loss: with eps-prediction and no weighting the diffusion term is the eps-MSE
    paper = small_model(ot_weight=0.3, loss_weighting="none").train()
    out = paper(torch.randn(6, C, S, S), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out["loss"].detach(), out["eps_mse"] + 0.3 * out["ot_loss"])


def test_prototypes_get_gradients_from_both_terms():
    """eps-MSE reaches the prototypes through yhat (inside x_t and the network input), the OT loss
    directly; the gradient of the sum is the sum of the two (same noise, same timesteps)."""
    feats = torch.randn(6, C, S, S)

    def proto_grad(ot_weight, part):
        model = small_model(ot_weight=ot_weight).train()
        torch.nn.init.normal_(model.denoiser.out.weight, std=0.1)  # zero-init output would hide yhat at step one
        out = model(feats, generator=torch.Generator().manual_seed(2))
        loss = {"total": out["loss"], "ot": out["loss"] - out["eps_mse"]}[part]
        if part == "ot":  # eps_mse is detached in the dict: rebuild the OT term with its graph
            loss = model.prototypes(model.normalise(feats))["ot_loss"] * ot_weight
        loss.backward()
        return model.prototypes.prototypes.grad.clone()

    g_eps = proto_grad(0.0, "total")
    g_ot = proto_grad(1.0, "ot")
    g_all = proto_grad(1.0, "total")
    assert g_eps.abs().sum() > 0 and g_ot.abs().sum() > 0
    torch.testing.assert_close(g_all, g_eps + g_ot, rtol=1e-4, atol=1e-7)


def test_training_beats_the_skip_only_noise_guess():
    """Before training the network outputs zero and eps_theta is the linear skip alone; training
    on two-cluster data must cut the noise-prediction error on fixed (t, noise) draws."""
    from vpdm.config.schema import TrainConfig

    torch.manual_seed(0)
    base = torch.randn(2, C, S, S)
    feats = base[torch.arange(64) % 2] + 0.1 * torch.randn(64, C, S, S)
    model = VPDM(C, S, small_config())
    model.fit_normalisation(feats)
    model.init_prototypes(feats, torch.Generator().manual_seed(0))

    def held_out_mse():
        model.eval()
        return model(feats[:16], generator=torch.Generator().manual_seed(123))["eps_mse"].item()

    before = held_out_mse()
    train_loop(model, feature_loader(feats, 16, 0), TrainConfig(epochs=40, lr=3e-3), progress=False)
    after = held_out_mse()
    assert after < 0.85 * before, (before, after)


def test_anomaly_map_is_channel_l2_of_reconstruction_error():
    model = small_model().eval()
    feats = torch.randn(3, C, S, S)
    sampling = SamplingConfig(sampler="ddim", num_steps=5)
    rec = model.reconstruct(feats, sampling)
    maps = model.anomaly_maps(feats, sampling, ScoringConfig(pools=(1,)))
    expected = (model.normalise(feats) - rec).pow(2).sum(1).sqrt()
    torch.testing.assert_close(maps, expected)


@pytest.mark.parametrize("sampler,steps", [("ddim", 5), ("ddpm", 50), ("ddpm", 7)])
def test_scores_do_not_depend_on_the_batch(sampler, steps):
    model = small_model().train()
    for _ in range(3):  # learn a prototype potential
        model(torch.randn(8, C, S, S))
    model.eval()
    feats = torch.randn(5, C, S, S)
    sampling = SamplingConfig(sampler=sampler, num_steps=steps)
    scoring = ScoringConfig(blur_sigma=1.0, pool_size=4, fine_pools=(), fine_image_pools=None, combine="weighted")
    alone = torch.cat(
        [
            score_features(model, feats[i : i + 1], sampling=sampling, scoring=scoring, map_size=16, progress=False)[0]
            for i in range(5)
        ]
    )
    together, _ = score_features(
        model, feats, sampling=sampling, scoring=scoring, map_size=16, batch_size=5, progress=False
    )
    mixed_in = torch.cat([torch.randn(3, C, S, S), feats[2:4], torch.randn(2, C, S, S) * 5])
    mixed, _ = score_features(
        model, mixed_in, sampling=sampling, scoring=scoring, map_size=16, batch_size=7, progress=False
    )
    torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[3:5], together[2:4], rtol=1e-5, atol=1e-6)


def test_image_score_is_max_of_average_pooled_map():
    maps = torch.zeros(2, 16, 16)
    maps[0, 3, 3] = 16.0  # a single hot pixel: pooled max = 16 / 16 = 1
    maps[1, 4:8, 4:8] = 2.0  # a 4x4 blob of 2: pooled max over a 4x4 window = 2
    torch.testing.assert_close(image_scores(maps, 4), torch.tensor([1.0, 2.0]))


def test_gaussian_blur_preserves_mass_and_constants():
    x = torch.zeros(1, 33, 33)
    x[0, 16, 16] = 1.0
    y = gaussian_blur(x, 2.0)
    assert y.sum().item() == pytest.approx(1.0, abs=1e-5)
    # variance of the blurred impulse along one axis = sigma^2
    r = torch.arange(33.0) - 16
    assert (y[0].sum(0) * r**2).sum().item() == pytest.approx(4.0, rel=1e-3)
    torch.testing.assert_close(gaussian_blur(torch.full((1, 20, 20), 3.0), 2.0), torch.full((1, 20, 20), 3.0))


def test_denoiser_is_batch_independent_and_shape_preserving():
    net = Denoiser(C, DenoiserConfig(width=16, depth=1, groups=4, time_dim=16))
    torch.nn.init.normal_(net.out.weight, std=0.1)
    x, y = torch.randn(4, C, S, S), torch.randn(4, C, S, S)
    t = torch.tensor([0, 10, 20, 49])
    full = net(x, y, t)
    assert full.shape == x.shape
    torch.testing.assert_close(net(x[2:3], y[2:3], t[2:3]), full[2:3])


def test_checkpoint_round_trip(tmp_path):
    model = small_model().eval()
    config = VPDMConfig(model=small_config())
    path = save_checkpoint(tmp_path / "model.pt", model, config, categories=["a/b"])
    loaded, cfg, payload = load_checkpoint(path)
    assert payload["categories"] == ["a/b"] and cfg.model.prototypes.num_prototypes == 4
    feats = torch.randn(2, C, S, S)
    sampling = SamplingConfig(num_steps=3)
    torch.testing.assert_close(loaded.anomaly_maps(feats, sampling), model.anomaly_maps(feats, sampling))


def test_checkpoint_refuses_foreign_and_tampered_files(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(missing)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a vpdm checkpoint"):
        read_checkpoint(foreign)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    tampered = tmp_path / "tampered.pt"
    torch.save({"format": "vpdm.inference.checkpoint", "version": 1, "payload": Evil()}, tampered)
    with pytest.raises(CheckpointError, match="holds Python objects a vpdm checkpoint never contains"):
        read_checkpoint(tampered)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a zip at all")
    with pytest.raises(CheckpointError):
        read_checkpoint(garbage)
    # right marker, wrong weights
    model = small_model()
    good = save_checkpoint(tmp_path / "m.pt", model, VPDMConfig(model=small_config()), categories=[])
    payload = torch.load(good, weights_only=True)
    payload["state_dict"]["prototypes.prototypes"] = torch.zeros(3, 3)
    torch.save(payload, tmp_path / "bad_shape.pt")
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(tmp_path / "bad_shape.pt")


@pytest.mark.parametrize(
    "override, needle",
    [
        ("model.prototypes.num_prototypes=0", "num_prototypes"),
        ("model.prototypes.downsample=5", "downsample=5"),
        ("model.diffusion.num_timesteps=1", "1"),
        ("model.diffusion.beta_end=1.5", "1.5"),
        ("model.diffusion.beta_start=0", "beta_start"),
        ("sampling.num_steps=5000", "5000"),
        ("train.lr=-1", "train.lr"),
        ("model.nope=1", "model.nope"),
        ("train.epochs=ten", "train.epochs"),
    ],
)
def test_bad_config_values_are_refused_by_name(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert needle in str(err.value)


def test_config_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  prototypes:\n    num_prototypes: 12\ntrain:\n  lr: 0.01\n")
    cfg = load_config(path, ["train.epochs=3", "backbone.stages=[1,2]"])
    assert cfg.model.prototypes.num_prototypes == 12 and cfg.train.lr == 0.01 and cfg.train.epochs == 3
    assert tuple(cfg.backbone.stages) == (1, 2)
    assert VPDMConfig.from_dict(cfg.to_dict()) == cfg
    paper = VPDMConfig().with_overrides(PAPER)
    assert (paper.model.prototypes.num_prototypes, paper.model.prototypes.downsample) == (50, 4)
    assert (paper.model.prototypes.level, paper.model.diffusion.prediction, paper.sampling.start_step) == (
        "image",
        "eps",
        None,
    )
    assert tuple(paper.scoring.pools) == (1,) and paper.model.loss_weighting == "none"
    assert (paper.model.diffusion.num_timesteps, paper.model.diffusion.beta_start, paper.model.diffusion.beta_end) == (
        1000,
        1e-4,
        0.02,
    )
    assert (paper.train.lr, paper.train.batch_size, paper.backbone.image_size, paper.backbone.feature_size) == (
        1e-3,
        32,
        224,
        32,
    )


def test_same_seed_same_config_same_model_bitwise():
    """Determinism on CPU: two trainings with one seed give identical weights and maps."""
    from vpdm.config.schema import TrainConfig
    from vpdm.training import engine

    torch.manual_seed(1)
    feats = torch.randn(24, C, S, S)
    config = VPDMConfig(model=small_config(), train=TrainConfig(epochs=2, batch_size=8, seed=7))
    split = engine.SplitFeatures(features=feats, dataset=None, cache_hit=True)
    a, _ = engine.fit(config, split, progress=False)
    torch.randn(100)  # disturb the global RNG in between: fit must reseed
    b, _ = engine.fit(config, split, progress=False)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    other, _ = engine.fit(
        VPDMConfig(model=small_config(), train=TrainConfig(epochs=2, batch_size=8, seed=8)), split, progress=False
    )
    assert not torch.equal(other.prototypes.prototypes, a.prototypes.prototypes)
    sampling = SamplingConfig(num_steps=3)
    assert torch.equal(a.anomaly_maps(feats[:4], sampling), b.anomaly_maps(feats[:4], sampling))


def test_a_nan_loss_stops_training_before_any_step_and_says_where():
    import pickle

    from vpdm.config.schema import TrainConfig
    from vpdm.training.engine import TrainingDiverged

    torch.manual_seed(0)
    feats = torch.randn(16, C, S, S)
    model = VPDM(C, S, small_config())
    model.fit_normalisation(feats)
    model.init_prototypes(feats, torch.Generator().manual_seed(0))
    with torch.no_grad():
        next(model.denoiser.parameters()).fill_(float("nan"))  # a real NaN through the real forward
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    seen = []

    def all_finite(loss):
        seen.append(float(loss))
        return bool(torch.isfinite(loss))

    with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 1, step 1.*train\.lr") as info:
        train_loop(
            model, feature_loader(feats, 8, 0), TrainConfig(epochs=2, lr=1e-3), progress=False, all_finite=all_finite
        )
    assert (info.value.epoch, info.value.step) == (1, 1)
    assert len(seen) == 1  # the collective check replaces the local one
    for key, value in model.named_parameters():  # no optimizer step was taken
        assert torch.equal(value, before[key]) or torch.isnan(before[key]).all(), key
    again = pickle.loads(pickle.dumps(info.value))  # Ray ships errors between processes
    assert (again.epoch, again.step, str(again)) == (1, 1, str(info.value))


@pytest.mark.parametrize("h,w,size,sigma", [(32, 32, 224, 4.0), (8, 8, 64, 1.0), (8, 6, 40, 2.5), (16, 16, 96, 0.0)])
def test_postprocess_matrix_form_equals_interpolate_then_blur(h, w, size, sigma):
    import torch.nn.functional as F

    from vpdm.model.scoring import postprocess_maps

    maps = torch.rand(3, h, w, generator=torch.Generator().manual_seed(h + w)) * 5
    ref = F.interpolate(maps.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False).squeeze(1)
    ref = gaussian_blur(ref, sigma)
    got = postprocess_maps(maps, size, sigma)
    assert got.shape == (3, size, size)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # per image: a map never depends on the rest of the batch
    torch.testing.assert_close(postprocess_maps(maps[1:2], size, sigma), got[1:2], rtol=0, atol=1e-6)


def test_a_config_saved_before_new_settings_loads_as_it_was_trained(tmp_path):
    """A checkpoint of vpdm 0.1.0 has no key for the settings added since: it must come back with the
    behaviour it was trained with (paper-level prototypes, eps, one-position distances), not the new defaults."""
    from vpdm.config.migration import LEGACY_VALUES
    from vpdm.config.schema import saved_config
    from vpdm.config.values import to_dict
    from vpdm.inference.checkpoint import load_checkpoint, save_checkpoint

    old = to_dict(VPDMConfig().with_overrides(PAPER))
    for key in LEGACY_VALUES:  # drop every key that 0.1.0 did not write
        *sections, name = key.split(".")
        node = old
        for section in sections:
            node = node.get(section, {})  # a section 0.1.0 lacked as a whole (model.fine) is gone already
        node.pop(name, None)
    config = saved_config(old)
    # ... and trained on every train/good image: 0.1.0 held no calibration images out
    assert config == VPDMConfig().with_overrides({**PAPER, "train.calibration_fraction": 0.0})
    model = VPDM(C, S, config.model)
    path = save_checkpoint(tmp_path / "old.pt", model, config, categories=[])
    payload = torch.load(path, weights_only=True)
    payload["config"] = old
    torch.save(payload, path)
    loaded, cfg, _ = load_checkpoint(path)
    assert cfg.model.prototypes.level == "image" and cfg.model.diffusion.prediction == "eps"
    assert tuple(cfg.scoring.pools) == (1,) and loaded.prototypes.prototypes.shape == model.prototypes.prototypes.shape


# What the checkpoints of earlier formats wrote for the settings since retired (each at the value every model
# had unless it said otherwise), and a value each could also hold: the first loads as the same model, the
# second is refused, naming the setting.
EARLIER_FORMATS = {
    "model.feature_jitter": (0.0, 0.3),
    "train.lr_schedule": ("constant", "cosine"),
    "train.warmup_fraction": (0.0, 0.05),
    "train.ema_decay": (0.0, 0.99),
    "scoring.per_stage": (False, True),
    "model.prototypes.ot_scope": (None, "dataset"),  # a setting that stays, one of its values retired
}


def test_a_checkpoint_of_each_earlier_format_loads_and_scores_the_same(tmp_path):
    """The previous formats stored the retired settings (and, while scoring.per_stage existed, the channels of
    each backbone stage): such a file loads as the same model and config; one trained with a retired setting
    at another value is refused, naming it, instead of being scored as something else."""
    from vpdm.errors import CheckpointError
    from vpdm.inference.checkpoint import load_checkpoint, save_checkpoint

    model = small_model().eval()
    config = VPDMConfig(model=model.config)
    path = save_checkpoint(tmp_path / "before.pt", model, config, categories=[])
    payload = torch.load(path, weights_only=True)
    previous = copy.deepcopy(payload)
    previous["stage_channels"] = [C]
    previous["config"]["model"]["prototypes"]["potential_lr"] = 0.1
    previous["config"]["model"]["input_copy_strength"] = 0.2
    for key, (kept, _) in EARLIER_FORMATS.items():
        if kept is None:
            continue
        *sections, name = key.split(".")
        node = previous["config"]
        for section in sections:
            node = node[section]
        node[name] = kept
    torch.save(previous, path)
    loaded, cfg, _ = load_checkpoint(path)
    assert cfg == config
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    features = torch.randn(2, C, S, S, generator=torch.Generator().manual_seed(4))
    sampling, scoring = (
        SamplingConfig(num_steps=2),
        ScoringConfig(blur_sigma=1.0, pool_size=4, fine_pools=(), fine_image_pools=None, combine="weighted"),
    )
    for got, want in zip(loaded.detect(features, sampling, scoring, S), model.detect(features, sampling, scoring, S)):
        assert torch.equal(got, want)
    for key, (_, other) in EARLIER_FORMATS.items():
        changed = copy.deepcopy(previous)
        *sections, name = key.split(".")
        node = changed["config"]
        for section in sections:
            node = node[section]
        node[name] = other
        torch.save(changed, path)
        with pytest.raises(CheckpointError, match=f"{key}={other!r}: this setting was retired"):
            load_checkpoint(path)


@pytest.mark.parametrize("assignment", ["ot", "nearest"])
def test_precomputed_training_condition_gives_the_same_losses(assignment):
    """Frozen prototypes without a prototype marginal: each image's condition is computed once for the whole
    training run, and a batch of those gives the losses (the OT term included) of the forward that assigns
    the batch itself, with the same noise."""
    model = small_model()
    model.config.prototypes.assignment = assignment
    model.prototypes.prototypes.requires_grad_(False)
    assert model.condition_is_fixed
    torch.manual_seed(5)
    feats = torch.randn(12, C, S, S) * 3 + 1
    vague_all, terms = model.training_condition(feats, batch_size=5)
    assert vague_all.shape == (12, C, S // 2, S // 2) and terms.shape == (12,)
    rows = torch.tensor([1, 4, 6, 11])
    direct = model(feats[rows], generator=torch.Generator().manual_seed(3))
    cached = model(feats[rows], generator=torch.Generator().manual_seed(3), condition=(vague_all[rows], terms[rows]))
    for key in ("loss", "diffusion_loss", "eps_mse", "ot_loss"):
        torch.testing.assert_close(cached[key], direct[key], rtol=1e-5, atol=1e-6, msg=key)


def test_fit_assigns_frozen_prototypes_once_and_refuses_a_batch_dependent_condition(monkeypatch):
    from vpdm.config.schema import TrainConfig
    from vpdm.training import engine

    calls = []
    original = VPDM.training_condition

    def counting(self, features, batch_size=64):
        calls.append(len(features))
        return original(self, features, batch_size)

    monkeypatch.setattr(VPDM, "training_condition", counting)
    feats = torch.randn(24, C, S, S)
    config = VPDMConfig(model=small_config(), train=TrainConfig(epochs=3, batch_size=8))
    model, history = engine.fit(
        config, engine.SplitFeatures(features=feats, dataset=None, cache_hit=True), progress=False
    )
    assert calls == [24] and len(history) == 3  # once for every image, not once per epoch
    trained = VPDMConfig(model=small_config(), train=TrainConfig(epochs=1, batch_size=8, prototype_lr_scale=1.0))
    model, _ = engine.fit(trained, engine.SplitFeatures(features=feats, dataset=None, cache_hit=True), progress=False)
    assert calls == [24] and not model.condition_is_fixed  # trained prototypes: assigned in every step
    balanced = small_model()
    balanced.config.prototypes.ot_scope = "batch"
    balanced.prototypes.prototypes.requires_grad_(False)
    with pytest.raises(RuntimeError, match="changes during training"):
        balanced.training_condition(feats)


def _fine_model(seed=0):
    """Two well-separated classes; coarse and fine prototypes with short lists; statistics fitted."""
    from vpdm.model.vpot import FineConfig

    torch.manual_seed(seed)
    feats = torch.cat([torch.randn(10, C, S, S), torch.randn(10, C, S, S) + 6.0])
    classes = torch.tensor([0] * 10 + [1] * 10)
    config = ModelConfig(
        prototypes=VPOTConfig(num_prototypes=12, downsample=2, list_size=4, probes=2),
        fine=FineConfig(num_prototypes=24, list_size=6, probes=2),
        diffusion=NoiseScheduleConfig(num_timesteps=50, prediction="x0"),
        denoiser=DenoiserConfig(width=16, depth=1, groups=4, time_dim=16),
    )
    model = VPDM(C, S, config)
    model.fit_normalisation(feats)
    model.init_prototypes(feats, torch.Generator().manual_seed(seed), class_index=classes)
    model.eval()
    sampling = SamplingConfig(num_steps=1)
    scoring = ScoringConfig(
        blur_sigma=1.0,
        pool_size=4,
        pools=(4,),
        image_pools=(4,),
        fine_pools=(1,),
        fine_image_pools=(1, 4),
        combine="standardised",
    )
    model.fit_statistics(feats, classes, sampling, scoring, per_class=6, batch_size=4)
    return model, feats, classes, sampling, scoring


def test_standardised_scores_are_the_mean_of_class_standardised_terms():
    """Every term (the reconstruction's 4x4 blocks, the fine condition per position and in 4x4 blocks) minus
    the mean and over the std of its values on the image's class's normal training images, averaged; the
    statistics themselves against numpy over the images fit_statistics picks (6 of 10, evenly spaced)."""
    from vpdm.model.scoring import postprocess_maps, score_maps, term_map

    model, feats, classes, sampling, scoring = _fine_model()
    assert model.term_mean.shape == (2, len(model.stat_terms))
    fine, found = model.fine_condition(feats)
    assert found.tolist() == classes.tolist()  # the class is told by the fine prototypes' owners
    x = model.normalise(feats)
    rec = model.reconstruct(feats, sampling)
    picks = torch.linspace(0, 9, 6).round().long()
    for c in (0, 1):
        idx = picks + 10 * c
        for j, (branch, p) in enumerate(model.stat_terms):
            values = term_map(x[idx], (rec if branch == "coarse" else fine)[idx], p, scoring).double().numpy()
            assert float(model.term_mean[c, j]) == pytest.approx(values.mean(), rel=1e-4)
            assert float(model.term_std[c, j]) == pytest.approx(values.std(), rel=1e-3)

    def standardised(branch, p):
        j = model.stat_terms.index((branch, p))
        t = term_map(x, rec if branch == "coarse" else fine, p, scoring)
        return (t - model.term_mean[classes, j].view(-1, 1, 1)) / model.term_std[classes, j].view(-1, 1, 1)

    want_map = postprocess_maps((standardised("coarse", 4) + standardised("fine", 1)) / 2, 16, 1.0)
    image = (standardised("coarse", 4) + standardised("fine", 1) + standardised("fine", 4)) / 3
    want_scores = score_maps(postprocess_maps(image, 16, 1.0), scoring)
    scores, maps = model.detect(feats, sampling, scoring, 16)
    torch.testing.assert_close(maps, want_map, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scores, want_scores, rtol=1e-4, atol=1e-4)
    # one image at a time or in a batch: the same scores
    alone = torch.cat([model.detect(feats[i : i + 1], sampling, scoring, 16)[0] for i in range(0, 20, 7)])
    torch.testing.assert_close(alone, scores[0:20:7], rtol=1e-5, atol=1e-5)


def test_standardised_scores_refuse_other_distances_and_unfitted_models():
    model, feats, _, sampling, scoring = _fine_model()
    import dataclasses

    with pytest.raises(ConfigError, match="scoring.distance=l2"):
        model.detect(feats[:2], sampling, dataclasses.replace(scoring, distance="cosine"), 16)
    model.resize_statistics(0)
    with pytest.raises(ConfigError, match="combine=weighted"):
        model.detect(feats[:2], sampling, scoring, 16)
    # a saved and reloaded model keeps one row of statistics per class
    fitted, *_ = _fine_model()
    again = VPDM(C, S, fitted.config)
    again.load_state_dict(fitted.state_dict())
    assert torch.equal(again.term_mean, fitted.term_mean) and again.term_mean.shape[0] == 2


def test_refit_statistics_moves_each_row_the_weight_of_the_way_to_the_new_images_fit():
    """Against an independent fit on the new images alone (closed form: (1 - w) * training + w * new, mean and std);
    a row without new images keeps its statistics; refitting again gives the same (always from the training fit);
    weight 0 is the training fit; the training fit survives a state dict, and one written before it takes the
    statistics themselves as the training fit."""
    model, feats, classes, sampling, scoring = _fine_model()
    train_mean, train_std = model.term_mean.clone(), model.term_std.clone()
    new = feats[:10] + 0.3 * torch.randn_like(feats[:10])  # class 0 only, "unseen" images
    alone, *_ = _fine_model()
    alone.fit_statistics(new, torch.zeros(10, dtype=torch.long), sampling, scoring, per_class=6, batch_size=4)
    assert not torch.allclose(alone.term_mean[0], train_mean[0])
    rows = torch.zeros(10, dtype=torch.long)
    for _ in range(2):
        moved = model.refit_statistics(new, rows, sampling, scoring, 0.25, per_class=6, batch_size=4)
        assert moved == [0]
        torch.testing.assert_close(model.term_mean[0], 0.75 * train_mean[0] + 0.25 * alone.term_mean[0])
        torch.testing.assert_close(model.term_std[0], 0.75 * train_std[0] + 0.25 * alone.term_std[0])
        assert torch.equal(model.term_mean[1], train_mean[1]) and torch.equal(model.term_std[1], train_std[1])
        assert torch.equal(model.train_term_mean, train_mean) and torch.equal(model.train_term_std, train_std)
    # weight 0 is the training fit again; images of no row (-1) move nothing
    assert model.refit_statistics(new, rows, sampling, scoring, 0.0) == [0]
    assert torch.equal(model.term_mean, train_mean) and torch.equal(model.term_std, train_std)
    assert model.refit_statistics(new, torch.full((10,), -1), sampling, scoring, 0.5) == []
    with pytest.raises(ConfigError, match="in \\[0, 1\\]"):
        model.refit_statistics(new, rows, sampling, scoring, 1.5)
    with pytest.raises(ConfigError, match="10 images but 3"):
        model.refit_statistics(new, rows[:3], sampling, scoring, 0.5)
    # through calibration: the config's weight, and nothing for a score that does not read the statistics
    import dataclasses

    from vpdm.config.schema import VPDMConfig
    from vpdm.decision.calibration import refit_term_statistics

    config = VPDMConfig()
    config = dataclasses.replace(
        config,
        sampling=sampling,
        scoring=scoring,
        calibration=dataclasses.replace(config.calibration, statistics_weight=0.25),
    )
    note = refit_term_statistics(model, config, new, ["a"] * 10, ["a", "b"])
    assert note.startswith("term statistics moved 0.25 of the way") and note.endswith("(a)")
    every, *_ = _fine_model()  # calibration fits on all of the new images (up to 64 per class)
    every.fit_statistics(new, torch.zeros(10, dtype=torch.long), sampling, scoring)
    torch.testing.assert_close(model.term_mean[0], 0.75 * train_mean[0] + 0.25 * every.term_mean[0])
    model.refit_statistics(new, rows, sampling, scoring, 0.0)
    weighted = dataclasses.replace(config, scoring=dataclasses.replace(scoring, combine="weighted"))
    assert refit_term_statistics(model, weighted, new, ["a"] * 10, ["a", "b"]) == ""
    assert torch.equal(model.term_mean, train_mean)
    # the training fit travels with the state; an older state without it takes the statistics themselves
    again = VPDM(C, S, model.config)
    again.load_state_dict(model.state_dict())
    assert torch.equal(again.train_term_mean, train_mean) and torch.equal(again.term_mean, model.term_mean)
    old = {k: v for k, v in model.state_dict().items() if not k.startswith("train_term_")}
    older = VPDM(C, S, model.config)
    older.take_sizes(old)
    older.complete_state(old)
    older.load_state_dict(old)
    assert torch.equal(older.train_term_mean, model.term_mean) and torch.equal(older.train_term_std, model.term_std)


def test_map_weights_per_class_weigh_the_coarse_against_the_fine_terms(tmp_path):
    """With map weights the map is w * coarse z + (1 - w) * fine z, w of each image's class (closed form from the
    terms); the image score keeps its own terms; 0.5 with one term of each is the plain mean; the weights survive a
    checkpoint, and a checkpoint written before them loads without any."""
    from vpdm.inference.checkpoint import load_checkpoint, save_checkpoint
    from vpdm.model.scoring import postprocess_maps, term_map

    model, feats, classes, sampling, scoring = _fine_model()
    fine, _ = model.fine_condition(feats)
    x, rec = model.normalise(feats), model.reconstruct(feats, sampling)

    def standardised(branch, p):
        j = model.stat_terms.index((branch, p))
        t = term_map(x, rec if branch == "coarse" else fine, p, scoring)
        return (t - model.term_mean[classes, j].view(-1, 1, 1)) / model.term_std[classes, j].view(-1, 1, 1)

    plain_scores, plain_maps = model.detect(feats, sampling, scoring, 16)
    model.set_map_weights(torch.tensor([0.2, 0.9]))
    w = torch.tensor([0.2, 0.9])[classes].view(-1, 1, 1)
    want = postprocess_maps(w * standardised("coarse", 4) + (1 - w) * standardised("fine", 1), 16, 1.0)
    scores, maps = model.detect(feats, sampling, scoring, 16)
    torch.testing.assert_close(maps, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(maps, plain_maps, atol=1e-3)
    torch.testing.assert_close(scores, plain_scores)  # the image score's terms are not the map's
    model.set_map_weights(torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(model.detect(feats, sampling, scoring, 16)[1], plain_maps, rtol=1e-5, atol=1e-5)
    for bad, needle in (([0.5], "one per row"), ([0.5, 1.5], r"\[0, 1\]"), ([float("nan"), 0.5], r"\[0, 1\]")):
        with pytest.raises(ConfigError, match=needle):
            model.set_map_weights(torch.tensor(bad))

    model.set_map_weights(torch.tensor([0.0, 1.0]))
    config = VPDMConfig(model=model.config, sampling=sampling, scoring=scoring)
    path = save_checkpoint(tmp_path / "weighted.pt", model, config, categories=["a", "b"])
    loaded, _, _ = load_checkpoint(path)
    assert loaded.map_weight.tolist() == [0.0, 1.0]
    torch.testing.assert_close(
        loaded.detect(feats, sampling, scoring, 16)[1], model.detect(feats, sampling, scoring, 16)[1]
    )
    payload = torch.load(path, weights_only=True)
    del payload["state_dict"]["map_weight"]  # as written before map weights existed
    torch.save(payload, path)
    before, _, _ = load_checkpoint(path)
    assert before.map_weight.numel() == 0
    torch.testing.assert_close(before.detect(feats, sampling, scoring, 16)[1], plain_maps)
    # statistics fitted anew: weights chosen on the old ones are dropped
    model.fit_statistics(feats, classes, sampling, scoring, per_class=6, batch_size=4)
    assert model.map_weight.numel() == 0
