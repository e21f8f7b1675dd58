"""Masked DDIM inference of MAD-AD (eqs. 6 and 7).

Starting from ``z_T = E(x)`` (no forward noising), each step

1. runs the denoiser: ``z0~ = f_z0(z_t, t)`` and mask logits ``f_M(z_t, t)``;
2. binarises the mask: ``B = sigmoid(logits) > threshold`` (re-predicted every step);
3. eq. 7: ``eps~ = (z_t - sqrt(abar_t) z0~) / sqrt(1 - abar_t)``;
4. eq. 6 inside the mask, ``z_t`` kept outside it::

       z_{t-1} = B * (sqrt(abar_prev) z0~ + sqrt(1 - abar_prev - sigma_t^2) eps~ + sigma_t eps')
               + (1 - B) * z_t

``sigma`` (the config value, paper 0.5) is DDIM's eta:
``sigma_t = sigma * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev)``,
so 0 is deterministic DDIM and 1 is DDPM-like, as the paper describes. Eq. 6 as printed
writes ``sqrt(1 - abar_prev)`` for the direction term; we use DDIM's
``sqrt(1 - abar_prev - sigma_t^2)`` (Song et al. eq. 12, and the authors' code), which
keeps the marginal variance right; the two agree at ``sigma = 0``.

With ``K`` DDIM steps out of ``T`` the visited timesteps are ``round(T (K - k) / K)`` for
``k = 0 .. K-1`` (K = 10: 10, 9, .., 1; K = 5: 10, 8, .., 2; K = 2: 10, 5), ending at
``abar_0 = 1`` where the update is ``z0~`` itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def ddim_timesteps(T: int, steps: int) -> list[int]:
    """Visited timesteps, descending from ``T`` (see module doc)."""
    if not 1 <= steps <= T:
        raise ValueError(f"ddim_steps must be in 1..{T}, got {steps}")
    return [int(round(T * (steps - k) / steps)) for k in range(steps)]


def ddim_sigma(abar_t: float, abar_prev: float, eta: float) -> float:
    if eta == 0.0:
        return 0.0
    return eta * math.sqrt((1 - abar_prev) / (1 - abar_t)) * math.sqrt(1 - abar_t / abar_prev)


def masked_ddim_step(
    z_t: torch.Tensor,
    z0_hat: torch.Tensor,
    mask: torch.Tensor,
    abar_t: float,
    abar_prev: float,
    eta: float,
    noise: Optional[torch.Tensor],
) -> torch.Tensor:
    """One step of eq. 6; ``mask`` is binary ``B x 1 x h x w`` (1 = update)."""
    eps = (z_t - math.sqrt(abar_t) * z0_hat) / math.sqrt(1 - abar_t)  # eq. 7
    sigma = ddim_sigma(abar_t, abar_prev, eta)
    update = math.sqrt(abar_prev) * z0_hat + math.sqrt(max(1 - abar_prev - sigma**2, 0.0)) * eps
    if sigma > 0:
        if noise is None:
            raise ValueError("sigma > 0 needs noise")
        update = update + sigma * noise
    return torch.where(mask.bool().expand_as(z_t), update, z_t)


@dataclass
class MaskedDDIMOutput:
    z0: torch.Tensor  # the corrected latent z0~ (B x C x h x w)
    mean_mask: torch.Tensor  # mean predicted mask probability over the steps (B x 1 x h x w)
    last_mask: torch.Tensor  # binarised mask of the last step


def masked_ddim(
    denoiser: Denoiser,
    z_T: torch.Tensor,
    abar: torch.Tensor,
    steps: int,
    eta: float,
    threshold: float,
    noise: Optional[torch.Tensor] = None,
) -> MaskedDDIMOutput:
    """Run the masked reverse process from ``z_T``.

    ``denoiser(z_t, t_index)`` returns ``(z0_hat, mask_logits)`` with ``t_index = t - 1``.
    ``noise`` is ``steps x B x C x h x w`` (needed only when ``eta > 0``), drawn by the caller
    so that scoring is reproducible.
    """
    T = abar.shape[0] - 1
    ts = ddim_timesteps(T, steps)
    z = z_T
    prob_sum = torch.zeros_like(z_T[:, :1], dtype=torch.float32)
    binary = torch.zeros_like(prob_sum)
    for k, t in enumerate(ts):
        t_prev = ts[k + 1] if k + 1 < len(ts) else 0
        t_index = torch.full((z.shape[0],), t - 1, device=z.device, dtype=torch.long)
        z0_hat, logits = denoiser(z, t_index)
        prob = torch.sigmoid(logits.float())
        binary = (prob > threshold).to(z.dtype)
        prob_sum += prob
        step_noise = None if noise is None else noise[k]
        z = masked_ddim_step(z, z0_hat.to(z.dtype), binary, float(abar[t]), float(abar[t_prev]), eta, step_noise)
    return MaskedDDIMOutput(z0=z, mean_mask=prob_sum / len(ts), last_mask=binary)
