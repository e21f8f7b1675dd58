"""Training augmentation of the authors' code (off in the paper profile).

farzad-bz/MAD-AD, ``MedicalDataLoader.py``, builds (albumentations 1.4.21, their
``requirements.txt``)::

    A.Compose([A.Affine(rotate=5, p=0.5), A.Affine(translate_px=image_size // 32, p=0.5),
               A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5)])

With scalar arguments albumentations' ``Affine`` turns ``rotate=5`` into the range (5, 5)
and ``translate_px=8`` into (8, 8) per axis (``to_tuple(v, v)``), so each affine is fixed:
a +5 degree rotation about the image centre, a (+8, +8) pixel shift; ``brightness_limit``
and ``contrast_limit`` are symmetric ranges, and with ``brightness_by_max=True`` the
brightness is additive: ``x' = alpha x + beta`` with ``alpha = 1 + U(-c, c)`` and
``beta = U(-b, b)`` (on [0, 1] units, i.e. ``beta * 255`` on their uint8 PNGs). Each of the
three transforms is applied with probability ``p``; the brain mask moves with the image
(nearest) and the background is reset to 0 afterwards, as their loader does.

One difference, on purpose: albumentations clips to the uint8 range; we do not clip
(prepared data can exceed the nominal range). Rotation and shift are composed into one
bilinear warp (theirs resamples twice when both apply).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _draw(n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=gen.device).to(device)


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
    """Augment ``x`` (``B x C x S x S`` on [-1, 1], background -1) and ``brain`` (``B x S x S``).

    ``rotate_deg`` and ``translate_px`` are the fixed values of the authors' scalar
    arguments (pixels of the internal resolution); ``brightness`` / ``contrast`` are the
    half-widths of the symmetric ranges.
    """
    if p <= 0:
        return x, brain
    b, _, h, w = x.shape
    dev = x.device
    rot_on, shift_on, bc_on = (_draw(b, gen, dev) < p for _ in range(3))
    alpha = 1 + torch.where(bc_on, (2 * _draw(b, gen, dev) - 1) * contrast, torch.zeros(b, device=dev))
    beta = torch.where(bc_on, (2 * _draw(b, gen, dev) - 1) * brightness, torch.zeros(b, device=dev))
    # albumentations' forward map: dst = R (src - c) + c + t with R = [[cos, sin], [-sin, cos]]
    # in image coordinates (y down). grid_sample needs the inverse, src = R^T (dst - c - t) + c,
    # in normalised coordinates where the centre c is 0.
    angle = rot_on.float() * math.radians(rotate_deg)
    cos, sin = torch.cos(angle), torch.sin(angle)
    tx = shift_on.float() * translate_px * 2 / w
    ty = shift_on.float() * translate_px * 2 / h
    theta = torch.stack(
        [torch.stack([cos, -sin, -(cos * tx - sin * ty)], 1), torch.stack([sin, cos, -(sin * tx + cos * ty)], 1)], 1
    ).to(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x01 = F.grid_sample((x + 1) / 2, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    brain = F.grid_sample(brain.float().unsqueeze(1), grid, mode="nearest", padding_mode="zeros", align_corners=False)[:, 0]
    x01 = alpha.view(-1, 1, 1, 1).to(x) * x01 + beta.view(-1, 1, 1, 1).to(x)
    x01 = x01 * (brain > 0).unsqueeze(1).to(x)  # background back to 0, as their loader does
    return x01 * 2 - 1, brain
