"""Training masks of MAD-AD: random patch masks on the latent grid, restricted to the brain.

``M = 1`` marks latent cells that the forward process noises (eq. 2). Per sample, a ratio
``r ~ U[r_min, r_max]`` of the patches of a grid with patch size ``(p_y, p_x)`` is chosen
uniformly without replacement (``round(r * n_patches)`` patches, so the mean ratio is
unbiased); ``p_y`` and ``p_x`` are drawn independently from ``patch_sizes``.

Device: the masks are built on ``gen.device`` (the training device) from ``gen``; the patch
sizes, which set tensor shapes, come from ``size_gen`` (a CPU generator, default ``gen``)
so that building a mask needs no device-to-host copy. With one CPU generator for both the
draws are those of a single CPU stream.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def _draw_sizes(n: int, sizes: Sequence[int], probs: Optional[Sequence[float]], gen: torch.Generator) -> torch.Tensor:
    p = torch.tensor(probs if probs is not None else [1.0] * len(sizes), dtype=torch.float64, device=gen.device)
    idx = torch.multinomial(p / p.sum(), n, replacement=True, generator=gen)
    return torch.tensor(sizes)[idx.cpu()]


def _patch_mask(b: int, h: int, w: int, py: int, px: int, ratios: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``b x 1 x h x w`` masks with ``round(ratio * n_patches)`` of the ``py x px`` patches set to 1."""
    gh, gw = -(-h // py), -(-w // px)  # ceil: a partial patch at the border is cropped
    n = gh * gw
    scores = torch.rand(b, n, generator=gen, device=gen.device)
    ranks = scores.argsort(1).argsort(1)  # a uniform random permutation per sample
    k = torch.round(ratios * n).long().unsqueeze(1)
    grid = (ranks < k).float().view(b, 1, gh, gw)
    return grid.repeat_interleave(py, 2).repeat_interleave(px, 3)[:, :, :h, :w]


def sample_patch_masks(
    batch: int,
    latent_hw: tuple[int, int],
    gen: torch.Generator,
    ratio_range: tuple[float, float] = (0.0, 0.4),
    patch_sizes: Sequence[int] = (1, 2, 4, 8),
    patch_size_probs: Optional[Sequence[float]] = None,
    per: str = "batch",
    size_gen: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random masks before brain restriction, on ``gen.device``.

    Returns ``(masks B x 1 x h x w, ratios B, patch_sizes B x 2)``; ``per`` = ``"batch"``
    draws one ``(p_y, p_x)`` for the whole batch, ``"sample"`` one per sample.
    """
    h, w = latent_hw
    lo, hi = ratio_range
    size_gen = gen if size_gen is None else size_gen
    ratios = lo + (hi - lo) * torch.rand(batch, generator=gen, dtype=torch.float64, device=gen.device)
    if per not in ("batch", "sample"):
        raise ValueError(f"patch_size_per must be 'batch' or 'sample', got {per!r}")
    n_draws = 1 if per == "batch" else batch
    py = _draw_sizes(n_draws, patch_sizes, patch_size_probs, size_gen).expand(batch)
    px = _draw_sizes(n_draws, patch_sizes, patch_size_probs, size_gen).expand(batch)
    if per == "batch":
        masks = _patch_mask(batch, h, w, int(py[0]), int(px[0]), ratios, gen)
    else:
        masks = torch.empty(batch, 1, h, w, device=gen.device)
        for i in range(batch):
            masks[i : i + 1] = _patch_mask(1, h, w, int(py[i]), int(px[i]), ratios[i : i + 1], gen)
    return masks, ratios.float(), torch.stack([py, px], 1)


def latent_brain_mask(brain: torch.Tensor, latent_hw: tuple[int, int], threshold: float = 0.5) -> torch.Tensor:
    """Paper rule: the brain mask on the latent grid (area fraction >= ``threshold``); ``B x 1 x h x w``."""
    frac = F.adaptive_avg_pool2d(brain.float().unsqueeze(1), latent_hw)
    return (frac >= threshold).float()


def block_brain_mask(brain: torch.Tensor, latent_hw: tuple[int, int], block: int = 2, min_fraction: float = 0.9) -> torch.Tensor:
    """Authors' code rule: latent blocks of ``block x block`` cells (16 x 16 px at f8) whose
    pixels are < ``min_fraction`` brain are never noised; ``B x 1 x h x w``."""
    h, w = latent_hw
    gh, gw = -(-h // block), -(-w // block)
    frac = F.adaptive_avg_pool2d(brain.float().unsqueeze(1), (gh, gw))
    keep = (frac >= min_fraction).float()
    return keep.repeat_interleave(block, 2).repeat_interleave(block, 3)[:, :, :h, :w]


def restrict_to_brain(masks: torch.Tensor, brain: torch.Tensor, rule: str, threshold: float, block: int, min_fraction: float) -> torch.Tensor:
    """Multiply the random masks by the brain restriction named ``rule``."""
    hw = (masks.shape[-2], masks.shape[-1])
    if rule == "none":
        return masks
    if rule == "latent_mask":
        allowed = latent_brain_mask(brain, hw, threshold)
    elif rule == "block16_90pct":
        allowed = block_brain_mask(brain, hw, block, min_fraction)
    else:
        raise ValueError(f"brain_restriction must be latent_mask, block16_90pct or none, got {rule!r}")
    return masks * allowed.to(masks.device)
