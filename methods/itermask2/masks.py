"""IterMask2's spatial masks: the training sampler, the threshold tau and the shrinking loop.

Training masks follow ``datasets/brats2021.py`` of ZiyunLiang/IterMask2. On the authors'
240 x 240 slice grid, a 2-D Gaussian is centred on a random brain pixel with variances
U(0.3, 10) and a correlation of random sign; in two cases of three it lives on a grid of
0.1 units per pixel (a broad cloud of many 4-px squares), in one of three on 0.4 units per
pixel (a tight cloud of fewer squares). Square corners are drawn from the brain pixels
with probability proportional to the Gaussian, the row and the column independently (as
the authors do), then ``n4`` squares of 4 px, U{5..9} of 8 px and U{3..9} of 16 px are cut
out. The mask is then area-resized to the working resolution with the slice, so its
edges are fractional, and restricted to the brain.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MaskSamplerConfig:
    grid_size: int = 240  # the authors' native slice grid; masks are drawn there, then resized
    square_sizes: tuple[int, int, int] = (4, 8, 16)  # px on that grid


def sample_square_cover(brain: np.ndarray, rng: np.random.Generator, square_sizes: tuple[int, int, int] = (4, 8, 16)) -> np.ndarray:
    """One training mask on the grid of ``brain`` (bool ``G x G``): float32, 1 = masked."""
    g_h, g_w = brain.shape
    rows, cols = np.nonzero(brain)
    cover = np.zeros((g_h, g_w), np.float32)
    if rows.size == 0:
        return cover
    broad = rng.integers(0, 3) < 2  # random.randint(0, 2) in {0, 1}: broad cloud
    c11, c22 = rng.uniform(0.3, 10.0, 2)
    s = float(np.sqrt(c11 * c22))
    c12 = rng.uniform(0.0, s) * (1.0 if rng.integers(0, 2) else -1.0)
    centre = rng.integers(rows.size)
    spacing = 0.1 if broad else 0.4  # Gaussian units per pixel (mgrid steps .1 over +-12 / .4 over +-48)
    n_small = int(rng.integers(int(s * 100), int(s * 200))) if broad else int(rng.integers(int(s * 5), int(s * 20)))
    counts = (n_small, int(rng.integers(5, 10)), int(rng.integers(3, 10)))
    d = np.stack([rows - rows[centre], cols - cols[centre]], axis=1) * spacing
    cov = np.array([[c11, c12], [c12, c22]])
    inv = np.linalg.pinv(cov)  # pinv: a correlation of exactly +-1 stays finite
    weight = np.exp(-0.5 * np.einsum("ni,ij,nj->n", d, inv, d))
    p = weight / weight.sum()
    n = sum(counts)
    top = rows[rng.choice(rows.size, n, p=p)]
    left = cols[rng.choice(rows.size, n, p=p)]  # drawn independently of the row, as in the authors' code
    side = np.repeat(np.asarray(square_sizes), counts)
    # Paint all squares at once: +-1 at the corners of each, then two cumulative sums.
    pad = max(square_sizes)
    acc = np.zeros((g_h + pad + 1, g_w + pad + 1), np.int32)
    np.add.at(acc, (top, left), 1)
    np.add.at(acc, (top + side, left), -1)
    np.add.at(acc, (top, left + side), -1)
    np.add.at(acc, (top + side, left + side), 1)
    cover[:] = acc.cumsum(0).cumsum(1)[:g_h, :g_w] > 0
    return cover


def sample_training_masks(brains: torch.Tensor, size: tuple[int, int], rng: np.random.Generator, config: MaskSamplerConfig = MaskSamplerConfig()) -> torch.Tensor:
    """Masks ``B x 1 x H x W`` in [0, 1] (1 = replaced by noise) for brain masks ``B x H x W`` at ``size``.

    The brains are brought to the authors' grid (nearest), masks drawn there, area-resized
    to ``size`` and multiplied by the brain at ``size``.
    """
    grid = (config.grid_size, config.grid_size)
    brains = brains.float()
    on_grid = F.interpolate(brains[:, None].cpu(), size=grid, mode="nearest")[:, 0].numpy() > 0.5
    covers = np.stack([sample_square_cover(b, rng, config.square_sizes) for b in on_grid])
    covers_t = F.interpolate(torch.from_numpy(covers)[:, None], size=size, mode="area")
    brain_small = brains if tuple(brains.shape[-2:]) == tuple(size) else F.interpolate(brains[:, None], size=size, mode="nearest")[:, 0]
    return covers_t.to(brains.device) * (brain_small[:, None] > 0.5)


def masked_error_threshold(errors: torch.Tensor, masks: torch.Tensor, percentile: float = 80.0) -> float:
    """tau: the authors' ``kthvalue(error * mask, N - (1 - q) * sum(mask))`` over all pixels.

    With binary masks this is the ``percentile``-th (lower) percentile of the error over the
    masked pixels; fractional mask edges weigh their pixels as the authors' code does.
    """
    products = (errors.double() * masks.double()).flatten()
    n = products.numel()
    k = int(n - (1.0 - percentile / 100.0) * float(masks.double().sum()))
    k = min(max(k, 1), n)
    return float(torch.kthvalue(products, k).values)


def top_fraction_mask(errors: torch.Tensor, brain: torch.Tensor, fraction: float) -> torch.Tensor:
    """Per image (``B x 1 x H x W``): the brain pixels above the authors' per-image kth value.

    ``k = H * W - fraction * |brain|`` over the whole image (background errors are zero),
    so about the top ``fraction`` of the brain by error is kept.
    """
    b = errors.shape[0]
    flat = (errors * brain).reshape(b, -1)
    n = flat.shape[1]
    k = (n - fraction * brain.reshape(b, -1).sum(1)).long().clamp(1, n)
    thresholds = torch.stack([torch.kthvalue(flat[i], int(k[i])).values for i in range(b)])
    return ((flat > thresholds[:, None]).float() * brain.reshape(b, -1)).reshape(errors.shape)
