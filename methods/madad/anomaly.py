"""Anomaly maps of MAD-AD (eq. 8 and the Table 3 alternatives) and resampling helpers.

All maps are computed at the internal resolution and resampled to the input size by the
caller. Intensity differences are measured on the VAE's [-1, 1] scale (as in the authors'
code, whose data are normalised to [-1, 1]), so gamma = 0.2 means 10 % of ``data_range``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def resample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``B x C x H x W`` to ``size``: area when shrinking (no aliasing), bilinear when growing."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def gaussian_blur(x: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian smoothing of ``B x 1 x H x W`` with reflect padding (like scipy's
    ``gaussian_filter`` defaults: truncate 4 sigma). ``sigma <= 0`` returns ``x``."""
    if sigma <= 0:
        return x
    radius = max(1, int(truncate * sigma + 0.5))
    radius = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)  # reflect padding must fit
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(x.dtype)
    c = x.shape[1]
    kx = kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    ky = kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kx, groups=c)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), ky, groups=c)


def clip_scale(diff: torch.Tensor, gamma: Optional[float]) -> torch.Tensor:
    """Eq. 8 before smoothing: ``min(d, gamma) / gamma``; ``gamma=None`` leaves ``d``."""
    if gamma is None:
        return diff
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0 or None, got {gamma}")
    return diff.clamp(max=gamma) / gamma


def image_diff_map(restored: torch.Tensor, reference: torch.Tensor, gamma: Optional[float], sigma: float) -> torch.Tensor:
    """Eq. 8: ``G * min(|x0~ - x0|, gamma) / gamma`` (channel mean of the difference)."""
    diff = (restored - reference).abs().mean(1, keepdim=True)
    return gaussian_blur(clip_scale(diff, gamma), sigma)


def latent_diff_map(z_restored: torch.Tensor, z_input: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    """Table 3 "latent-level diff": mean |z0~ - z_T| over channels, upsampled, smoothed.
    Not clipped: gamma is an image-intensity threshold."""
    diff = (z_restored - z_input).abs().mean(1, keepdim=True)
    return gaussian_blur(resample(diff, size), sigma)


def mean_mask_map(mean_mask: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    """Table 3 "average predicted mask": (1/K) sum_t sigmoid(f_M(z_t)), upsampled, smoothed."""
    return gaussian_blur(resample(mean_mask, size), sigma)


def gaussian_sigma_check(sigma: float) -> None:
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"smoothing_sigma must be a finite number >= 0, got {sigma}")
