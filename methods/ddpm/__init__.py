"""DDPM for anomaly detection (Wolleb et al. / Pinaya et al. style, as run in THOR's code base).

Noise the input to ``t_start`` = 350 of T = 1000 (linear betas 1e-4..0.02) with Gaussian
noise, run the full ancestral reverse chain back to clean data with an epsilon-predicting
UNet, and score ``|x - x_hat|`` (channel mean, data units).

Departures from the authors' code (ci-ber THOR_DDPM ``model_zoo/ddpm.py``):

* the network works on ``2x - 1`` (about [-1, 1]); the authors feed [0, 1] data to a
  scheduler that clips x0 predictions to [-1, 1], i.e. the clip never acts on the
  data's real range. Here the clip (``clip_denoised``) matches the model range.
* scoring noise is drawn from a generator seeded by ``config.seed`` per batch, so a
  fitted model scores deterministically (the authors use the global RNG).
* ``quick`` profile: a smaller UNet (channels 32/64/64, attention only at the lowest level
  and the middle, because self-attention at 32x32 tokens dominates CPU time), T = 100 with
  t_start scaled in proportion (35), internal 64 x 64, 60 epochs (with 15 the
  reconstructions do not beat a constant map on the embedded T1 data). Same algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from methods.base import inference_field
from methods.common.diffusion import QUICK_BACKBONE, TINY_BACKBONE, PixelDiffusionConfig, PixelDiffusionMethod
from methods.registry import register_method

@dataclass
class DDPMConfig(PixelDiffusionConfig):
    t_start: int = inference_field(350)  # noise level of the partial noising (of T = 1000)


@register_method("ddpm")
class DDPM(PixelDiffusionMethod):
    """Gaussian partial noising to t_start, full reverse chain, residual map."""

    Config = DDPMConfig
    config: DDPMConfig
    profiles = {"paper": {}, "quick": {**QUICK_BACKBONE, "t_start": 35, "epochs": 60}, "tiny": {**TINY_BACKBONE, "t_start": 4}}

    def restore(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        t = int(self.config.t_start)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return self.reverse_chain(self.noise_to(x, t, noise), t, 0, generator)
