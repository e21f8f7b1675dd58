"""DDPM noise schedules and the closed-form steps the diffusion baselines share.

Index convention (the diffusers / MONAI one): timesteps run ``0 .. T-1``;
``q_sample(x0, t)`` gives the sample at index ``t`` (which has already received
``t + 1`` noising steps), and ``posterior_step`` at index ``t`` moves to index
``t - 1``, where index ``-1`` is clean data (``alphas_cumprod[-1] := 1``). So "noise to
t = 350 and run the full reverse chain" takes 351 network evaluations, exactly as
MONAI's / diffusers' ``step`` loop over ``range(350, -1, -1)`` does.

The betas are the ones of diffusers' ``DDPMScheduler`` (``linear`` and
``squaredcos_cap_v2``; ``tests/test_diffusion_common.py`` checks equality). The steps are
our own few lines instead of ``DDPMScheduler.step``, because the baselines need things
the scheduler does not offer batched: a timestep per sample, an x0 prediction from any
parameterisation, and a caller-supplied noise (simplex noise for AnoDDPM, a fixed noise
for THOR's re-noising). Variance is "fixed_small" (the posterior variance), the
default of both MONAI and diffusers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

PredictionType = Literal["epsilon", "sample"]


@dataclass
class NoiseSchedule:
    """Betas and derived quantities (computed in float64, stored as float32 tensors)."""

    betas: torch.Tensor  # T
    alphas: torch.Tensor  # T
    alphas_cumprod: torch.Tensor  # T
    alphas_cumprod_prev: torch.Tensor  # T, with alphas_cumprod_prev[0] = 1
    posterior_variance: torch.Tensor  # T, beta_t (1 - abar_{t-1}) / (1 - abar_t)
    posterior_mean_coef1: torch.Tensor  # T, multiplies x0
    posterior_mean_coef2: torch.Tensor  # T, multiplies x_t
    kind: str = "linear"

    @property
    def T(self) -> int:
        return int(self.betas.shape[0])

    def to(self, device: torch.device | str) -> "NoiseSchedule":
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()}
        return NoiseSchedule(**moved)

    # -------------------------------------------------------------- indexing helper
    def _at(self, values: torch.Tensor, t: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``values[t]`` shaped to broadcast against ``like`` (B x ...); ``t`` an int or a (B,) tensor."""
        values = values.to(like.device)
        if isinstance(t, int) or (isinstance(t, torch.Tensor) and t.ndim == 0):
            out = values[int(t)].expand(like.shape[0])
        else:
            out = values[t.to(like.device).long()]
        return out.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def check_t(self, t: int | torch.Tensor) -> None:
        tt = torch.as_tensor(t)
        if tt.numel() and (int(tt.min()) < 0 or int(tt.max()) >= self.T):
            raise ValueError(f"timestep(s) {t} outside 0..{self.T - 1}")

    # -------------------------------------------------------------- closed forms
    def q_sample(self, x0: torch.Tensor, t: int | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample of q(x_t | x0): ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``."""
        abar = self._at(self.alphas_cumprod, t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def predict_x0(self, x_t: torch.Tensor, t: int | torch.Tensor, model_output: torch.Tensor, prediction_type: PredictionType) -> torch.Tensor:
        if prediction_type == "sample":
            return model_output
        if prediction_type == "epsilon":
            abar = self._at(self.alphas_cumprod, t, x_t)
            return (x_t - (1 - abar).sqrt() * model_output) / abar.sqrt()
        raise ValueError(f"prediction_type must be 'epsilon' or 'sample', got {prediction_type!r}")

    def predict_eps(self, x_t: torch.Tensor, t: int | torch.Tensor, model_output: torch.Tensor, prediction_type: PredictionType) -> torch.Tensor:
        if prediction_type == "epsilon":
            return model_output
        if prediction_type == "sample":
            abar = self._at(self.alphas_cumprod, t, x_t)
            return (x_t - abar.sqrt() * model_output) / (1 - abar).sqrt()
        raise ValueError(f"prediction_type must be 'epsilon' or 'sample', got {prediction_type!r}")

    def posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """Mean of q(x_{t-1} | x_t, x0)."""
        return self._at(self.posterior_mean_coef1, t, x_t) * x0 + self._at(self.posterior_mean_coef2, t, x_t) * x_t

    def posterior_step(self, x0_pred: torch.Tensor, x_t: torch.Tensor, t: int | torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """DDPM ancestral step from index t to t - 1: posterior mean + sigma_t * noise (no noise at t = 0)."""
        mean = self.posterior_mean(x0_pred, x_t, t)
        if noise is None:
            return mean
        sigma = self._at(self.posterior_variance, t, x_t).clamp(min=0).sqrt()  # exactly 0 at t = 0
        return mean + sigma * noise


def _betas(kind: str, num_steps: int, beta_start: float, beta_end: float) -> np.ndarray:
    if kind == "linear":
        # diffusers builds this in float32; we do the same so the betas agree bit for bit
        return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float32).double().numpy()
    if kind == "cosine":
        # Nichol & Dhariwal 2021 (diffusers "squaredcos_cap_v2"), s = 0.008, betas capped at 0.999
        def abar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array([min(1 - abar((i + 1) / num_steps) / abar(i / num_steps), 0.999) for i in range(num_steps)], dtype=np.float64)
    raise ValueError(f"schedule kind must be 'linear' or 'cosine', got {kind!r}")


def respaced_betas(base_betas: np.ndarray, num_steps: int) -> np.ndarray:
    """Betas of a ``num_steps`` schedule that keeps every k-th ``alphas_cumprod`` of ``base_betas``.

    Improved-DDPM's respacing (Nichol & Dhariwal 2021, ``space_timesteps``): index ``i``
    of the short schedule has the noise level of index ``round((i + 1) * T_base / T) - 1``
    of the long one, the index ``scale_timestep`` maps to.
    """
    base_abar = np.cumprod(1.0 - np.asarray(base_betas, dtype=np.float64))
    t_base = len(base_abar)
    if not 1 <= num_steps <= t_base:
        raise ValueError(f"cannot respace a {t_base}-step schedule to {num_steps} steps")
    keep = [int(round((i + 1) * t_base / num_steps)) - 1 for i in range(num_steps)]
    abar = base_abar[keep]
    return 1.0 - abar / np.append(1.0, abar[:-1])


def make_schedule(
    kind: str = "linear", num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, respace_from: int | None = None
) -> NoiseSchedule:
    """Linear betas ``beta_start..beta_end`` or the cosine schedule, ``num_steps`` long.

    With ``respace_from`` = T_base, the schedule is the ``num_steps``-step respacing of the
    T_base-step one (see ``respaced_betas``): the quick profiles' T = 100 keeps the noise
    levels of the published T = 1000.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if respace_from is not None and respace_from != num_steps:
        betas = respaced_betas(_betas(kind, int(respace_from), beta_start, beta_end), num_steps)
    else:
        betas = _betas(kind, num_steps, beta_start, beta_end)
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    coef1 = betas * np.sqrt(abar_prev) / (1.0 - abar)
    coef2 = (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar)

    def f32(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(a, dtype=np.float64)).float()

    return NoiseSchedule(
        betas=f32(betas),
        alphas=f32(alphas),
        alphas_cumprod=f32(abar),
        alphas_cumprod_prev=f32(abar_prev),
        posterior_variance=f32(post_var),
        posterior_mean_coef1=f32(coef1),
        posterior_mean_coef2=f32(coef2),
        kind=kind,
    )


def scale_timestep(t_paper: int, T_paper: int, T: int) -> int:
    """The index of a T-step schedule that has received the same fraction of noising steps.

    Index ``t`` has received ``t + 1`` steps (see the module docstring), so the fraction is
    ``(t + 1) / T``: ``round((t_paper + 1) * T / T_paper) - 1`` (350 of 1000 -> 34 of 100).
    """
    if not 0 <= t_paper < T_paper:
        raise ValueError(f"t_paper={t_paper} must be in 0..{T_paper - 1}")
    return max(0, int(round((t_paper + 1) * T / T_paper)) - 1)
