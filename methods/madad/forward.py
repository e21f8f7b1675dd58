"""The masked forward process of MAD-AD (eq. 2) and its noise schedule.

Index convention (the paper's): ``t = 0 .. T``; ``abar[0] = 1`` is clean data and
``abar[t] = prod_{i <= t} alpha_i``. Training draws ``t`` uniformly from ``1 .. T``; the
network sees ``t - 1`` (``0 .. T-1``), as the authors' code feeds indices 0..9.

Schedules for T = 10:

* ``cosine`` (default of every profile): ``squaredcos_cap_v2`` for T steps (Nichol &
  Dhariwal), what the authors' code runs (farzad-bz/MAD-AD, ``diffusion_x0/__init__.py``:
  ``create_diffusion(noise_schedule="squaredcos_cap_v2", diffusion_steps=10)``; the
  "linear noise schedule" comment in ``train-MAD-AD.py`` is stale). The paper names none.
* ``linear`` (an option): the DDPM linear betas for T = 10 (1e-4 .. 0.02) would barely noise anything, and the
  guided-diffusion rescaling (betas 0.01 .. 2.0) is invalid, so we use the DDPM 1000-step
  linear schedule respaced to T steps: ``abar[t] = abar_1000[t * 1000 / T]``.
"""

from __future__ import annotations

import math

import torch


def alphas_cumprod(kind: str, T: int) -> torch.Tensor:
    """``abar[0..T]`` (float64, ``abar[0] = 1``)."""
    if kind == "linear":
        betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
        abar_1000 = torch.cumprod(1.0 - betas, 0)
        idx = torch.tensor([round(t * 1000 / T) - 1 for t in range(1, T + 1)])
        abar = abar_1000[idx]
    elif kind == "cosine":
        f = lambda s: math.cos((s / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = torch.tensor([min(1 - f(t) / f(t - 1), 0.999) for t in range(1, T + 1)], dtype=torch.float64)
        abar = torch.cumprod(1.0 - betas, 0)
    else:
        raise ValueError(f"schedule must be 'linear' or 'cosine', got {kind!r}")
    return torch.cat([torch.ones(1, dtype=torch.float64), abar])


def _at(abar: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return abar.to(like.device)[t.to(like.device).long()].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def masked_q_sample(z0: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """Eq. 2: ``(sqrt(abar_t) z0 + sqrt(1 - abar_t) eps) * M + z0 * (1 - M)``.

    ``mask`` is ``B x 1 x h x w`` (1 = noised) and broadcasts over latent channels. Written
    with ``torch.where`` so unmasked latents are bit-for-bit ``z0``.
    """
    a = _at(abar, t, z0)
    noised = a.sqrt() * z0 + (1 - a).sqrt() * noise
    return torch.where(mask.bool().expand_as(z0), noised, z0)
