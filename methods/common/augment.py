"""Training augmentation of the ci-ber diffusion baselines, in plain batched torch.

The ci-ber loaders (ci-ber/THOR_DDPM ``data/loaders/brain_loader.py``, the same in
ci-ber/GenAI_UAD) augment every training slice with torchvision's
``RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))`` followed by
``RandomHorizontalFlip(0.5)``. ``random_affine_flip`` draws the same distribution per
sample, as torchvision does: an angle uniform in [-10, 10] degrees (positive =
counter-clockwise on screen), integer shifts uniform in +-10 % of the side (rounded), an
isotropic scale uniform in [0.9, 1.1], no shear, rotation about the image centre, nearest
neighbour sampling (torchvision's default) and fill 0 (the background of the data)
outside the image.

Departure: torchvision goes through ``ToPILImage`` / ``ToTensor``, which quantises the
slice to 8 bits and clips it to [0, 1]; here the data keep their units and precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AffineParams:
    """Per-sample parameters (each a length-B tensor): angle in degrees, shifts in pixels, scale, flip."""

    angle: torch.Tensor
    shift_x: torch.Tensor
    shift_y: torch.Tensor
    scale: torch.Tensor
    flip: torch.Tensor  # bool


def draw_params(
    batch: int,
    size: tuple[int, int],
    generator: torch.Generator | None,
    degrees: float = 10.0,
    translate: float = 0.1,
    scale: tuple[float, float] = (0.9, 1.1),
    flip_p: float = 0.5,
) -> AffineParams:
    """Draw torchvision's ``RandomAffine`` + ``RandomHorizontalFlip`` parameters for ``batch`` samples."""
    device = generator.device if generator is not None else torch.device("cpu")

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(batch, generator=generator, device=device, dtype=torch.float64)

    h, w = size
    return AffineParams(
        angle=u(-degrees, degrees),
        shift_x=torch.round(u(-translate * w, translate * w)),
        shift_y=torch.round(u(-translate * h, translate * h)),
        scale=u(scale[0], scale[1]),
        flip=torch.rand(batch, generator=generator, device=device) < flip_p,
    )


def apply_affine_flip(x: torch.Tensor, params: AffineParams, mode: str = "nearest") -> torch.Tensor:
    """Warp ``x`` (B x C x H x W) by ``params``: rotate/scale about the centre, shift, then flip."""
    b, _, h, w = x.shape
    theta = params.angle.to(x.device, torch.float64) * math.pi / 180.0
    s = params.scale.to(x.device, torch.float64)
    # output pixel p samples the input at A^-1 (p - c - t) + c, in pixel units (y down);
    # a counter-clockwise rotation on screen is R(-theta) in these coordinates
    cos, sin = torch.cos(theta) / s, torch.sin(theta) / s
    inv = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # B x 2 x 2, (x, y)
    shift = torch.stack([params.shift_x, params.shift_y], -1).to(x.device, torch.float64)
    # affine_grid works in normalised coordinates ([-1, 1] across the image, align_corners=False)
    norm = torch.tensor([w / 2.0, h / 2.0], device=x.device, dtype=torch.float64)
    lin = inv * norm.view(1, 1, 2) / norm.view(1, 2, 1)  # D^-1 A^-1 D
    offset = -(lin @ (shift / norm).unsqueeze(-1)).squeeze(-1)
    grid = F.affine_grid(torch.cat([lin, offset.unsqueeze(-1)], -1).to(x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)
    flip = params.flip.to(x.device).view(b, 1, 1, 1)
    return torch.where(flip, out.flip(-1), out)


def random_affine_flip(x: torch.Tensor, generator: torch.Generator | None, **kwargs) -> torch.Tensor:
    """The ci-ber training augmentation of a batch (see the module docstring); kwargs go to ``draw_params``."""
    return apply_affine_flip(x, draw_params(x.shape[0], tuple(x.shape[-2:]), generator, **kwargs))
