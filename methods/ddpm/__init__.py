"""DDPM for anomaly detection (Wolleb et al. / Pinaya et al. style, as run in THOR's code base).

Noise the input to ``t_start`` = 350 of T = 1000 (linear betas 1e-4..0.02) with Gaussian
noise, run the full ancestral reverse chain back to clean data with an epsilon-predicting
UNet, and score ``|x - x_hat|`` (channel mean, data units).

Training (shared by DDPM, THOR and AutoDDPM: one checkpoint, see ``training_family``):
ci-ber/THOR_DDPM ``projects/thor/configs/brain/thor.yaml`` (Adam 1e-4, batch 16, L2,
1500 epochs of 464 IXI slices = 43,500 optimiser steps, validation every 50 epochs,
best-validation weights) and ``data/loaders/brain_loader.py`` (RandomAffine 10 deg /
0.1 / 0.9-1.1 and a horizontal flip); see ``methods.common.diffusion``.

Departures from the authors' code (ci-ber THOR_DDPM ``model_zoo/ddpm.py``):

* units: the network works on the training range mapped to [-1, 1] (``data_range``;
  the authors' ``2x - 1`` of slices divided by their maximum is ``data_range=(0, 1)``),
  and x0 predictions are clipped to that range, never to an assumed [0, 1] in data units.
* scoring noise is drawn per slice from a generator seeded by (``config.seed``, slice
  index), so a fitted model scores deterministically and independently of batching
  (the authors use the global RNG).
* the budget is counted in optimiser steps (43,500), not epochs of our data.
* ``quick`` profile: a smaller UNet (channels 32/64/64, attention only at the lowest level
  and the middle, because self-attention at 32x32 tokens dominates CPU time), T = 100
  respaced from 1000 with t_start 34 (same noise level as 350 of 1000), internal
  64 x 64, 60 epochs, no augmentation or validation. Same algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from methods.base import inference_field
from methods.common.diffusion import QUICK_SHARED_DDPM, TINY_BACKBONE, PixelDiffusionConfig, PixelDiffusionMethod, gaussian_noise
from methods.registry import register_method

@dataclass
class DDPMConfig(PixelDiffusionConfig):
    t_start: int = inference_field(350)  # noise level of the partial noising (of T = 1000)


@register_method("ddpm")
class DDPM(PixelDiffusionMethod):
    """Gaussian partial noising to t_start, full reverse chain, residual map."""

    Config = DDPMConfig
    config: DDPMConfig
    training_family = "pixel-ddpm"
    profiles = {"paper": {}, "quick": {**QUICK_SHARED_DDPM, "t_start": 34}, "tiny": {**TINY_BACKBONE, "t_start": 4}}

    def score_evaluations(self) -> int:
        return len(self.chain_steps(int(self.config.t_start)))  # steps t_start .. 0 (fewer in a dry run)

    def restore(self, x: torch.Tensor, generator) -> torch.Tensor:
        t = int(self.config.t_start)
        return self.reverse_chain(self.noise_to(x, t, gaussian_noise(x, generator)), t, 0, generator)
