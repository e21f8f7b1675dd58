"""Variety for a one-subject data set: slice geometry, elastic warps, bias, noise, contrast.

One template is one brain, so every slice gets its own random geometry (axial position,
small tilt, rotation, anisotropic scale, shift and a smooth elastic warp) and its own
acquisition effects (multiplicative bias field, Rician noise, gamma jitter). The geometry
is one coordinate map that samples every channel of the anatomy stack, so the images,
tissue maps and brain mask of a slice stay aligned, and lesions are drawn afterwards on
the sampled grid, so their masks are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import math

import numpy as np
from scipy import ndimage as ndi

from datasets.embedded import stable_math
from datasets.embedded.anatomy import CHANNELS, Anatomy


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random draws (documented in docs/embedded-data.md)."""

    max_rotation_deg: float = 10.0
    scale_range: tuple[float, float] = (0.92, 1.08)  # isotropic zoom
    anisotropy: float = 0.04  # extra +- per axis
    max_shift_mm: float = 5.0
    max_tilt: float = 0.05  # z change (mm) per in-plane mm: about +-3 degrees
    elastic_grid: int = 6  # control points per side of the elastic field
    elastic_std_mm: float = 2.5
    bias_grid: int = 3
    bias_std: float = 0.10  # std of log bias at the control points
    noise_range: tuple[float, float] = (0.01, 0.03)  # Rician sigma relative to GM level
    gamma_log_std: float = 0.08
    percentiles: tuple[float, float] = (1.0, 99.0)


def smooth_field(rng: np.random.Generator, size: int, grid: int, std: float) -> np.ndarray:
    """A smooth random field: Gaussian values on a coarse grid, cubic-upsampled to size^2."""
    coarse = rng.normal(0.0, std, (grid, grid))
    return ndi.zoom(coarse, size / grid, order=3, mode="nearest", grid_mode=True)[:size, :size]


def sample_coordinates(rng: np.random.Generator, anatomy: Anatomy, z: float, cfg: AugmentConfig) -> np.ndarray:
    """Coordinates (3 x R x R: stack z index, row mm, col mm) of every output pixel.

    Output pixels are placed on the canvas (pixel centres, S/R canvas pixels apart), then
    mapped through a random rotation + anisotropic scale about the canvas centre, shifted,
    displaced by a smooth elastic field, and assigned a z that varies linearly across the
    plane (a tilted cut).
    """
    res, side = anatomy.resolution, anatomy.canvas
    step = side / res
    centre = (side - 1) / 2.0
    grid = (np.arange(res) + 0.5) * step - 0.5 - centre
    rows, cols = np.meshgrid(grid, grid, indexing="ij")

    angle = np.deg2rad(rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg))
    zoom = rng.uniform(*cfg.scale_range) * (1.0 + rng.uniform(-cfg.anisotropy, cfg.anisotropy, 2))
    shift = rng.uniform(-cfg.max_shift_mm, cfg.max_shift_mm, 2)
    tilt = rng.uniform(-cfg.max_tilt, cfg.max_tilt, 2)
    elastic = np.stack([smooth_field(rng, res, cfg.elastic_grid, cfg.elastic_std_mm) for _ in range(2)])

    # inverse mapping output -> source: a zoom > 1 magnifies the brain
    cos, sin = math.cos(angle), math.sin(angle)  # scalar libm, not a NumPy SIMD kernel
    src_r = (cos * rows - sin * cols) / zoom[0]
    src_c = (sin * rows + cos * cols) / zoom[1]
    src_r = src_r + centre + shift[0] + elastic[0]
    src_c = src_c + centre + shift[1] + elastic[1]
    src_z = (z - anatomy.z_offset) + tilt[0] * rows + tilt[1] * cols
    return np.stack([src_z, src_r, src_c])


def sample_channels(anatomy: Anatomy, coords: np.ndarray) -> dict[str, np.ndarray]:
    """Trilinear lookup of every anatomy channel at ``coords`` (zero outside the stack).

    ``coords`` are (z index, row mm, col mm) on the canvas; in-plane mm become stack
    indices: subtract the crop origin, then a pooled pixel ``i`` covers mm
    ``[i f, (i + 1) f)`` and is centred at ``i f + (f - 1) / 2``.
    """
    f = anatomy.spacing
    rows = (coords[1] - anatomy.origin[0] - (f - 1) / 2.0) / f
    cols = (coords[2] - anatomy.origin[1] - (f - 1) / 2.0) / f
    coords = np.stack([coords[0], rows, cols])
    return {
        name: ndi.map_coordinates(anatomy.stack[i], coords, order=1, mode="constant", cval=0.0, prefilter=False)
        for i, name in enumerate(CHANNELS)
    }


def bias_field(rng: np.random.Generator, size: int, cfg: AugmentConfig) -> np.ndarray:
    """Smooth multiplicative intensity inhomogeneity with mean about 1."""
    return stable_math.exp(smooth_field(rng, size, cfg.bias_grid, cfg.bias_std)).astype(np.float32)


def rician_noise(rng: np.random.Generator, image: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of a complex signal with Gaussian noise in both channels (Rician)."""
    real = image + rng.normal(0.0, sigma, image.shape)
    imag = rng.normal(0.0, sigma, image.shape)
    return np.sqrt(real * real + imag * imag).astype(np.float32)


def normalise(image: np.ndarray, brain: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """Map the brain's 1st..99th percentile to [0, 1], clip, and set the background to 0."""
    inside = image[brain > 0]
    if inside.size == 0:
        return np.zeros_like(image, dtype=np.float32)
    lo, hi = np.percentile(inside, percentiles)
    scaled = (image - lo) / max(hi - lo, 1e-6)
    return (np.clip(scaled, 0.0, 1.0) * (brain > 0)).astype(np.float32)


def gamma_jitter(rng: np.random.Generator, image: np.ndarray, cfg: AugmentConfig) -> np.ndarray:
    """Contrast jitter: x -> x ** gamma on the normalised image (keeps 0, 1 and the order)."""
    gamma = float(stable_math.exp(rng.normal(0.0, cfg.gamma_log_std)))
    return stable_math.power(image, gamma).astype(np.float32)
