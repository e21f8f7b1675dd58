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

Visited timesteps with ``K`` DDIM steps out of ``T`` (``ddim_timesteps``), ending at
``abar_0 = 1`` where the update is ``z0~`` itself:

* ``"official"`` (default): the authors' respacing (farzad-bz/MAD-AD,
  ``diffusion_x0/respace.py``, ``space_timesteps(T, "ddimK")``): the smallest integer
  stride ``s`` with ``len(range(0, T, s)) == K`` keeps the 0-based indices
  ``0, s, 2s, ..``, i.e. our ``t = 1, 1 + s, ..``. For T = 10: K = 10 visits 10, 9, .., 1;
  K = 5 visits 9, 7, 5, 3, 1; K = 2 visits 6, 1. Their loop tries strides 1 .. T-1 and so
  fails for K = 1; we let the same rule take stride T (K = 1 visits t = 1). K values no
  integer stride produces (6 .. 9 for T = 10) are an error, as in their code.
* ``"even"``: ``round(T (K - k) / K)`` for ``k = 0 .. K-1``, starting at ``T`` (K = 5: 10, 8,
  6, 4, 2; K = 2: 10, 5; K = 1: 10); defined for every K.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


SPACINGS = ("official", "even")


def ddim_timesteps(T: int, steps: int, spacing: str = "official") -> list[int]:
    """Visited timesteps ``t`` in ``1 .. T``, descending (see module doc)."""
    if not 1 <= steps <= T:
        raise ValueError(f"ddim_steps must be in 1..{T}, got {steps}")
    if spacing == "even":
        return [int(round(T * (steps - k) / steps)) for k in range(steps)]
    if spacing != "official":
        raise ValueError(f"ddim_spacing must be one of {SPACINGS}, got {spacing!r}")
    for stride in range(1, T + 1):
        kept = range(0, T, stride)  # 0-based indices of the authors' code = t - 1
        if len(kept) == steps:
            return [i + 1 for i in reversed(kept)]
    raise ValueError(
        f"ddim_spacing 'official' cannot make {steps} steps out of {T} with an integer stride "
        "(the authors' respacing rule); choose another ddim_steps or ddim_spacing 'even'"
    )


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
    spacing: str = "official",
) -> MaskedDDIMOutput:
    """Run the masked reverse process from ``z_T``.

    ``denoiser(z_t, t_index)`` returns ``(z0_hat, mask_logits)`` with ``t_index = t - 1``.
    ``noise`` is ``steps x B x C x h x w`` (needed only when ``eta > 0``), drawn by the caller
    so that scoring is reproducible. The state ``z`` stays in ``z_T``'s dtype (float32 in
    the method) whatever the denoiser returns: under bf16 autocast only the network runs in
    bf16, so cells outside the mask keep their exact values.
    """
    T = abar.shape[0] - 1
    ts = ddim_timesteps(T, steps, spacing)
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
