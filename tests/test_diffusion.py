"""Tests of the shifted diffusion process, each against truth computed independently here (numpy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

from vpdm.errors import ConfigError
from vpdm.model.diffusion import (
    GeneratorNoise,
    NoiseScheduleConfig,
    SharedNoise,
    ShiftedDiffusion,
    StoredNoise,
    make_betas,
    make_sampler,
)


def np_abar(betas: np.ndarray) -> np.ndarray:
    return np.cumprod(1.0 - betas)


def linear_np(t: int = 1000, start: float = 1e-4, end: float = 0.02) -> np.ndarray:
    return np.linspace(start, end, t, dtype=np.float64)


def gens(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


# ---------------------------------------------------------------- schedules


def test_linear_betas_match_numpy() -> None:
    betas = make_betas(NoiseScheduleConfig(num_timesteps=1000, beta_start=1e-4, beta_end=0.02))
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    np.testing.assert_allclose(betas.numpy(), linear_np(), rtol=0, atol=1e-15)


def test_quadratic_and_sigmoid_betas_match_numpy() -> None:
    quad = make_betas(NoiseScheduleConfig(schedule="quadratic", num_timesteps=50, beta_start=1e-4, beta_end=0.02))
    np.testing.assert_allclose(quad.numpy(), np.linspace(1e-2, math.sqrt(0.02), 50) ** 2, rtol=1e-12)
    sig = make_betas(NoiseScheduleConfig(schedule="sigmoid", num_timesteps=50, beta_start=1e-4, beta_end=0.02))
    ramp = 1.0 / (1.0 + np.exp(-np.linspace(-6, 6, 50)))
    np.testing.assert_allclose(sig.numpy(), ramp * (0.02 - 1e-4) + 1e-4, rtol=1e-12)


def test_cosine_abar_matches_closed_form_before_clipping() -> None:
    t_max, s = 1000, 0.008
    betas = make_betas(NoiseScheduleConfig(schedule="cosine", num_timesteps=t_max, cosine_s=s)).numpy()
    assert np.all((betas > 0) & (betas <= 0.999))
    clipped = np.nonzero(betas >= 0.999)[0]
    first_clipped = clipped[0] if clipped.size else t_max
    assert first_clipped > 900  # only the very last steps hit the clip
    f = lambda u: np.cos((u / t_max + s) / (1 + s) * np.pi / 2) ** 2  # noqa: E731
    expected = f(np.arange(1, t_max + 1)) / f(0.0)  # code t is the paper's t+1
    np.testing.assert_allclose(np_abar(betas)[:first_clipped], expected[:first_clipped], rtol=1e-9, atol=1e-13)


# ---------------------------------------------------------------- posterior tables


def test_posterior_tables_match_method_formulas() -> None:
    d = ShiftedDiffusion(NoiseScheduleConfig())
    beta = linear_np()
    abar = np_abar(beta)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    g0 = beta * np.sqrt(abar_prev) / (1 - abar)
    g1 = (1 - abar_prev) * np.sqrt(1 - beta) / (1 - abar)
    btilde = beta * (1 - abar_prev) / (1 - abar)
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), abar, rtol=1e-12)
    np.testing.assert_allclose(d.posterior_g0.numpy(), g0, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(d.posterior_g1.numpy(), g1, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(d.posterior_variance.numpy(), btilde, rtol=1e-10, atol=1e-14)
    total = (d.posterior_g0 + d.posterior_g1 + d.posterior_g2).numpy()
    np.testing.assert_allclose(total, np.ones(1000), rtol=0, atol=1e-10)
    assert d.posterior_variance[0] == 0.0
    np.testing.assert_allclose(d.posterior_log_variance_clipped[0].item(), math.log(btilde[1]), rtol=1e-12)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "quadratic", "sigmoid"])
def test_posterior_equals_gaussian_conditioning(schedule: str) -> None:
    """Condition the joint of (x_{t-1}, x_t) built from the forward step and marginal, in numpy."""
    d = ShiftedDiffusion(NoiseScheduleConfig(schedule=schedule, num_timesteps=200))
    beta = d.betas.numpy()
    abar = np_abar(beta)
    x0, y = 0.8, -1.3
    ts = np.array([0, 1, 2, 50, 120, 199])
    x_t = np.array([0.3, -2.0, 1.1, 0.0, 2.5, -0.4])
    for t, xt in zip(ts, x_t):
        ap = abar[t - 1] if t > 0 else 1.0
        m1, v1 = math.sqrt(ap) * x0 + (1 - math.sqrt(ap)) * y, 1 - ap  # x_{t-1}
        sa = math.sqrt(1 - beta[t])
        m2, v2, cov = sa * m1 + (1 - sa) * y, sa**2 * v1 + beta[t], sa * v1  # x_t and the cross term
        want_mean, want_var = m1 + cov / v2 * (xt - m2), v1 - cov**2 / v2
        tt = torch.tensor([t])
        mean, var = d.posterior_mean_variance(
            torch.tensor([x0], dtype=torch.float64),
            torch.tensor([xt], dtype=torch.float64),
            torch.tensor([y], dtype=torch.float64),
            tt,
        )
        assert mean.item() == pytest.approx(want_mean, rel=1e-9, abs=1e-12)
        assert var.item() == pytest.approx(want_var, rel=1e-9, abs=1e-14)


# ---------------------------------------------------------------- forward process


def test_q_step_chain_matches_marginal_monte_carlo() -> None:
    d = ShiftedDiffusion(NoiseScheduleConfig(num_timesteps=100, beta_end=0.2))
    abar = np_abar(np.linspace(1e-4, 0.2, 100))
    n, t_end, x0, y = 200_000, 40, 1.7, -0.5
    g = torch.Generator().manual_seed(0)
    yv = torch.full((n,), y, dtype=torch.float64)
    x = torch.full((n,), x0, dtype=torch.float64)
    for s in range(t_end + 1):
        x = d.q_step(x, yv, torch.full((n,), s), torch.randn(n, generator=g, dtype=torch.float64))
    want_mean = math.sqrt(abar[t_end]) * x0 + (1 - math.sqrt(abar[t_end])) * y
    want_var = 1 - abar[t_end]
    assert abs(x.mean().item() - want_mean) < 5 * math.sqrt(want_var / n)
    assert abs(x.var().item() - want_var) < 5 * want_var * math.sqrt(2 / (n - 1))
    # q_sample's marginal, read off with noise 0 (mean) and noise 1 (mean + std), agrees with the same truth.
    t = torch.tensor([t_end])
    x0t, yt = torch.tensor([x0], dtype=torch.float64), torch.tensor([y], dtype=torch.float64)
    mean = d.q_sample(x0t, yt, t, torch.zeros(1, dtype=torch.float64)).item()
    std = d.q_sample(x0t, yt, t, torch.ones(1, dtype=torch.float64)).item() - mean
    assert mean == pytest.approx(want_mean, rel=1e-12)
    assert std == pytest.approx(math.sqrt(want_var), rel=1e-12)


def test_predict_x0_inverts_q_sample() -> None:
    d = ShiftedDiffusion(NoiseScheduleConfig())
    g = torch.Generator().manual_seed(1)
    x0, y, noise = (torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0, 10, 500, 999])
    x_t = d.q_sample(x0, y, t, noise)
    torch.testing.assert_close(d.predict_x0(x_t, y, t, noise), x0, rtol=0, atol=1e-9)


def test_unshifted_ablation_is_plain_ddpm() -> None:
    d = ShiftedDiffusion(NoiseScheduleConfig(shift_to_condition=False))
    abar = torch.from_numpy(np_abar(linear_np()))
    g = torch.Generator().manual_seed(2)
    x0, y, noise = (torch.randn(3, 2, 4, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([3, 400, 999])
    a = abar[t].sqrt().view(-1, 1, 1)
    x_t = d.q_sample(x0, y, t, noise)
    torch.testing.assert_close(x_t, a * x0 + (1 - a**2).sqrt() * noise, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d.predict_x0(x_t, y, t, noise), x0, rtol=0, atol=1e-9)
    mean, _ = d.posterior_mean_variance(x0, x_t, y, t)
    torch.testing.assert_close(mean, d.posterior_mean_variance(x0, x_t, torch.zeros_like(y), t)[0])
    torch.manual_seed(0)
    x_t_start = d.initial_sample(torch.full((20_000,), 5.0, dtype=torch.float64))
    assert abs(x_t_start.mean().item()) < 5 / math.sqrt(20_000)  # N(0, I), not N(yhat, I)
    firsts: list[Tensor] = []
    d.sample(lambda x, yh, t: firsts.append(x.clone()) or torch.zeros_like(x), y[:1], generators=gens([3]))
    noise = torch.randn(2, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(firsts[0][0], noise)  # x_T is pure noise: no yhat shift


def test_sample_timesteps_uniform() -> None:
    d = ShiftedDiffusion(NoiseScheduleConfig(num_timesteps=10))
    t = d.sample_timesteps(50_000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() == 0 and t.max() == 9
    counts = torch.bincount(t, minlength=10).double()
    assert (counts - 5000).abs().max() < 5 * math.sqrt(5000 * 0.9)


# ---------------------------------------------------------------- reverse process


def oracle(d: ShiftedDiffusion, x0: Tensor, abar: np.ndarray):  # noqa: ANN201
    """The true eps for a known x0, from the test's own abar."""
    ab = torch.from_numpy(abar)

    def eps_fn(x_t: Tensor, yhat: Tensor, t: Tensor) -> Tensor:
        a = ab[t].to(x_t.dtype).view(-1, *([1] * (x_t.dim() - 1)))
        return (x_t - a.sqrt() * x0 - (1 - a.sqrt()) * yhat) / (1 - a).sqrt()

    return eps_fn


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"num_steps": 100},
        {"num_steps": 13},
        {"num_steps": 1},
        {"sampler": "ddim", "eta": 0.0, "num_steps": 10},
        {"sampler": "ddim", "eta": 1.0, "num_steps": 25},
        {"sampler": "ddim", "eta": 0.5},
    ],
)
def test_oracle_eps_recovers_x0(kwargs: dict) -> None:
    d = ShiftedDiffusion(NoiseScheduleConfig(num_timesteps=100, beta_end=0.2))
    g = torch.Generator().manual_seed(3)
    x0, yhat = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    out = d.sample(oracle(d, x0, np_abar(np.linspace(1e-4, 0.2, 100))), yhat, generators=gens([1, 2]), **kwargs)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-4)


def test_chain_starts_at_yhat_plus_generator_noise() -> None:
    d = ShiftedDiffusion(NoiseScheduleConfig(num_timesteps=50))
    seen: list[tuple[Tensor, Tensor]] = []

    def eps_fn(x_t: Tensor, yhat: Tensor, t: Tensor) -> Tensor:
        seen.append((x_t.clone(), t.clone()))
        return torch.zeros_like(x_t)

    yhat = torch.randn(2, 3, 2)
    d.sample(eps_fn, yhat, num_steps=7, generators=gens([10, 11]))
    first = torch.stack([torch.randn(3, 2, generator=torch.Generator().manual_seed(s)) for s in (10, 11)])
    torch.testing.assert_close(seen[0][0], yhat + first, rtol=0, atol=0)
    visited = [int(t[0]) for _, t in seen]
    assert visited == d.timesteps_for(7).tolist() and visited[0] == 49 and visited[-1] == 0
    assert all(t.dtype == torch.long and t.shape == (2,) and (t == t[0]).all() for _, t in seen)


def test_initial_sample_is_standard_normal_around_yhat() -> None:
    d = ShiftedDiffusion(NoiseScheduleConfig())
    yhat = torch.linspace(-2, 2, 40_000, dtype=torch.float64)
    torch.manual_seed(0)
    z = d.initial_sample(yhat) - yhat
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)


def test_timesteps_for() -> None:
    d = ShiftedDiffusion(NoiseScheduleConfig(num_timesteps=100))
    assert d.timesteps_for(None).tolist() == list(range(99, -1, -1))
    assert d.timesteps_for(1).tolist() == [99]
    for n in (2, 3, 7, 10, 33, 99, 100):
        ts = d.timesteps_for(n).tolist()
        assert len(ts) == n and ts[0] == 99 and ts[-1] == 0 and all(a > b for a, b in zip(ts, ts[1:]))
    np.testing.assert_array_equal(d.timesteps_for(12).numpy(), np.round(np.linspace(0, 99, 12))[::-1])


@pytest.mark.parametrize("T", [100, 1000])
def test_trailing_timesteps_match_diffusers_formula(T: int) -> None:
    d = ShiftedDiffusion(NoiseScheduleConfig(num_timesteps=T))
    for n in (1, 2, 3, 7, 10, 33, T // 2, T):
        # diffusers DDIMScheduler.set_timesteps, timestep_spacing="trailing"
        want = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
        got = d.timesteps_for(n, "trailing").numpy()
        np.testing.assert_array_equal(got, want)
        assert got[0] == T - 1 and np.all(np.diff(got) < 0)
    assert d.timesteps_for(2, "trailing").tolist() == [T - 1, T // 2 - 1]
    with pytest.raises(ConfigError, match="spacing"):
        d.timesteps_for(3, "leading")


def test_ddim_eta1_full_chain_equals_ddpm() -> None:
    """DDIM's eta=1 variance is the DDPM posterior variance: same noise draws give the same chain."""
    d = ShiftedDiffusion(NoiseScheduleConfig(num_timesteps=60, beta_end=0.2))

    def eps_fn(x_t: Tensor, yhat: Tensor, t: Tensor) -> Tensor:
        return torch.tanh(x_t - yhat) * 0.7 + 0.01 * t.view(-1, 1).to(x_t.dtype)

    yhat = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    a = d.sample(eps_fn, yhat, sampler="ddpm", generators=gens([5, 6, 7]))
    b = d.sample(eps_fn, yhat, sampler="ddim", eta=1.0, generators=gens([5, 6, 7]))
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_gaussian_data_exact_eps_sampler_statistics() -> None:
    """Data x0 ~ N(mu, s2) has a closed-form optimal eps; the samplers then are linear-Gaussian maps

    whose output mean and variance the test computes by its own recursion (DDPM posterior / DDIM Eq. 12).
    """
    t_max, mu, s2, y, n = 1000, 1.5, 0.25, -0.7, 10_000
    d = ShiftedDiffusion(NoiseScheduleConfig(num_timesteps=t_max))
    abar_all = np_abar(linear_np(t_max))
    ab_t = torch.from_numpy(abar_all)

    def eps_fn(x_t: Tensor, yhat: Tensor, t: Tensor) -> Tensor:
        ab = float(ab_t[int(t[0])])  # the samplers use one timestep per call
        a, b = math.sqrt(ab), math.sqrt(1 - ab)
        return b / (a * a * s2 + b * b) * (x_t - a * mu - (1 - a) * yhat)

    def expected_var(steps: list[int], sampler: str, eta: float = 1.0) -> float:
        var = 1.0  # Var(z_T) of the start N(yhat, I)
        for i, t in enumerate(steps):
            a2 = abar_all[t]
            ap = abar_all[steps[i + 1]] if i + 1 < len(steps) else 1.0
            v = a2 * s2 + (1 - a2)
            k_x0, k_eps = math.sqrt(a2) * s2 / v, math.sqrt(1 - a2) / v  # z0_hat, eps_hat per unit z_t
            if sampler == "ddpm":
                beta = 1 - a2 / ap
                g0 = beta * math.sqrt(ap) / (1 - a2)
                g1 = (1 - ap) * math.sqrt(1 - beta) / (1 - a2)
                coef, sig2 = g0 * k_x0 + g1, beta * (1 - ap) / (1 - a2)
            else:
                sig2 = eta**2 * (1 - ap) / (1 - a2) * (1 - a2 / ap)
                coef = math.sqrt(ap) * k_x0 + math.sqrt(1 - ap - sig2) * k_eps
            var = coef**2 * var + sig2
        return var

    yhat = torch.full((n,), y, dtype=torch.float64)
    cases = [
        ("ddpm", None, 1.0, "linspace"),
        ("ddpm", 50, 1.0, "linspace"),
        ("ddim", 50, 0.0, "linspace"),
        ("ddim", 10, 0.0, "linspace"),
        ("ddim", 20, 0.5, "linspace"),
        ("ddim", 3, 0.0, "trailing"),
        ("ddpm", 10, 1.0, "trailing"),
    ]
    for sampler, steps, eta, spacing in cases:
        torch.manual_seed(0)
        out = d.sample(eps_fn, yhat, num_steps=steps, sampler=sampler, eta=eta, spacing=spacing)
        want_var = expected_var(d.timesteps_for(steps, spacing).tolist(), sampler, eta)
        assert abs(out.mean().item() - mu) < 5 * math.sqrt(want_var / n) + 1e-3, (sampler, steps)
        assert abs(out.var().item() - want_var) < 5 * want_var * math.sqrt(2 / n), (sampler, steps)
        if sampler == "ddpm" and steps is None:
            assert want_var == pytest.approx(s2, rel=0.03)  # the faithful chain nearly recovers the data law


@pytest.mark.parametrize(
    "kwargs", [{}, {"num_steps": 9}, {"sampler": "ddim", "eta": 1.0, "num_steps": 9}, {"clip_x0": 1.0}]
)
def test_batch_independence(kwargs: dict) -> None:
    d = ShiftedDiffusion(NoiseScheduleConfig(num_timesteps=40, beta_end=0.3))

    def eps_fn(x_t: Tensor, yhat: Tensor, t: Tensor) -> Tensor:  # per-item, like a network in eval mode
        return torch.sin(x_t) * 0.5 + 0.1 * yhat + 0.01 * t.view(-1, 1, 1).float()

    yhat = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(8))
    seeds = [21, 22, 23]
    batch = d.sample(eps_fn, yhat, generators=gens(seeds), **kwargs)
    for i, s in enumerate(seeds):
        alone = d.sample(eps_fn, yhat[i : i + 1], generators=gens([s]), **kwargs)
        torch.testing.assert_close(alone[0], batch[i], rtol=0, atol=1e-6)
    assert not torch.allclose(batch[0], d.sample(eps_fn, yhat[:1], generators=gens([99]), **kwargs)[0])


def test_clip_x0_bounds_the_reconstruction() -> None:
    d = ShiftedDiffusion(NoiseScheduleConfig(num_timesteps=30, beta_end=0.3))
    yhat = torch.full((2, 8), 3.0)
    out = d.sample(lambda x, y, t: torch.zeros_like(x), yhat, clip_x0=0.5, generators=gens([0, 1]))
    assert out.abs().max() <= 0.5 + 1e-6


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"num_timesteps": 1}, "num_timesteps=1"),
        ({"num_timesteps": 10.0}, "num_timesteps=10.0"),
        ({"beta_end": 1.0}, "beta_end=1.0"),
        ({"beta_start": 0.0}, "beta_start=0.0"),
        ({"beta_start": -1e-3}, "beta_start=-0.001"),
        ({"beta_start": 0.03, "beta_end": 0.02}, "beta_start=0.03"),
        ({"schedule": "exp"}, "'exp'"),
        ({"cosine_s": -0.1}, "cosine_s=-0.1"),
    ],
)
def test_bad_config_raises(kwargs: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        ShiftedDiffusion(NoiseScheduleConfig(**kwargs))
    with pytest.raises(ConfigError):
        NoiseScheduleConfig(**kwargs).validate()


def test_bad_sampling_arguments_raise() -> None:
    d = ShiftedDiffusion(NoiseScheduleConfig(num_timesteps=20))
    yhat = torch.zeros(2, 3)
    zero = lambda x, y, t: torch.zeros_like(x)  # noqa: E731
    for n in (0, 21, -1):
        with pytest.raises(ConfigError, match=f"num_steps={n}"):
            d.timesteps_for(n)
        with pytest.raises(ConfigError, match=f"num_steps={n}"):
            d.sample(zero, yhat, num_steps=n)
    with pytest.raises(ConfigError, match="'euler'"):
        d.sample(zero, yhat, sampler="euler")
    with pytest.raises(ConfigError, match="1 generators for a batch of 2"):
        d.sample(zero, yhat, generators=gens([0]))
    with pytest.raises(ConfigError, match="eta=0.0"):
        d.sample(zero, yhat, eta=0.0)
    with pytest.raises(ConfigError, match="shape"):
        d.sample(lambda x, y, t: torch.zeros(2), yhat)
    with pytest.raises(ConfigError, match="0..19"):
        d.q_sample(yhat, yhat, torch.tensor([0, 20]), yhat)
    with pytest.raises(ConfigError, match="LongTensor"):
        d.q_sample(yhat, yhat, torch.tensor([0.0, 1.0]), yhat)


def test_config_dict_round_trip() -> None:
    config = NoiseScheduleConfig(schedule="cosine", num_timesteps=300)
    assert NoiseScheduleConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="beta_ends"):
        NoiseScheduleConfig.from_dict({"beta_ends": 0.1})


def test_sampler_objects_run_the_same_chain_as_sample_and_check_once() -> None:
    """diffusers' form (build, set_timesteps, step per timestep) is the chain sample() runs; the DDPM step's
    sigma is the process's own posterior standard deviation on the full chain; bad settings fail at build."""
    from vpdm.model.config import SamplingConfig
    from vpdm.model.diffusion import DDIMSampler, DDPMSampler, make_sampler

    process = ShiftedDiffusion(NoiseScheduleConfig(num_timesteps=50))
    yhat = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))

    def model_fn(x, y, t):
        return 0.3 * (x - y) + 0.01 * t.float().view(-1, 1, 1, 1)

    for sampler, eta in (("ddim", 0.0), ("ddim", 0.7), ("ddpm", None)):
        gens = [torch.Generator().manual_seed(5) for _ in range(2)]
        want = process.sample(
            model_fn,
            yhat,
            num_steps=4,
            sampler=sampler,
            eta=1.0 if eta is None else eta,
            generators=gens,
            spacing="trailing",
        )
        chain = make_sampler(process, sampler, eta)
        gens = [torch.Generator().manual_seed(5) for _ in range(2)]
        x = yhat + GeneratorNoise(gens)(yhat)
        for t in chain.set_timesteps(4, "trailing"):
            output = model_fn(x, yhat, torch.full((2,), t, dtype=torch.long))
            noise = GeneratorNoise(gens)(x) if chain.previous(t) >= 0 and chain.stochastic else None
            x = chain.step(output, t, x, yhat, noise=noise).prev_sample
        assert torch.equal(x, want)
    full = DDPMSampler(process)
    full.set_timesteps(None)
    x_t = torch.randn(1, 3, 4, 4)
    for t in (40, 10, 1):
        sigma = full.step(torch.zeros_like(x_t), t, x_t, torch.zeros_like(x_t)).sigma
        assert sigma == pytest.approx(float(process.posterior_variance[t]) ** 0.5, rel=1e-9)
    assert isinstance(SamplingConfig(sampler="ddpm", eta=0.0).build(process), DDPMSampler)  # ddpm has no eta
    assert SamplingConfig(sampler="ddim", eta=0.4).build(process).eta == 0.4
    assert isinstance(make_sampler(process, "ddim"), DDIMSampler)
    for bad, needle in ((("euler", None), "unknown"), (("ddpm", 0.5), "only applies"), (("ddim", -1.0), "eta=-1.0")):
        with pytest.raises(ConfigError, match=needle):
            make_sampler(process, *bad)


@pytest.mark.parametrize(("sampler", "eta"), [("ddpm", None), ("ddim", 0.0), ("ddim", 0.5)])
def test_stored_noise_replays_what_every_item_draws_when_its_generator_is_seeded_alike(sampler, eta):
    """The exported graph's noise: the draws recorded once (StoredNoise.record, as many as the sampler says it
    makes) give the chain bit for bit what one generator per item, all seeded alike, gives it in torch."""
    process = ShiftedDiffusion(NoiseScheduleConfig(num_timesteps=40))
    yhat = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    chain = make_sampler(process, sampler, eta)
    chain.set_timesteps(5, "trailing")
    calls = []

    def model_fn(x, y, t):
        return 0.3 * x - 0.1 * y

    def counting(source):
        def draw(like):
            calls.append(1)
            return source(like)

        return draw

    seeded = process.sample(
        model_fn,
        yhat,
        num_steps=5,
        sampler=chain,
        noise=counting(GeneratorNoise([torch.Generator().manual_seed(7) for _ in range(3)])),
        spacing="trailing",
    )
    assert len(calls) == chain.noise_draws() == (1 if eta == 0.0 else 5)
    stored = StoredNoise(StoredNoise.record((2, 4, 4), chain.noise_draws(), 7))
    replayed = process.sample(model_fn, yhat, num_steps=5, sampler=chain, noise=stored, spacing="trailing")
    assert torch.equal(replayed, seeded) and stored.used == len(stored.draws)
    with pytest.raises(ConfigError, match="more than the"):
        stored(yhat)
    # the torch default (VPDM.reconstruct): one stream drawn once per draw and broadcast, the same bits
    shared = process.sample(model_fn, yhat, num_steps=5, sampler=chain, noise=SharedNoise(7, "cpu"), spacing="trailing")
    assert torch.equal(shared, seeded)
    # and not merely one constant: another seed gives another chain (where the chain draws more than its start)
    other = process.sample(model_fn, yhat, num_steps=5, sampler=chain, noise=SharedNoise(8, "cpu"), spacing="trailing")
    assert not torch.equal(other, seeded)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_the_last_step_lands_on_the_split_x0_whatever_the_prediction(prediction, clip):
    """The step to x0 forms z0 alone (no eps): it must equal z0 + y of the full split, clipped as configured."""
    process = ShiftedDiffusion(NoiseScheduleConfig(num_timesteps=30, prediction=prediction))
    g = torch.Generator().manual_seed(3)
    x_t, yhat, out = (torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    chain = make_sampler(process, "ddim", 0.0, clip)
    chain.set_timesteps(3, "trailing")
    t = chain.timesteps[-1]
    a, b = float(process.alphas_cumprod[t]) ** 0.5, (1.0 - float(process.alphas_cumprod[t])) ** 0.5
    z0, _ = process.parameterisation.split(out, x_t - yhat, a, b)
    want = z0 + yhat if clip is None else (z0 + yhat).clamp(-clip, clip)
    step = chain.step(out, t, x_t, yhat)
    torch.testing.assert_close(step.prev_sample, want, rtol=1e-12, atol=1e-12)
    assert step.sigma == 0.0 and step.pred_original_sample is step.prev_sample
