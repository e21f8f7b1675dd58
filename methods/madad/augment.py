"""Training augmentation of the authors' code (off in the paper profile).

Each of rotation (+-deg), translation (+-px), brightness (x U[1-b, 1+b]) and contrast
(blend with the brain mean, factor U[1-c, 1+c]) is applied to a sample with probability
``p``. Image and brain mask move together; images are on [-1, 1] with background -1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _u(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def augment(
    x: torch.Tensor,
    brain: torch.Tensor,
    gen: torch.Generator,
    p: float,
    rotate_deg: float = 0.0,
    translate_px: float = 0.0,
    brightness: float = 0.0,
    contrast: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment ``x`` (``B x C x S x S`` on [-1, 1]) and ``brain`` (``B x S x S``)."""
    if p <= 0:
        return x, brain
    b, _, h, w = x.shape
    on = lambda: (torch.rand(b, generator=gen) < p).float()  # noqa: E731
    angle = on() * _u(b, -rotate_deg, rotate_deg, gen) * math.pi / 180
    tx = on() * _u(b, -translate_px, translate_px, gen) * 2 / w  # grid units span [-1, 1]
    ty = on() * _u(b, -translate_px, translate_px, gen) * 2 / h
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1).to(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
    brain = F.grid_sample(brain.float().unsqueeze(1), grid, mode="nearest", padding_mode="zeros", align_corners=False)[:, 0]
    x01 = (x + 1) / 2
    gain = 1 + on() * _u(b, -brightness, brightness, gen)
    x01 = x01 * gain.view(-1, 1, 1, 1).to(x)
    factor = (1 + on() * _u(b, -contrast, contrast, gen)).view(-1, 1, 1, 1).to(x)
    m = brain.unsqueeze(1)
    mean = (x01 * m).sum((1, 2, 3), keepdim=True) / m.sum((1, 2, 3), keepdim=True).clamp(min=1)
    x01 = torch.where(m > 0, (x01 - mean) * factor + mean, x01)
    return x01 * 2 - 1, brain
