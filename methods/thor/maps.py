"""THOR's map arithmetic on B x 1 x H x W tensors: grey morphology, soft mask, harmonic mean.

Plain torch so it runs batched on the scoring device (the authors round-trip through
scipy.ndimage on the CPU every harmonisation step).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def _check_kernel(k: int) -> int:
    k = int(k)
    if k < 1 or k % 2 == 0:
        raise ValueError(f"morphology kernel size must be odd and >= 1, got {k}")
    return k


def grey_dilation(x: torch.Tensor, k: int) -> torch.Tensor:
    """Max over a k x k square; borders replicated (scipy ``grey_dilation(mode='nearest')``)."""
    k = _check_kernel(k)
    if k == 1:
        return x
    r = k // 2
    return F.max_pool2d(F.pad(x, (r, r, r, r), mode="replicate"), k, stride=1)


def grey_erosion(x: torch.Tensor, k: int) -> torch.Tensor:
    """Min over a k x k square (borders replicated)."""
    return -grey_dilation(-x, k)


def grey_closing(x: torch.Tensor, k: int) -> torch.Tensor:
    """Dilation then erosion: fills dark holes and gaps narrower than k."""
    return grey_erosion(grey_dilation(x, k), k)


def soft_mask(step_map: torch.Tensor, k: int = 13) -> torch.Tensor:
    """THOR's harmonisation mask ``(dilate_k(close_k(map)) + map) / 2``, clipped to [0, 1]."""
    return ((grey_dilation(grey_closing(step_map, k), k) + step_map) * 0.5).clamp(0.0, 1.0)


def harmonic_mean(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Pixel-wise harmonic mean of non-negative maps; a zero in any map gives zero (scipy.stats.hmean)."""
    if len(maps) == 0:
        raise ValueError("harmonic_mean needs at least one map")
    stack = torch.stack([m.float() for m in maps])
    if bool((stack < 0).any()):
        raise ValueError("harmonic_mean needs non-negative maps")
    inv = torch.where(stack > 0, 1.0 / stack.clamp(min=torch.finfo(stack.dtype).tiny), torch.full_like(stack, float("inf")))
    return len(maps) / inv.sum(0)  # n / inf = 0 where some map is zero


def normalise_per_image(m: torch.Tensor, how: str) -> torch.Tensor:
    """``max``: divide each image by its maximum (the authors' choice), then clip to [0, 1]; ``none``: clip only."""
    if how == "max":
        m = m / (m.amax(dim=(1, 2, 3), keepdim=True) + 1e-8)
    elif how != "none":
        raise ValueError(f"step map normalisation must be 'max' or 'none', got {how!r}")
    return m.clamp(0.0, 1.0)
