"""The VPDM model on backbone features: vague prototypes + shifted conditional diffusion.

Works on feature maps (B x C x S x S), not images: the frozen backbone lives in ``backbone`` and
the whole image-to-score path in ``pipeline``. ``forward`` returns the training losses so the
model can be wrapped in DistributedDataParallel as it is.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vpdm.config import ModelConfig, SamplingConfig
from vpdm.denoiser import Denoiser
from vpdm.diffusion import ShiftedDiffusion
from vpdm.scoring import feature_distance
from vpdm.vpot import VaguePrototypes


class VPDM(nn.Module):
    def __init__(self, channels: int, feature_size: int, config: ModelConfig | None = None):
        super().__init__()
        config = config or ModelConfig()
        config.validate(feature_size)
        self.config = config
        self.channels = channels
        self.feature_size = feature_size
        self.prototypes = VaguePrototypes(config.prototypes, channels, feature_size)
        self.denoiser = Denoiser(channels, config.denoiser)
        self.diffusion = ShiftedDiffusion(config.diffusion)
        self.register_buffer("feature_mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("feature_std", torch.ones(1, channels, 1, 1))

    # -- set-up from training data -------------------------------------------------------------
    @torch.no_grad()
    def fit_normalisation(self, features: Tensor) -> None:
        """Per-channel mean/std of the training features (see ``ModelConfig.feature_norm``)."""
        if self.config.feature_norm == "channel":
            self.feature_mean.copy_(features.mean(dim=(0, 2, 3), keepdim=True))
            self.feature_std.copy_(features.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6))

    @torch.no_grad()
    def init_prototypes(self, features: Tensor, generator: torch.Generator | None = None) -> None:
        self.prototypes.init_from(self.normalise(features), generator)

    def normalise(self, features: Tensor) -> Tensor:
        return (features - self.feature_mean) / self.feature_std

    # -- training -------------------------------------------------------------------------------
    def forward(self, features: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Training losses for a batch of raw backbone features (Algorithm 1 + Eq. 17)."""
        x0 = self.normalise(features)
        cond = self.prototypes(x0)
        yhat = cond["yhat"]
        t = self.diffusion.sample_timesteps(x0.shape[0], generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = self.diffusion.q_sample(x0, yhat, t, noise)
        eps = self.predict_noise(x_t, yhat, t)
        eps_mse = (eps - noise).pow(2).mean()
        loss = eps_mse + self.config.ot_weight * cond["ot_loss"]
        return {"loss": loss, "eps_mse": eps_mse.detach(), "ot_loss": cond["ot_loss"].detach()}

    def predict_noise(self, x_t: Tensor, yhat: Tensor, t: Tensor) -> Tensor:
        """eps_theta(x_t, yhat, t) = sqrt(1 - abar_t) * z_t + denoiser(x_t, yhat, t), with z_t = x_t - yhat.

        The skip term is the best linear guess of the noise for unit-variance data (exact at t = T,
        where z_t is almost all noise); the network learns what is left. Without it the network must
        carry all C independent noise channels through its narrower width, which it cannot: the noise
        estimate near t = T then stays poor and ``x0_hat = (...) / sqrt(abar_t)`` blows it up ~150x.
        Preconditioning in the spirit of EDM's ``c_skip``; the parameterisation is still eps.
        """
        z_t = x_t - yhat if self.config.diffusion.shift_to_condition else x_t
        return self._skip_scale(t, x_t) * z_t + self.denoiser(x_t, yhat, t)

    def _skip_scale(self, t: Tensor, like: Tensor) -> Tensor:
        abar = self.diffusion.alphas_cumprod.to(device=like.device, dtype=like.dtype)[t]
        return (1.0 - abar).sqrt().view(-1, *([1] * (like.ndim - 1)))

    # -- inference ------------------------------------------------------------------------------
    @torch.no_grad()
    def condition(self, features: Tensor) -> Tensor:
        """The vague condition yhat of each image, assigned per image (batch-independent)."""
        was_training = self.prototypes.training
        self.prototypes.eval()
        try:
            return self.prototypes(self.normalise(features))["yhat"]
        finally:
            self.prototypes.train(was_training)

    @torch.no_grad()
    def reconstruct(self, features: Tensor, sampling: SamplingConfig | None = None, progress: bool = False) -> Tensor:
        """Algorithm 2: start at N(yhat, I) and denoise back to x0; returns the reconstruction in
        normalised feature space. The image enters only through yhat."""
        sampling = sampling or SamplingConfig()
        yhat = self.condition(features)
        generators = [
            torch.Generator(device=features.device).manual_seed(sampling.seed) for _ in range(features.shape[0])
        ]
        return self.diffusion.sample(
            self.predict_noise,
            yhat,
            num_steps=sampling.num_steps,
            sampler=sampling.sampler,
            eta=sampling.eta if sampling.sampler == "ddim" else 1.0,
            generators=generators,
            progress=progress,
            spacing=sampling.spacing,
        )

    @torch.no_grad()
    def anomaly_maps(self, features: Tensor, sampling: SamplingConfig | None = None) -> Tensor:
        """Feature-resolution anomaly maps ||x0 - x0_rec||_2 over channels (B x S x S)."""
        return feature_distance(self.normalise(features), self.reconstruct(features, sampling))
