"""The noise-prediction network eps_theta(x_t, yhat, t).

The paper does not give the architecture. Ours is a small two-level conditional UNet on the
feature map (C x 32 x 32 for the paper's setting):

* input ``[x_t, yhat]`` (2C channels; 3C with ``[x_t, yhat, copy]`` when the model also passes a copy
  of the image's features, ``model.input_copy``) projected by a 1x1 convolution to ``width`` channels;
* one pointwise (1x1) residual block at full resolution, a stride-2 convolution to half
  resolution where the ``depth`` 3x3 residual blocks do the spatial work (4x fewer positions:
  cheap on a CPU), then an upsampling path with a skip connection and one more pointwise
  full-resolution block; the skip keeps per-position detail, the half-resolution path context;
* every residual block is GroupNorm -> SiLU -> 3x3 conv, with a FiLM (scale, shift) from the
  sinusoidal timestep embedding; GroupNorm, not BatchNorm, so an image's output never depends on
  the other images of its batch;
* a zero-initialised 1x1 output convolution back to C channels (starts as "predict no noise").

With the defaults (width 64, depth 2) and C=208 (EfficientNet-Lite2) it costs about 0.2 GFLOP
of dense convolution per 32x32 map and step (width 128: 0.7; 3x3 convolutions at full resolution
would cost 2.4x more). On bottle, width 64 and 3 DDIM steps score at 1.8x the backbone-only time
with the same image AUROC as width 128; ``python -m vpdm.bench`` measures both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vpdm.errors import ConfigError


@dataclass
class DenoiserConfig:
    width: int = 64  # channels inside the network (bottle: same AUROC as 128 at about a third of the time)
    depth: int = 2  # residual blocks at half resolution
    groups: int = 8  # GroupNorm groups; must divide width
    time_dim: int = 128  # size of the sinusoidal timestep embedding
    dropout: float = 0.0

    def validate(self) -> None:
        for name in ("width", "depth", "groups", "time_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "depth" else 1):
                raise ConfigError(f"denoiser.{name} must be a positive integer, got {value!r}")
        if self.width % self.groups:
            raise ConfigError(f"denoiser.groups={self.groups} must divide denoiser.width={self.width}")
        if self.time_dim % 2:
            raise ConfigError(f"denoiser.time_dim must be even, got {self.time_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"denoiser.dropout must be in [0, 1), got {self.dropout!r}")


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Transformer-style sinusoidal embedding of integer timesteps (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float().unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv residual block with FiLM timestep conditioning."""

    def __init__(self, channels: int, emb_dim: int, groups: int, dropout: float, kernel: int = 3):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, kernel, padding=kernel // 2)
        self.film = nn.Linear(emb_dim, 2 * channels)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(channels, channels, kernel, padding=kernel // 2)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return x + h


class Denoiser(nn.Module):
    """eps_theta(x_t, yhat, t): predicts the noise of the shifted diffusion from the noisy features and the condition."""

    def __init__(self, channels: int, config: DenoiserConfig | None = None, extra_inputs: int = 0):
        super().__init__()
        if extra_inputs not in (0, 1):
            raise ValueError(f"extra_inputs must be 0 or 1 (a copy of the image's features), got {extra_inputs!r}")
        self.extra_inputs = extra_inputs
        config = config or DenoiserConfig()
        config.validate()
        self.config = config
        w, g = config.width, config.groups
        self.time_mlp = nn.Sequential(
            nn.Linear(config.time_dim, 4 * config.time_dim),
            nn.SiLU(),
            nn.Linear(4 * config.time_dim, 4 * config.time_dim),
        )
        emb = 4 * config.time_dim
        self.inp = nn.Conv2d((2 + extra_inputs) * channels, w, 1)
        self.full_in = ResBlock(w, emb, g, config.dropout, kernel=1)
        self.down = nn.Conv2d(w, w, 3, stride=2, padding=1)
        self.mid = nn.ModuleList([ResBlock(w, emb, g, config.dropout) for _ in range(config.depth)])
        self.up = nn.Conv2d(2 * w, w, 1)
        self.full_out = ResBlock(w, emb, g, config.dropout, kernel=1)
        self.out_norm = nn.GroupNorm(g, w)
        self.out = nn.Conv2d(w, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x_t: Tensor, yhat: Tensor, t: Tensor, copy: Tensor | None = None) -> Tensor:
        if (copy is None) != (self.extra_inputs == 0):
            raise ValueError(
                "this denoiser takes a copy of the image's features beside yhat"
                if self.extra_inputs
                else "this denoiser was built without an input for a copy of the image's features"
            )
        inputs = [x_t, yhat] if copy is None else [x_t, yhat, copy]
        emb = self.time_mlp(timestep_embedding(t, self.config.time_dim))
        h = self.full_in(self.inp(torch.cat(inputs, dim=1)), emb)
        skip = h
        h = self.down(h)
        for block in self.mid:
            h = block(h, emb)
        h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
        h = self.full_out(self.up(torch.cat([h, skip], dim=1)), emb)
        return self.out(F.silu(self.out_norm(h)))
