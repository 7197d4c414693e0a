"""The VPDM noise process: CARD-style shifted diffusion, kept apart from the denoising network.

The forward process is shifted towards the condition ``yhat`` (Han et al. 2022, "CARD")::

    q(x_t | x_{t-1}, yhat) = N(sqrt(alpha_t) x_{t-1} + (1 - sqrt(alpha_t)) yhat, beta_t I)
    q(x_t | x_0, yhat)     = N(sqrt(abar_t) x_0 + (1 - sqrt(abar_t)) yhat, (1 - abar_t) I)

so ``z = x - yhat`` follows plain DDPM and the chain starts from ``x_T ~ N(yhat, I)``. The image
enters the reverse chain only through ``yhat``: that is what stops anomalous detail leaking into
the reconstruction. See ``docs/method.md`` for the maths.

**Timestep indexing.** Code uses 0-based timesteps ``t = 0 .. T-1``; code ``t`` is the paper's
``t + 1``. So ``alphas_cumprod[t]`` is the paper's ``abar_{t+1}``, ``alphas_cumprod_prev[t]`` is
``abar_t`` (and equals 1 at ``t = 0``), ``q_step(x_prev, yhat, t, ...)`` maps the paper's
``x_t`` to ``x_{t+1}``, and the network ``eps_fn`` is always called with these 0-based indices.

Like diffusers' schedulers, the process is a small object built from a config
(:class:`NoiseScheduleConfig`); it holds no learnable parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor

from vpdm.errors import ConfigError

__all__ = [
    "NoiseScheduleConfig",
    "ShiftedDiffusion",
    "DiffusionStep",
    "make_betas",
    "SCHEDULES",
    "SAMPLERS",
    "PREDICTIONS",
    "Parameterisation",
    "EpsilonPrediction",
    "SamplePrediction",
    "VPrediction",
    "PARAMETERISATIONS",
    "ReverseSampler",
    "DDPMSampler",
    "DDIMSampler",
    "make_sampler",
]

SCHEDULES: tuple[str, ...] = ("linear", "cosine", "quadratic", "sigmoid")
SAMPLERS: tuple[str, ...] = ("ddpm", "ddim")
PREDICTIONS: tuple[str, ...] = ("eps", "x0", "v")
TIMESTEP_SPACINGS = ("linspace", "trailing")
MAX_BETA: float = 0.999  # Nichol & Dhariwal clip the cosine betas here so the last step is not singular.

EpsFn = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass
class DiffusionStep:
    """What one reverse step returns (like diffusers' ``DDIMSchedulerOutput``)."""

    prev_sample: Tensor  # x at the next (smaller) timestep, or the reconstruction after the last step
    pred_original_sample: Tensor  # x0_hat at this step
    sigma: float  # standard deviation of the noise this step adds


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class NoiseScheduleConfig:
    """The noise schedule, as a tunable family (the sweep tunes it).

    ``schedule``: ``"linear"`` (betas evenly spaced from ``beta_start`` to ``beta_end``, the paper's
    choice), ``"quadratic"`` (evenly spaced in sqrt(beta)), ``"sigmoid"`` (a sigmoid ramp between the
    two ends, as in CARD/GeoDiff) or ``"cosine"`` (Nichol & Dhariwal, offset ``cosine_s``, betas
    clipped at 0.999; ``beta_start``/``beta_end`` are unused). ``shift_to_condition=False`` is the
    paper's "DDPM start" ablation: no ``yhat`` shift in the process and ``x_T ~ N(0, I)``; the
    network still receives ``yhat``.

    ``prediction`` is what the network's output means, as diffusers' ``prediction_type``: ``"eps"``
    (the noise, the paper's choice), ``"x0"`` (the clean features, diffusers' ``"sample"``) or ``"v"``
    (``sqrt(abar) eps - sqrt(1 - abar) z0``, Salimans & Ho 2022). Every caller goes through
    :meth:`ShiftedDiffusion.split` and :meth:`ShiftedDiffusion.target`, so the choice is one switch.
    """

    schedule: str = "linear"
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    cosine_s: float = 0.008
    shift_to_condition: bool = True
    prediction: str = "eps"

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad value; caught here, not deep in a run."""
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"noise schedule {self.schedule!r} is unknown; expected one of {list(SCHEDULES)}")
        t = self.num_timesteps
        if not isinstance(t, int) or isinstance(t, bool) or t < 2:
            raise ConfigError(f"num_timesteps={t!r} is invalid; expected an integer >= 2")
        for name in ("beta_start", "beta_end"):
            value = getattr(self, name)
            if not _is_real(value) or not 0.0 < value < 1.0:
                raise ConfigError(f"{name}={value!r} is invalid; expected a number strictly between 0 and 1")
        if self.beta_start > self.beta_end:
            raise ConfigError(
                f"beta_start={self.beta_start!r} is larger than beta_end={self.beta_end!r}; "
                "expected beta_start <= beta_end"
            )
        if not _is_real(self.cosine_s) or self.cosine_s < 0.0:
            raise ConfigError(f"cosine_s={self.cosine_s!r} is invalid; expected a finite number >= 0")
        if not isinstance(self.shift_to_condition, bool):
            raise ConfigError(f"shift_to_condition={self.shift_to_condition!r} is invalid; expected true or false")
        if self.prediction not in PREDICTIONS:
            raise ConfigError(f"prediction={self.prediction!r} is unknown; expected one of {list(PREDICTIONS)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, for checkpoints and tracking."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> NoiseScheduleConfig:
        """Build and validate from a dict; unknown keys are an error so typos are not silently ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown noise schedule keys {unknown}; expected a subset of {sorted(known)}")
        config = cls(**dict(values))
        config.validate()
        return config


def make_betas(config: NoiseScheduleConfig) -> Tensor:
    """The betas of ``config`` as a float64 tensor of length T, every value in (0, 1)."""
    config.validate()
    n = config.num_timesteps
    if config.schedule == "linear":
        betas = torch.linspace(config.beta_start, config.beta_end, n, dtype=torch.float64)
    elif config.schedule == "quadratic":
        betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=torch.float64) ** 2
    elif config.schedule == "sigmoid":
        ramp = torch.sigmoid(torch.linspace(-6.0, 6.0, n, dtype=torch.float64))
        betas = ramp * (config.beta_end - config.beta_start) + config.beta_start
    else:  # cosine: abar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2)
        s = config.cosine_s
        steps = torch.arange(n + 1, dtype=torch.float64) / n
        f = torch.cos((steps + s) / (1.0 + s) * math.pi / 2.0) ** 2
        betas = (1.0 - f[1:] / f[:-1]).clamp(max=MAX_BETA)
    if not bool(((betas > 0.0) & (betas < 1.0)).all()):
        raise ConfigError(
            f"noise schedule {config.schedule!r} with {config.to_dict()} gives betas outside (0, 1) "
            f"(min {betas.min().item():.3g}, max {betas.max().item():.3g}); expected every beta in (0, 1)"
        )
    return betas


class Parameterisation:
    """What the network's output means (diffusers' ``prediction_type``), in the shifted process's own variables:
    ``z0 = x0 - yhat``, ``z_t = x_t - yhat = a z0 + b eps`` with ``a = sqrt(abar_t)``, ``b = sqrt(1 - abar_t)``.
    One object per prediction type holds every formula that depends on it, so callers never branch on it."""

    name: str = ""
    predicts_noise: bool = False  # the output is eps_hat itself

    def target(self, x0: Tensor, y: Tensor, noise: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """The training target for ``z_t = a z0 + b noise``, ``z0 = x0 - y`` (``y`` the shift: yhat or 0;
        formed only by the types whose target needs it, not on every eps training step)."""
        raise NotImplementedError

    def split(self, output: Tensor, z: Tensor, a: Tensor | float, b: Tensor | float) -> tuple[Tensor, Tensor]:
        """``(z0_hat, eps_hat)`` from the network's output and ``z = x_t - yhat``."""
        raise NotImplementedError

    def original(self, output: Tensor, z: Tensor, a: Tensor | float, b: Tensor | float) -> Tensor:
        """``z0_hat`` alone (the chain's last step needs no eps: full-size passes saved)."""
        return self.split(output, z, a, b)[0]

    def skip_scale(self, a: Tensor, b: Tensor) -> Tensor:
        """``c_skip``: the best linear guess of the target from ``z_t`` for unit-variance ``z0`` (EDM)."""
        raise NotImplementedError

    def loss_weight(self, snr: Tensor, clipped: Tensor) -> Tensor:
        """The weight in this output's space that weighs the *x0* error by ``clipped`` (min-SNR)."""
        raise NotImplementedError


class EpsilonPrediction(Parameterisation):
    """The noise (the paper's choice; diffusers' ``"epsilon"``)."""

    name, predicts_noise = "eps", True

    def target(self, x0, y, noise, a, b):
        return noise

    def split(self, output, z, a, b):
        return (z - b * output) / a, output

    def skip_scale(self, a, b):
        return b

    def loss_weight(self, snr, clipped):
        return clipped / snr


class SamplePrediction(Parameterisation):
    """The clean features ``z0`` (diffusers' ``"sample"``)."""

    name = "x0"

    def target(self, x0, y, noise, a, b):
        return x0 - y

    def split(self, output, z, a, b):
        return output, (z - a * output) / b

    def original(self, output, z, a, b):
        return output

    def skip_scale(self, a, b):
        return a

    def loss_weight(self, snr, clipped):
        return clipped


class VPrediction(Parameterisation):
    """``v = a eps - b z0`` (Salimans & Ho 2022; diffusers' ``"v_prediction"``)."""

    name = "v"

    def target(self, x0, y, noise, a, b):
        return a * noise - b * (x0 - y)

    def split(self, output, z, a, b):
        return a * z - b * output, b * z + a * output  # z0 = a z - b v, eps = b z + a v

    def skip_scale(self, a, b):
        return torch.zeros_like(a)

    def loss_weight(self, snr, clipped):
        return clipped / (snr + 1.0)


PARAMETERISATIONS: dict[str, Parameterisation] = {
    p.name: p for p in (EpsilonPrediction(), SamplePrediction(), VPrediction())
}


# Where the reverse chain's noise comes from: called once per draw, in the chain's order (the start, then each
# stochastic step), with the tensor the draw must be shaped like (or broadcast to).
NoiseSource = Callable[[Tensor], Tensor]


class GeneratorNoise:
    """Standard noise with item i of every draw from ``generators[i]`` alone, so an item's result never depends
    on its batch (``ShiftedDiffusion.sample``'s ``generators``; with all of them seeded alike,
    :class:`SharedNoise` gives the same draws for less); None: the global generator."""

    def __init__(self, generators: Sequence[torch.Generator] | None = None) -> None:
        self.generators = generators

    def __call__(self, like: Tensor) -> Tensor:
        generators = self.generators
        if generators is None:
            return torch.randn_like(like)
        if all(g.device == like.device for g in generators):  # drawn in place: no stacked copy
            out = torch.empty_like(like, memory_format=torch.contiguous_format)
            for item, g in zip(out, generators):
                torch.randn(like.shape[1:], generator=g, device=g.device, dtype=like.dtype, out=item)
            return out
        items = [torch.randn(like.shape[1:], generator=g, device=g.device, dtype=like.dtype) for g in generators]
        return torch.stack(items).to(like.device)


class SharedNoise:
    """The draws every image of :class:`GeneratorNoise` gets when all its generators are seeded ``seed`` alike
    (an image's result never depends on its batch), each made once for one item and broadcast over the batch:
    the same numbers for 1 / B of the random draws (a full-size normal draw per image cost as much as a
    third of the denoiser step on a CPU)."""

    def __init__(self, seed: int, device: torch.device | str) -> None:
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, like: Tensor) -> Tensor:
        g = self.generator
        return torch.randn(like.shape[1:], generator=g, device=g.device, dtype=like.dtype).unsqueeze(0)


class StoredNoise:
    """Draws made once and replayed in order, each broadcast over the batch: the exported graph's noise (a
    stored tensor, no random op). :meth:`record` makes the draws every image of :class:`GeneratorNoise` gets
    when all its generators are seeded alike."""

    def __init__(self, draws: Tensor) -> None:
        self.draws = draws  # K x 1 x (item shape)
        self.used = 0

    def __call__(self, like: Tensor) -> Tensor:
        if self.used >= len(self.draws):
            raise ConfigError(f"the chain asked for more than the {len(self.draws)} stored noise draw(s)")
        draw = self.draws[self.used]
        self.used += 1
        return draw

    @staticmethod
    def record(shape: Sequence[int], draws: int, seed: int) -> Tensor:
        """``draws`` x 1 x ``shape`` float32 draws of the CPU generator seeded ``seed``, in order."""
        generator = torch.Generator(device="cpu").manual_seed(seed)
        made = [torch.randn(tuple(shape), generator=generator, dtype=torch.float32) for _ in range(draws)]
        return torch.stack(made).unsqueeze(1)


def _posterior(abar: Tensor, abar_prev: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """betas, g0, g1, g2, btilde of the shifted posterior, from abar at consecutive chain steps."""
    betas = 1.0 - abar / abar_prev
    alphas = 1.0 - betas
    g0 = betas * abar_prev.sqrt() / (1.0 - abar)
    g1 = (1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar)
    g2 = 1.0 - g0 - g1
    variance = betas * (1.0 - abar_prev) / (1.0 - abar)
    return betas, g0, g1, g2, variance


class ShiftedDiffusion:
    """CARD-style shifted diffusion: forward noising, posterior, and the reverse samplers.

    All tables are precomputed in float64 (``betas``, ``alphas``, ``alphas_cumprod``,
    ``alphas_cumprod_prev``, ``posterior_g0/g1/g2``, ``posterior_variance``,
    ``posterior_log_variance_clipped``); the methods use copies cast to the input's dtype and device,
    so float32 work stays float32 while the coefficients were computed accurately.
    """

    def __init__(self, config: NoiseScheduleConfig | None = None) -> None:
        self.config = config if config is not None else NoiseScheduleConfig()
        self.betas = make_betas(self.config)  # validates the config
        self.num_timesteps: int = int(self.betas.shape[0])
        self.shift_to_condition: bool = self.config.shift_to_condition
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        _, self.posterior_g0, self.posterior_g1, self.posterior_g2, self.posterior_variance = _posterior(
            self.alphas_cumprod, self.alphas_cumprod_prev
        )
        # At t = 0 the posterior is a point mass on x0 (abar_prev = 1); make that exact.
        self.posterior_g1[0] = 0.0
        self.posterior_variance[0] = 0.0
        self.posterior_g2 = 1.0 - self.posterior_g0 - self.posterior_g1
        # DDPM's clipped log variance: the t = 0 variance is 0, so borrow t = 1's.
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        # Coefficients of the marginal q(x_t | x0, yhat); the shift term is dropped in the ablation.
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self._shift_scale = 1.0 if self.shift_to_condition else 0.0
        self.parameterisation: Parameterisation = PARAMETERISATIONS[self.config.prediction]
        self._cache: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}

    def __repr__(self) -> str:
        return f"ShiftedDiffusion({self.config})"

    # ------------------------------------------------------------------ helpers
    def _table(self, name: str, like: Tensor) -> Tensor:
        """A float64 table cast to ``like``'s dtype and device, cached so the hot path does not copy."""
        dtype = like.dtype if like.is_floating_point() else torch.float32
        key = (name, like.device, dtype)
        cached = self._cache.get(key)
        if cached is None:
            cached = getattr(self, name).to(device=like.device, dtype=dtype)
            self._cache[key] = cached
        return cached

    def _extract(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        """Gather ``name[t]`` and shape it [B, 1, 1, ...] to broadcast against ``like``."""
        values = self._table(name, like)[t.to(like.device)]
        return values.reshape(-1, *([1] * (like.dim() - 1)))

    def _check_t(self, t: Tensor, like: Tensor) -> None:
        if not isinstance(t, Tensor) or t.dtype != torch.long or t.dim() != 1:
            raise ConfigError(
                f"timesteps must be a 1-D LongTensor of length batch; got "
                f"{type(t).__name__} {getattr(t, 'dtype', '')} shape {tuple(getattr(t, 'shape', ()))}"
            )
        if like.dim() == 0 or t.shape[0] != like.shape[0]:
            raise ConfigError(
                f"timesteps of length {t.shape[0]} do not match a batch of shape {tuple(like.shape)}; "
                "expected one timestep per batch item"
            )
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ConfigError(
                f"timesteps range {int(t.min())}..{int(t.max())} is invalid; "
                f"expected 0-based values in 0..{self.num_timesteps - 1}"
            )

    def _shift(self, yhat: Tensor) -> Tensor:
        """The shift target: ``yhat``, or zeros for the un-shifted DDPM ablation."""
        return yhat if self.shift_to_condition else torch.zeros_like(yhat)

    # ------------------------------------------------------------------ forward process
    def q_sample(self, x0: Tensor, yhat: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Draw ``x_t ~ q(x_t | x0, yhat)`` (the training input) from the given standard noise."""
        self._check_t(t, x0)
        a = self._extract("sqrt_alphas_cumprod", t, x0)
        b = self._extract("sqrt_one_minus_alphas_cumprod", t, x0)
        return a * x0 + self._shift_scale * (1.0 - a) * yhat + b * noise

    def q_step(self, x_prev: Tensor, yhat: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """One forward step producing code-``t`` from code-``t-1`` (``x_prev`` is x0 when ``t == 0``)."""
        self._check_t(t, x_prev)
        sqrt_alpha = self._extract("alphas", t, x_prev).sqrt()
        beta = self._extract("betas", t, x_prev)
        return sqrt_alpha * x_prev + self._shift_scale * (1.0 - sqrt_alpha) * yhat + beta.sqrt() * noise

    def posterior_mean_variance(self, x0: Tensor, x_t: Tensor, yhat: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of ``q(x_{t-1} | x_t, x0, yhat)``; the variance is shaped [B, 1, ...]."""
        self._check_t(t, x_t)
        g0 = self._extract("posterior_g0", t, x_t)
        g1 = self._extract("posterior_g1", t, x_t)
        mean = g0 * x0 + g1 * x_t
        if self.shift_to_condition:
            mean = mean + self._extract("posterior_g2", t, x_t) * yhat
        return mean, self._extract("posterior_variance", t, x_t)

    def predict_x0(self, x_t: Tensor, yhat: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Invert the marginal for x0 given a noise estimate (Algorithm 2, with the 1/sqrt(abar) fix)."""
        self._check_t(t, x_t)
        a = self._extract("sqrt_alphas_cumprod", t, x_t)
        b = self._extract("sqrt_one_minus_alphas_cumprod", t, x_t)
        return (x_t - self._shift_scale * (1.0 - a) * yhat - b * eps) / a

    # ------------------------------------------------------------------ parameterisation
    def snr(self, t: Tensor, like: Tensor) -> Tensor:
        """Signal-to-noise ratio ``abar_t / (1 - abar_t)`` of the marginal, shaped to broadcast on ``like``."""
        abar = self._extract("alphas_cumprod", t, like)
        return abar / (1.0 - abar)

    def skip_scale(self, t: Tensor, like: Tensor) -> Tensor:
        """``c_skip(t)``: the best linear guess of the prediction target from ``z_t = x_t - yhat`` for
        unit-variance ``z0`` (EDM-style preconditioning): eps ``sqrt(1 - abar)``, x0 ``sqrt(abar)``, v 0.

        The model adds it to the network's output, so the network learns only what is left. Without
        it a network narrower than the feature map cannot carry every noise channel near t = T."""
        a = self._extract("sqrt_alphas_cumprod", t, like)
        return self.parameterisation.skip_scale(a, self._extract("sqrt_one_minus_alphas_cumprod", t, like))

    def target(self, x0: Tensor, yhat: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """The training target of the configured prediction for ``x_t = q_sample(x0, yhat, t, noise)``."""
        self._check_t(t, x0)
        a = self._extract("sqrt_alphas_cumprod", t, x0)
        b = self._extract("sqrt_one_minus_alphas_cumprod", t, x0)
        return self.parameterisation.target(x0, self._shift(yhat), noise, a, b)

    def split(self, output: Tensor, x_t: Tensor, yhat: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(x0_hat, eps_hat)`` from a network output in the configured parameterisation.

        x0-prediction outputs ``z0 = x0 - yhat`` (the shifted process's own clean variable)."""
        self._check_t(t, x_t)
        a = self._extract("sqrt_alphas_cumprod", t, x_t)
        b = self._extract("sqrt_one_minus_alphas_cumprod", t, x_t)
        y = self._shift(yhat)
        z0, eps = self.parameterisation.split(output, x_t - y, a, b)
        return z0 + y, eps

    def predicted_noise(self, output: Tensor, x_t: Tensor, yhat: Tensor, t: Tensor) -> Tensor:
        """``eps_hat`` from a network output: the output itself for eps-prediction."""
        return output if self.parameterisation.predicts_noise else self.split(output, x_t, yhat, t)[1]

    def loss_weights(self, t: Tensor, like: Tensor, weighting: str = "none", gamma: float = 5.0) -> Tensor:
        """Per-item weights of the MSE in the prediction's own space.

        ``"min_snr"`` (Hang et al. 2023) weighs every timestep's *x0* error by ``min(SNR, gamma)``: in
        eps space that is ``min(SNR, gamma) / SNR``, in x0 space ``min(SNR, gamma)``, in v space
        ``min(SNR, gamma) / (SNR + 1)``. ``"none"`` is the plain MSE (eps: the paper's loss, which
        weighs the x0 error by SNR, i.e. almost not at all near t = T)."""
        if weighting == "none":
            return torch.ones((like.shape[0],) + (1,) * (like.dim() - 1), dtype=like.dtype, device=like.device)
        if weighting != "min_snr":
            raise ConfigError(f"loss weighting {weighting!r} is unknown; expected 'none' or 'min_snr'")
        snr = self.snr(t, like)
        return self.parameterisation.loss_weight(snr, snr.clamp(max=gamma))

    def sample_timesteps(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        max_step: int | None = None,
    ) -> Tensor:
        """Uniform training timesteps in ``0..max_step-1`` (default ``0..T-1``), drawn on the
        generator's device, then moved."""
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 0:
            raise ConfigError(f"batch={batch!r} is invalid; expected a non-negative integer")
        high = self.num_timesteps if max_step is None else max_step
        if not isinstance(high, int) or isinstance(high, bool) or not 1 <= high <= self.num_timesteps:
            raise ConfigError(f"max_step={max_step!r} is invalid; expected an integer in 1..{self.num_timesteps}")
        draw_device = generator.device if generator is not None else device
        t = torch.randint(0, high, (batch,), generator=generator, device=draw_device)
        return t if device is None else t.to(device)

    # ------------------------------------------------------------------ reverse process
    def _start_index(self, start_step: int | None) -> int:
        """0-based index of the chain's first step from the paper's 1-based ``start_step`` (None = T)."""
        if start_step is None:
            return self.num_timesteps - 1
        if not isinstance(start_step, int) or isinstance(start_step, bool) or not 1 <= start_step <= self.num_timesteps:
            raise ConfigError(
                f"start_step={start_step!r} is invalid; expected an integer in 1..{self.num_timesteps} "
                "(T: the paper's start N(yhat, I)) or None"
            )
        return start_step - 1

    def timesteps_for(self, num_steps: int | None, spacing: str = "linspace", start_step: int | None = None) -> Tensor:
        """The timesteps a ``num_steps`` chain visits, descending, as 0-based indices.

        The chain starts at the paper's ``start_step`` (1-based; None = T, i.e. index T-1) and every
        spacing's first index is ``start_step - 1``; ``num_steps == 1`` is that single step to x0_hat
        and ``None`` means every step down from it. With S = ``start_step``:
        ``"linspace"``: evenly spaced over 0..S-1 *including* 0 (Nichol & Dhariwal respacing); its
        last step starts at t=0, where abar is ~1, so it barely changes x and costs a network call.
        ``"trailing"``: S-1, S-1-S/n, ... (diffusers' ``timestep_spacing="trailing"``); every step
        removes real noise, and the last one jumps from t ~ S/n - 1 to x0.
        """
        first = self._start_index(start_step)
        available = first + 1
        n = available if num_steps is None else num_steps
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= available:
            raise ConfigError(
                f"num_steps={num_steps!r} is invalid; expected an integer in 1..{available} "
                f"(the timesteps from the start step {available} down to 1) or None"
            )
        if spacing not in TIMESTEP_SPACINGS:
            raise ConfigError(f"timestep spacing {spacing!r} is unknown; expected one of {list(TIMESTEP_SPACINGS)}")
        if n == 1:
            return torch.tensor([first], dtype=torch.long)
        if spacing == "trailing":
            # Spacing S/n >= 1, so rounding keeps the values distinct; descending already.
            steps = torch.arange(n, dtype=torch.float64) * (available / n)
            return (available - steps).round().long() - 1
        # Spacing >= 1, so rounding keeps the values distinct.
        kept = torch.linspace(0, first, n, dtype=torch.float64).round().long()
        return kept.flip(0)

    def _check_generators(self, yhat: Tensor, generators: Sequence[torch.Generator] | None) -> None:
        if yhat.dim() == 0:
            raise ConfigError("yhat must have a batch dimension; got a 0-d tensor")
        if generators is not None and len(generators) != yhat.shape[0]:
            raise ConfigError(
                f"got {len(generators)} generators for a batch of {yhat.shape[0]}; expected one generator per item"
            )

    def initial_sample(self, yhat: Tensor, generators: Sequence[torch.Generator] | None = None) -> Tensor:
        """The chain's start ``x_T ~ N(yhat, I)`` (``N(0, I)`` without the shift)."""
        self._check_generators(yhat, generators)
        return self._shift(yhat) + GeneratorNoise(generators)(yhat)

    @torch.no_grad()
    def sample(
        self,
        model_fn: EpsFn,
        yhat: Tensor,
        *,
        num_steps: int | None = None,
        sampler: str | ReverseSampler = "ddpm",
        eta: float | None = 1.0,
        generators: Sequence[torch.Generator] | None = None,
        clip_x0: float | None = None,
        progress: bool = False,
        spacing: str = "linspace",
        x0: Tensor | None = None,
        start_step: int | None = None,
        noise: NoiseSource | None = None,
    ) -> Tensor:
        """Run the reverse chain to a reconstruction ``x0`` for each ``yhat``.

        ``model_fn(x_t, yhat, t)`` is the network, returning the configured prediction (eps, x0 or
        v), called with the original 0-based timesteps. The chain starts at the paper's
        ``x_T ~ N(yhat, I)`` when ``start_step`` is None or T; below T it starts from the shifted forward
        marginal of ``x0`` (required then), ``sqrt(abar) x0 + (1 - sqrt(abar)) yhat + sqrt(1 - abar) eps``
        at ``t = start_step`` (SDEdit / DDAD-style: the image's own features, partly noised).
        ``sampler="ddpm"``: ancestral sampling (Algorithm 2 when ``num_steps`` is None or T);
        ``sampler="ddim"``: DDIM on ``z = x - yhat`` with ``eta``. No noise is added at the last step.
        With ``generators`` (one per item) every draw for item i comes from ``generators[i]``, so an
        item's result does not depend on the rest of the batch. ``noise`` replaces them: any
        :data:`NoiseSource` (the exported graph replays stored draws, :class:`StoredNoise`). ``spacing``
        chooses the visited timesteps of a shortened chain (:meth:`timesteps_for`); see
        :meth:`ReverseSampler.step` for ``clip_x0``.
        """
        chain = sampler if isinstance(sampler, ReverseSampler) else make_sampler(self, sampler, eta, clip_x0)
        self._check_generators(yhat, generators)
        if noise is None:
            noise = GeneratorNoise(generators)
        timesteps = chain.set_timesteps(num_steps, spacing, start_step)
        from_image = start_step is not None and start_step < self.num_timesteps
        if from_image:
            if x0 is None or x0.shape != yhat.shape:
                raise ConfigError(
                    f"start_step={start_step} < T={self.num_timesteps} starts the chain from the image's own "
                    f"features: pass x0 of the shape of yhat {tuple(yhat.shape)}, got "
                    f"{None if x0 is None else tuple(x0.shape)}"
                )
            t0 = torch.full((yhat.shape[0],), timesteps[0], dtype=torch.long, device=yhat.device)
            x = self.q_sample(x0, yhat, t0, noise(yhat))
        else:
            x = self._shift(yhat) + noise(yhat)
        batch = yhat.shape[0]

        steps: Any = range(len(timesteps))
        if progress:
            try:
                from tqdm.auto import tqdm

                steps = tqdm(steps, total=len(timesteps), desc=f"{sampler} sampling")
            except ImportError:  # progress is a nicety; never fail a run over it
                pass

        for i in steps:
            t = timesteps[i]
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            t_batch = torch.full((batch,), t, dtype=torch.long, device=yhat.device)
            output = model_fn(x, yhat, t_batch)
            if output.shape != x.shape:
                raise ConfigError(
                    f"model_fn returned shape {tuple(output.shape)}; expected the shape of x_t, {tuple(x.shape)}"
                )
            drawn = noise(x) if t_prev >= 0 and chain.stochastic else None
            x = chain.step(output, t, x, yhat, noise=drawn, t_prev=t_prev).prev_sample
        return x


class ReverseSampler:
    """A reverse-chain sampler as diffusers writes one: built once for a process (its settings checked there),
    :meth:`set_timesteps` for a chain, then :meth:`step` at each visited timestep, returning a
    :class:`DiffusionStep`. The chain runs on ``z = x - yhat``, where the shifted process is plain DDPM."""

    name = ""
    stochastic = True  # draws noise on every step but the last

    def __init__(self, process: ShiftedDiffusion, clip_x0: float | None = None) -> None:
        if clip_x0 is not None and (not _is_real(clip_x0) or clip_x0 <= 0.0):
            raise ConfigError(f"clip_x0={clip_x0!r} is invalid; expected a positive number or None")
        self.process = process
        self.clip_x0 = clip_x0
        self.timesteps: list[int] = []

    def set_timesteps(
        self, num_steps: int | None, spacing: str = "linspace", start_step: int | None = None
    ) -> list[int]:
        """The descending 0-based timesteps of the chain (:meth:`ShiftedDiffusion.timesteps_for`)."""
        self.timesteps = self.process.timesteps_for(num_steps, spacing, start_step).tolist()
        return self.timesteps

    def noise_draws(self) -> int:
        """How many noise draws :meth:`ShiftedDiffusion.sample` makes on the chain of :meth:`set_timesteps`: the
        start, then one per step but the last when the sampler is stochastic."""
        return 1 + (len(self.timesteps) - 1 if self.stochastic else 0)

    def previous(self, t: int) -> int:
        """The timestep after ``t`` in the chain, -1 after the last (the step to x0)."""
        i = self.timesteps.index(t)
        return self.timesteps[i + 1] if i + 1 < len(self.timesteps) else -1

    def step(
        self,
        model_output: Tensor,
        t: int,
        x_t: Tensor,
        yhat: Tensor,
        noise: Tensor | None = None,
        t_prev: int | None = None,
    ) -> DiffusionStep:
        """From index ``t`` to ``t_prev`` (default: the next in :attr:`timesteps`; -1 = to x0). ``noise``
        (standard, like ``x_t``) is added with the step's sigma unless this is the last step; ``clip_x0``
        clamps ``x0_hat`` to ``[-clip_x0, clip_x0]`` and re-derives eps from it."""
        process = self.process
        t_prev = self.previous(t) if t_prev is None else t_prev
        abar = float(process.alphas_cumprod[t])
        abar_prev = float(process.alphas_cumprod[t_prev]) if t_prev >= 0 else 1.0
        y = process._shift(yhat)
        z = x_t - y
        a, b = math.sqrt(abar), math.sqrt(1.0 - abar)
        if t_prev < 0:  # the last step lands on x0_hat itself (abar_prev = 1, no noise, no eps needed)
            z0 = process.parameterisation.original(model_output, z, a, b)
            x0_hat = z0 + y if self.clip_x0 is None else (z0 + y).clamp(-self.clip_x0, self.clip_x0)
            return DiffusionStep(prev_sample=x0_hat, pred_original_sample=x0_hat, sigma=0.0)
        z0, eps = process.parameterisation.split(model_output, z, a, b)
        if self.clip_x0 is not None:
            z0 = (z0 + y).clamp(-self.clip_x0, self.clip_x0) - y
            eps = (z - a * z0) / b
        z_prev, sigma = self._update(z0, eps, z, abar, abar_prev)
        if sigma > 0.0 and noise is not None:
            z_prev = z_prev + sigma * noise
        return DiffusionStep(prev_sample=z_prev + y, pred_original_sample=z0 + y, sigma=sigma)

    def _update(self, z0: Tensor, eps: Tensor, z: Tensor, abar: float, abar_prev: float) -> tuple[Tensor, float]:
        """The noise-free ``z_prev`` and the sigma of the noise added to it."""
        raise NotImplementedError


class DDPMSampler(ReverseSampler):
    """Ancestral sampling: the posterior ``q(x_{t_prev} | x_t, x0_hat, yhat)`` of the (respaced) shifted
    process, ``x_prev = g0 x0_hat + g1 x_t + g2 yhat + sigma z`` (Algorithm 2 on the full chain)."""

    name = "ddpm"

    def _update(self, z0, eps, z, abar, abar_prev):
        # In z = x - yhat the g2 yhat term is absorbed: g0 x0 + g1 x + g2 y - y = g0 z0 + g1 z.
        beta = 1.0 - abar / abar_prev
        g0 = beta * math.sqrt(abar_prev) / (1.0 - abar)
        g1 = (1.0 - abar_prev) * math.sqrt(1.0 - beta) / (1.0 - abar)
        return g0 * z0 + g1 * z, math.sqrt(beta * (1.0 - abar_prev) / (1.0 - abar))


class DDIMSampler(ReverseSampler):
    """DDIM (Song et al. 2021) with ``eta``: 0 deterministic, 1 the posterior's variance."""

    name = "ddim"

    def __init__(self, process: ShiftedDiffusion, eta: float = 0.0, clip_x0: float | None = None) -> None:
        if not _is_real(eta) or eta < 0.0:
            raise ConfigError(f"eta={eta!r} is invalid; expected a finite number >= 0")
        super().__init__(process, clip_x0)
        self.eta = float(eta)
        self.stochastic = eta > 0

    def _update(self, z0, eps, z, abar, abar_prev):
        sigma = self.eta * math.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
        direction = math.sqrt(max(1.0 - abar_prev - sigma**2, 0.0))
        return math.sqrt(abar_prev) * z0 + direction * eps, sigma


def make_sampler(
    process: ShiftedDiffusion, name: str, eta: float | None = None, clip_x0: float | None = None
) -> ReverseSampler:
    """The sampler ``name`` (:data:`SAMPLERS`) for ``process``. ``eta`` is DDIM's (default 0); ddpm is the
    posterior's own variance, eta = 1 by definition, and refuses another."""
    if name not in SAMPLERS:
        raise ConfigError(f"sampler {name!r} is unknown; expected one of {list(SAMPLERS)}")
    if name == "ddim":
        return DDIMSampler(process, 0.0 if eta is None else eta, clip_x0)
    if eta is not None and eta != 1.0:
        raise ConfigError(f"eta={eta!r} only applies to sampler 'ddim'; the 'ddpm' sampler needs eta=1.0")
    return DDPMSampler(process, clip_x0)
