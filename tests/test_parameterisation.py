"""Prediction types (eps / x0 / v), min-SNR weighting and chains that start below T.

Each test checks the code against truth computed here from the closed forms of the shifted process
(``z = x - yhat`` is plain DDPM: ``z_t = sqrt(abar) z0 + sqrt(1 - abar) eps``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

from vpdm.errors import ConfigError
from vpdm.model.diffusion import PREDICTIONS, NoiseScheduleConfig, ShiftedDiffusion


def gens(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def abar_np(t_max: int = 100, end: float = 0.2) -> np.ndarray:
    return np.cumprod(1.0 - np.linspace(1e-4, end, t_max))


def coefs(abar: np.ndarray, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    ab = torch.from_numpy(abar)[t].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))
    return ab.sqrt(), (1 - ab).sqrt()


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_target_and_split_are_the_closed_forms(prediction: str) -> None:
    d = ShiftedDiffusion(NoiseScheduleConfig(num_timesteps=100, beta_end=0.2, prediction=prediction))
    g = torch.Generator().manual_seed(0)
    x0, yhat, noise = (torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0, 7, 50, 99])
    a, b = coefs(abar_np(), t, x0)
    x_t = d.q_sample(x0, yhat, t, noise)
    z0 = x0 - yhat
    want = {"eps": noise, "x0": z0, "v": a * noise - b * z0}[prediction]
    target = d.target(x0, yhat, t, noise)
    torch.testing.assert_close(target, want, rtol=0, atol=1e-12)
    # The exact target splits back into the true x0 and noise.
    x0_hat, eps_hat = d.split(target, x_t, yhat, t)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(eps_hat, noise, rtol=0, atol=1e-9)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("weighting", ["none", "min_snr"])
def test_weighted_loss_is_the_documented_x0_weighting(prediction: str, weighting: str) -> None:
    """For the same x0 error, the weighted MSE in each space is w(t) ||z0 - z0_hat||^2 with
    w = SNR (eps, unweighted), 1 (x0), SNR + 1 (v), and min(SNR, gamma) for every space under min-SNR."""
    gamma = 5.0
    d = ShiftedDiffusion(NoiseScheduleConfig(num_timesteps=100, beta_end=0.2, prediction=prediction))
    g = torch.Generator().manual_seed(1)
    x0, yhat, noise, err = (torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(4))
    t = torch.tensor([0, 3, 20, 60, 99])
    a, b = coefs(abar_np(), t, x0)
    snr = a**2 / b**2
    x_t = d.q_sample(x0, yhat, t, noise)
    z_t, z0_hat = x_t - yhat, (x0 - yhat) + 0.1 * err
    eps_hat = (z_t - a * z0_hat) / b
    output = {"eps": eps_hat, "x0": z0_hat, "v": a * eps_hat - b * z0_hat}[prediction]
    w = d.loss_weights(t, x0, weighting, gamma)
    got = (w * (output - d.target(x0, yhat, t, noise)).pow(2)).flatten(1).sum(1)
    x0_err = (z0_hat - (x0 - yhat)).pow(2).flatten(1).sum(1)
    if weighting == "min_snr":
        factor = snr.clamp(max=gamma)
    else:
        factor = {"eps": snr, "x0": torch.ones_like(snr), "v": snr + 1}[prediction]
    torch.testing.assert_close(got, factor.flatten() * x0_err, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"num_steps": 7},
        {"sampler": "ddim", "eta": 0.0, "num_steps": 3, "spacing": "trailing"},
        {"sampler": "ddim", "eta": 0.0, "num_steps": 2, "start_step": 30},
        {"num_steps": 5, "start_step": 50},
    ],
)
def test_oracle_of_every_parameterisation_recovers_x0(prediction: str, kwargs: dict) -> None:
    d = ShiftedDiffusion(NoiseScheduleConfig(num_timesteps=100, beta_end=0.2, prediction=prediction))
    g = torch.Generator().manual_seed(3)
    x0, yhat = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    abar = abar_np()

    def model_fn(x_t: Tensor, y: Tensor, t: Tensor) -> Tensor:
        a, b = coefs(abar, t, x_t)
        z_t, z0 = x_t - y, x0 - y
        eps = (z_t - a * z0) / b
        return {"eps": eps, "x0": z0, "v": a * eps - b * z0}[prediction]

    out = d.sample(model_fn, yhat, generators=gens([1, 2]), x0=x0 if "start_step" in kwargs else None, **kwargs)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-4)


def test_chain_below_T_starts_at_the_forward_marginal_of_the_image() -> None:
    d = ShiftedDiffusion(NoiseScheduleConfig(num_timesteps=100, beta_end=0.2))
    seen: list[tuple[Tensor, Tensor]] = []

    def model_fn(x_t: Tensor, y: Tensor, t: Tensor) -> Tensor:
        seen.append((x_t.clone(), t.clone()))
        return torch.zeros_like(x_t)

    g = torch.Generator().manual_seed(5)
    x0, yhat = torch.randn(2, 3, 2, generator=g), torch.randn(2, 3, 2, generator=g)
    d.sample(
        model_fn,
        yhat,
        num_steps=3,
        sampler="ddim",
        eta=0.0,
        spacing="trailing",
        generators=gens([10, 11]),
        x0=x0,
        start_step=25,
    )
    noise = torch.stack([torch.randn(3, 2, generator=torch.Generator().manual_seed(s)) for s in (10, 11)])
    ab = float(abar_np()[24])  # 1-based step 25 is code index 24
    want = math.sqrt(ab) * x0 + (1 - math.sqrt(ab)) * yhat + math.sqrt(1 - ab) * noise
    torch.testing.assert_close(seen[0][0], want, rtol=0, atol=1e-6)
    # trailing spacing within the first 25 steps: diffusers' formula with T replaced by 25
    assert [int(t[0]) for _, t in seen] == (np.round(np.arange(25, 0, -25 / 3)).astype(int) - 1).tolist()


def test_start_at_T_is_the_papers_start_whatever_x0() -> None:
    d = ShiftedDiffusion(NoiseScheduleConfig(num_timesteps=50))
    firsts: list[Tensor] = []
    yhat = torch.randn(1, 4)
    d.sample(
        lambda x, y, t: firsts.append(x.clone()) or torch.zeros_like(x),
        yhat,
        generators=gens([3]),
        x0=torch.full((1, 4), 100.0),
        start_step=50,
    )
    torch.testing.assert_close(firsts[0], yhat + torch.randn(1, 4, generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("sampler,steps,eta", [("ddim", 3, 0.0), ("ddpm", 10, 1.0), ("ddim", 5, 0.5)])
def test_gaussian_data_from_a_noised_image_has_the_recursions_statistics(
    prediction: str, sampler: str, steps: int, eta: float
) -> None:
    """z0 ~ N(0, s2) around yhat has a linear optimal denoiser; started from the marginal of a fixed
    z0 at step s, the chain's output is C z0 + N(0, V) with C, V from the test's own recursion."""
    t_max, s2, start, n = 1000, 0.25, 250, 20_000
    d = ShiftedDiffusion(NoiseScheduleConfig(num_timesteps=t_max, prediction=prediction))
    abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, t_max))

    def model_fn(x_t: Tensor, y: Tensor, t: Tensor) -> Tensor:
        ab = float(abar[int(t[0])])
        a, b = math.sqrt(ab), math.sqrt(1 - ab)
        z = x_t - y
        eps = b / (a * a * s2 + b * b) * z
        z0 = (z - b * eps) / a
        return {"eps": eps, "x0": z0, "v": a * eps - b * z0}[prediction]

    visited = d.timesteps_for(steps, "trailing", start).tolist()
    c, var = math.sqrt(abar[start - 1]), 1 - abar[start - 1]
    for i, t in enumerate(visited):
        a2 = abar[t]
        ap = abar[visited[i + 1]] if i + 1 < len(visited) else 1.0
        v = a2 * s2 + (1 - a2)
        k_x0, k_eps = math.sqrt(a2) * s2 / v, math.sqrt(1 - a2) / v
        if sampler == "ddpm":
            beta = 1 - a2 / ap
            coef = beta * math.sqrt(ap) / (1 - a2) * k_x0 + (1 - ap) * math.sqrt(1 - beta) / (1 - a2)
            sig2 = beta * (1 - ap) / (1 - a2)
        else:
            sig2 = eta**2 * (1 - ap) / (1 - a2) * (1 - a2 / ap)
            coef = math.sqrt(ap) * k_x0 + math.sqrt(1 - ap - sig2) * k_eps
        c, var = coef * c, coef**2 * var + (sig2 if i + 1 < len(visited) else 0.0)
    z0_value, y = 0.8, -0.3
    yhat = torch.full((n,), y, dtype=torch.float64)
    x0 = torch.full((n,), y + z0_value, dtype=torch.float64)
    torch.manual_seed(0)
    out = (
        d.sample(model_fn, yhat, num_steps=steps, sampler=sampler, eta=eta, spacing="trailing", x0=x0, start_step=start)
        - y
    )
    assert abs(out.mean().item() - c * z0_value) < 5 * math.sqrt(var / n) + 1e-9
    assert abs(out.var().item() - var) < 5 * var * math.sqrt(2 / n) + 1e-12


def test_bad_start_and_training_range_are_refused() -> None:
    d = ShiftedDiffusion(NoiseScheduleConfig(num_timesteps=100))
    yhat = torch.zeros(1, 2)
    with pytest.raises(ConfigError, match="x0"):
        d.sample(lambda x, y, t: x, yhat, start_step=30)
    with pytest.raises(ConfigError, match="start_step"):
        d.sample(lambda x, y, t: x, yhat, start_step=0, x0=yhat)
    with pytest.raises(ConfigError, match="num_steps"):
        d.timesteps_for(31, "trailing", start_step=30)
    with pytest.raises(ConfigError, match="max_step"):
        d.sample_timesteps(4, max_step=101)
    t = d.sample_timesteps(20_000, generator=torch.Generator().manual_seed(0), max_step=25)
    assert int(t.min()) == 0 and int(t.max()) == 24
    with pytest.raises(ConfigError, match="prediction"):
        NoiseScheduleConfig(prediction="sample").validate()
    with pytest.raises(ConfigError, match="weighting"):
        d.loss_weights(torch.tensor([1]), yhat, "snr")


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_skip_scale_is_the_least_squares_guess_of_the_target_from_z_t(prediction: str) -> None:
    """Monte Carlo: for unit-variance z0 and noise, c_skip is the regression coefficient of the target on
    z_t = a z0 + b eps, i.e. E[target z_t] / E[z_t^2]; the network then learns only what z_t cannot say."""
    from vpdm.model.diffusion import PARAMETERISATIONS

    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(2, 400_000, generator=g, dtype=torch.float64)
    param = PARAMETERISATIONS[prediction]
    for abar in (0.02, 0.5, 0.97):
        a, b = torch.tensor(abar, dtype=torch.float64).sqrt(), torch.tensor(1 - abar, dtype=torch.float64).sqrt()
        z_t = a * z0 + b * noise
        target = param.target(z0, torch.zeros_like(z0), noise, a, b)
        regression = float((target * z_t).mean() / (z_t * z_t).mean())
        assert regression == pytest.approx(float(param.skip_scale(a, b)), abs=5e-3)
        back = param.split(target, z_t, a, b)  # the output that equals the target gives back z0 and eps
        torch.testing.assert_close(back[0], z0)
        torch.testing.assert_close(back[1], noise)
