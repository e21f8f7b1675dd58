"""The DAE's noise, foreground and map post-processing, as batched torch operations.

Settings follow AntanasKascenas/DenoisingAE, src/denoising.py (``noise``, ``get_scores``,
``loss_f``) and src/utilities.py (``median_pool``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def upsample_grid(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of ``B x C x r x r`` grid noise with ``align_corners=True``.

    The authors call ``F.upsample_bilinear``, which is bilinear with aligned corners: the
    grid's corner nodes land exactly on the image's corner pixels.
    """
    return F.interpolate(grid, size=size, mode="bilinear", align_corners=True)


def draw_coarse_noise(
    batch: int, std: torch.Tensor, size: tuple[int, int], grid: int, generator: torch.Generator
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Coarse noise ``B x C x H x W`` and the cyclic shift applied to it.

    Per image and channel, ``N(0, std_c^2)`` is drawn on a ``grid x grid`` lattice and
    upsampled to ``size``; the whole batch is then rolled by ONE random shift (rows, cols),
    each uniform over the image size, so the grid does not sit at a fixed place.
    """
    if grid < 1:
        raise ValueError(f"coarse noise: the grid side must be >= 1, got {grid}")
    channels = std.numel()
    lattice = torch.randn(batch, channels, grid, grid, generator=generator) * std.detach().cpu().float().view(1, channels, 1, 1)
    shift = (int(torch.randint(size[0], (1,), generator=generator)), int(torch.randint(size[1], (1,), generator=generator)))
    noise = torch.roll(upsample_grid(lattice, size), shifts=shift, dims=(-2, -1))
    return noise, shift


def add_coarse_noise(
    x: torch.Tensor, foreground: torch.Tensor, std: torch.Tensor, grid: int, generator: torch.Generator
) -> torch.Tensor:
    """``x + noise * foreground``: the noise is added only inside the foreground (``B x 1 x H x W``)."""
    noise, _ = draw_coarse_noise(x.shape[0], std, tuple(x.shape[-2:]), grid, generator)
    return x + noise.to(x.device, x.dtype) * foreground.to(x.dtype)


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
    """Squared error on the foreground, averaged over ALL ``B x C x H x W`` elements.

    As the authors' ``loss_f``: background pixels count in the denominator with zero error.
    """
    return ((prediction - target).pow(2) * foreground.to(prediction.dtype)).mean()


def erode_foreground(foreground: torch.Tensor, kernel: int = 5, keep: float = 0.95) -> torch.Tensor:
    """Keep a pixel when more than ``keep`` of its ``kernel x kernel`` window is foreground.

    The authors' rule: average pooling with zero padding (pixels beyond the image count as
    background) and ``> 0.95``; with a 5 x 5 window a pixel survives with at most one
    background pixel around it (24/25 = 0.96), an erosion by about 2 px.
    Input and output are ``B x 1 x H x W``; the output is float 0/1.
    """
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"erosion: kernel must be a positive odd number, got {kernel}")
    share = F.avg_pool2d(foreground.float(), kernel_size=kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    return (share > keep).float()


def median_filter(x: torch.Tensor, kernel: int = 5) -> torch.Tensor:
    """``kernel x kernel`` median of ``B x C x H x W`` maps, reflect padding (as ``median_pool``).

    Torch's ``reflect`` mirrors without repeating the edge pixel (scipy's ``mirror``).
    Built from ``unfold`` so it runs on any device.
    """
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"median filter: kernel must be a positive odd number, got {kernel}")
    if kernel == 1:
        return x
    pad = kernel // 2
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    windows = padded.unfold(2, kernel, 1).unfold(3, kernel, 1)  # B x C x H x W x k x k
    return windows.reshape(*windows.shape[:4], -1).median(dim=-1).values


def unit_ratio(images: np.ndarray, brain_masks: np.ndarray, max_slices: int = 2048) -> np.ndarray:
    """Per channel: the 99th over the 90th percentile of the brain voxels of ``images``.

    Converts a value in the authors' units (volume / brain 99th percentile) into S2's
    (volume / brain 90th percentile): ``ours = theirs * p99 / p90``. Estimated on up to
    ``max_slices`` evenly spaced slices, pooling their brain voxels.
    """
    n = images.shape[0]
    index = np.unique(np.linspace(0, n - 1, num=min(n, max_slices)).round().astype(np.int64))
    data = np.asarray(images[index], dtype=np.float32)
    brain = np.asarray(brain_masks[index]) > 0
    if not brain.any():
        raise ValueError("DAE: the training slices have no brain pixels; cannot convert the noise std to data units")
    ratios = []
    for c in range(data.shape[1]):
        values = data[:, c][brain]
        p90, p99 = np.percentile(values, [90.0, 99.0])
        if not p90 > 0:
            raise ValueError(f"DAE: channel {c} has a non-positive brain 90th percentile ({p90:g}); cannot convert the noise std")
        ratios.append(float(p99 / p90))
    return np.asarray(ratios, dtype=np.float64)
