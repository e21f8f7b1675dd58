"""Batched multi-scale simplex noise in pure torch (AnoDDPM's noise, computed on the GPU).

AnoDDPM (Wyatt et al., CVPRW 2022) replaces the Gaussian noise of the DDPM by layered
("fractal") simplex noise: octave ``o`` samples 3D simplex noise at pixel coordinates
divided by ``frequency / 2**o`` (so ``frequency`` = 64 is the period in pixels of the
coarsest octave and each later octave is twice as fine) with amplitude
``persistence**o``; the third coordinate is a slice through the 3D noise. The published
setting is 6 octaves, persistence 0.8, frequency 64.

What we do differently from the authors' numba code (a per-call CPU loop, one noise image
repeated over the whole batch, the diffusion timestep as third coordinate):

* every sample and channel gets its own noise: its own permutation table drawn from a
  ``torch.Generator`` plus a random offset in all three coordinates;
* everything is vectorised over a tensor of coordinates, so a batch of noise costs a
  few gathers on whatever device the output lives on;
* we use Gustavson's classic 3D simplex noise (radius^2 0.6, 12 edge gradients) rather
  than the OpenSimplex variant the authors vendored; the two differ in raw scale.

Matching the authors' fields. The authors feed the raw octave sum of OpenSimplex noise to
the forward process (Julian-Wyatt/AnoDDPM ``simplex.py``, ``rand_3d_fixed_T_octaves``:
3D, one fixed z; FinnBehrendt/patched-Diffusion-Models-UAD ``src/utils/generate_noise.py``:
2D). Two measured facts about their fields at 128 x 128, octaves 6, persistence 0.8,
frequency 64 (``tests/fixtures/parity``, generated from their code):

* spectrum: OpenSimplex at ``frequency`` f has the radial power spectrum of our
  Gustavson field at period 2 f (band shares within 0.010 for the 3D field, 0.027 for the
  2D one), so :func:`simplex_field` uses period ``AUTHORS_PERIOD_SCALE * frequency``;
* amplitude: the fields are not unit-variance: mean per-image std 0.49 (AnoDDPM, 3D)
  and 0.575 (pDDPM, 2D), against 0.650 for our raw field at period 128.

``amplitude="authors"`` (the default of AnoDDPM and pDDPM) scales our raw octave sum,
per-image offset included, to the named reference's std; ``amplitude="unit"`` normalises
each noise image to zero mean and unit variance, the variance the Gaussian forward
process assumes.
"""

from __future__ import annotations

import torch

from methods.common.noise import per_slice

#: Our period per unit of the authors' OpenSimplex ``frequency`` (same spectrum; module docstring).
AUTHORS_PERIOD_SCALE = 2.0
#: Mean per-image std of the authors' raw fields at 128 x 128 / octaves 6 / persistence 0.8 /
#: frequency 64 (two sets of 64 fields each, from their code: 0.496 and 0.478; 0.580 and 0.567).
AUTHORS_STD = {"anoddpm": 0.49, "pddpm": 0.575}
#: Mean per-image std of our raw field at the same setting and period 128 (256 fields).
OURS_RAW_STD = 0.650
AMPLITUDES = ("authors", "unit")

_F3 = 1.0 / 3.0
_G3 = 1.0 / 6.0
# the 12 edge midpoints of a cube: Gustavson's gradient set for 3D simplex noise
_GRAD3 = torch.tensor(
    [[1, 1, 0], [-1, 1, 0], [1, -1, 0], [-1, -1, 0],
     [1, 0, 1], [-1, 0, 1], [1, 0, -1], [-1, 0, -1],
     [0, 1, 1], [0, -1, 1], [0, 1, -1], [0, -1, -1]],
    dtype=torch.float32,
)  # fmt: skip


def random_permutations(n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` independent permutation tables of 0..255, doubled to length 512 (``n x 512`` long)."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    keys = torch.rand(n, 256, generator=generator, device=gen_device)
    perm = keys.argsort(dim=1).to(device)
    return torch.cat([perm, perm], dim=1)


def simplex3d(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Simplex noise in about [-1, 1] at coordinates ``x, y, z`` (each ``n x P``), one table per row.

    ``perm`` is ``n x 512`` (see ``random_permutations``); row ``i`` of the output uses
    table ``i``. All arithmetic is elementwise or ``gather``, so it runs on any device.
    """
    s = (x + y + z) * _F3
    i, j, k = torch.floor(x + s), torch.floor(y + s), torch.floor(z + s)
    t0 = (i + j + k) * _G3
    x0, y0, z0 = x - (i - t0), y - (j - t0), z - (k - t0)

    # which of the six tetrahedra of the skewed cube holds the point: the corner offsets
    # follow from the ordering of x0, y0, z0 (vectorised form of Gustavson's if-ladder)
    i1 = ((x0 >= y0) & (x0 >= z0)).to(x.dtype)
    j1 = ((y0 > x0) & (y0 >= z0)).to(x.dtype)
    k1 = ((z0 > x0) & (z0 > y0)).to(x.dtype)
    i2 = ((x0 >= y0) | (x0 >= z0)).to(x.dtype)
    j2 = ((y0 > x0) | (y0 >= z0)).to(x.dtype)
    k2 = ((z0 > x0) | (z0 > y0)).to(x.dtype)

    ii = torch.remainder(i, 256).long()
    jj = torch.remainder(j, 256).long()
    kk = torch.remainder(k, 256).long()
    grad = _GRAD3.to(device=x.device, dtype=x.dtype)

    def corner(di: torch.Tensor | float, dj: torch.Tensor | float, dk: torch.Tensor | float, offset: float) -> torch.Tensor:
        dx, dy, dz = x0 - di + offset, y0 - dj + offset, z0 - dk + offset
        ci = ii + torch.as_tensor(di, device=x.device).long()
        cj = jj + torch.as_tensor(dj, device=x.device).long()
        ck = kk + torch.as_tensor(dk, device=x.device).long()
        h = torch.gather(perm, 1, ck)
        h = torch.gather(perm, 1, cj + h)
        h = torch.gather(perm, 1, ci + h) % 12
        g = grad[h]  # n x P x 3
        falloff = (0.6 - dx * dx - dy * dy - dz * dz).clamp(min=0)
        return falloff**4 * (g[..., 0] * dx + g[..., 1] * dy + g[..., 2] * dz)

    total = corner(0.0, 0.0, 0.0, 0.0) + corner(i1, j1, k1, _G3) + corner(i2, j2, k2, 2 * _G3) + corner(1.0, 1.0, 1.0, 3 * _G3)
    return 32.0 * total


def simplex_noise(
    shape: tuple[int, ...] | torch.Size,
    octaves: int = 6,
    persistence: float = 0.8,
    frequency: float = 64.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    normalise: bool = True,
) -> torch.Tensor:
    """Independent multi-scale simplex noise for every sample and channel of ``shape`` = ``B x C x H x W``.

    Octave ``o`` (``0 .. octaves-1``) has period ``frequency / 2**o`` pixels and amplitude
    ``persistence**o``. With ``normalise`` each ``H x W`` noise image is shifted and scaled
    to zero mean and unit standard deviation. Reproducible for a seeded ``generator``
    (the permutation tables and offsets are drawn from it, on its device).
    """
    if len(shape) != 4:
        raise ValueError(f"shape must be B x C x H x W, got {tuple(shape)}")
    if octaves < 1:
        raise ValueError(f"octaves must be >= 1, got {octaves}")
    b, c, h, w = (int(s) for s in shape)
    n = b * c
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    perm = random_permutations(n, generator, device)
    # random offsets: a different region (and 3D slice) of the noise field per image
    offsets = (torch.rand(n, 3, generator=generator, device=gen_device, dtype=torch.float64) * 256.0).to(device)

    ys = torch.arange(h, device=device, dtype=torch.float64)
    xs = torch.arange(w, device=device, dtype=torch.float64)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    gx, gy = gx.reshape(1, -1), gy.reshape(1, -1)

    noise = torch.zeros(n, h * w, device=device, dtype=torch.float32)
    amplitude, period = 1.0, float(frequency)
    for _ in range(octaves):
        # float64 coordinates: large offsets / periods would otherwise lose fractional precision
        px = (gx / period + offsets[:, 0:1]).float()
        py = (gy / period + offsets[:, 1:2]).float()
        pz = offsets[:, 2:3].float().expand_as(px)
        noise += amplitude * simplex3d(px, py, pz, perm)
        period /= 2.0
        amplitude *= persistence
    if normalise:
        noise = noise - noise.mean(dim=1, keepdim=True)
        noise = noise / noise.std(dim=1, keepdim=True).clamp(min=1e-8)
    return noise.view(b, c, h, w).to(dtype)


def simplex_noise_like(x: torch.Tensor, generator: torch.Generator | None = None, **kwargs) -> torch.Tensor:
    """``simplex_noise`` with the shape, device and dtype of ``x``."""
    return simplex_noise(x.shape, generator=generator, device=x.device, dtype=x.dtype, **kwargs)


def simplex_field(
    like: torch.Tensor,
    generator=None,
    octaves: int = 6,
    persistence: float = 0.8,
    frequency: float = 64.0,
    amplitude: str = "authors",
    reference: str = "anoddpm",
) -> torch.Tensor:
    """The authors' noise like ``like``: their spectrum at ``frequency``, their (``"authors"``,
    of ``reference``: ``anoddpm`` or ``pddpm``) or unit (``"unit"``) amplitude.

    ``generator`` may be one generator or per-slice ``SliceGenerators`` (one field per slice).
    """
    if amplitude not in AMPLITUDES:
        raise ValueError(f"simplex amplitude must be one of {AMPLITUDES}, got {amplitude!r}")
    if reference not in AUTHORS_STD:
        raise ValueError(f"simplex reference must be one of {sorted(AUTHORS_STD)}, got {reference!r}")
    unit = amplitude == "unit"
    gain = AUTHORS_STD[reference] / OURS_RAW_STD
    period = AUTHORS_PERIOD_SCALE * float(frequency)

    def draw(x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        noise = simplex_noise_like(x, g, octaves=octaves, persistence=persistence, frequency=period, normalise=unit)
        return noise if unit else noise * gain

    return per_slice(draw, like, generator)
