"""From feature reconstruction error to anomaly maps and image scores.

Shared by VPDM and any other feature-space detector (the benchmark's PatchCore baseline uses the
same functions), so that differences in the metrics come from the models, not from post-processing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vpdm.errors import ConfigError


@dataclass
class ScoringConfig:
    blur_sigma: float = 4.0  # Gaussian blur of the upsampled map, in output pixels (common practice: 4 at 224px); 0 = off
    pool_size: int = 16  # image score = max of the map average-pooled with this window (output pixels)
    map_size: int | None = None  # output map size; None = the image size

    def validate(self) -> None:
        if not (self.blur_sigma >= 0 and math.isfinite(self.blur_sigma)):
            raise ConfigError(f"scoring.blur_sigma must be a finite number >= 0, got {self.blur_sigma!r}")
        if not isinstance(self.pool_size, int) or self.pool_size < 1:
            raise ConfigError(f"scoring.pool_size must be an integer >= 1, got {self.pool_size!r}")
        if self.map_size is not None and (not isinstance(self.map_size, int) or self.map_size < 1):
            raise ConfigError(f"scoring.map_size must be a positive integer or null, got {self.map_size!r}")


def feature_distance(x0: Tensor, x0_rec: Tensor) -> Tensor:
    """Anomaly map S = ||x0 - x0_rec||_2 over channels: B x C x H x W -> B x H x W."""
    return torch.linalg.vector_norm(x0 - x0_rec, dim=1)


def gaussian_kernel1d(sigma: float, device=None) -> Tensor:
    radius = max(1, int(4.0 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of B x H x W maps, reflect padding (no darkening at the borders)."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma, maps.device)
    r = k.numel() // 2
    x = maps.unsqueeze(1)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
    return x.squeeze(1)


def postprocess_maps(maps: Tensor, size: int, blur_sigma: float) -> Tensor:
    """Bilinear upsampling of feature-resolution maps (B x h x w) to ``size`` then optional blur."""
    up = F.interpolate(maps.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False).squeeze(1)
    return gaussian_blur(up, blur_sigma)


def image_scores(maps: Tensor, pool_size: int) -> Tensor:
    """Image score = max of the average-pooled map (robust to single hot pixels)."""
    k = min(pool_size, maps.shape[-1], maps.shape[-2])
    pooled = F.avg_pool2d(maps.unsqueeze(1), kernel_size=k, stride=1)
    return pooled.flatten(1).amax(dim=1)
