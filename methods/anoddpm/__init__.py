"""AnoDDPM (Wyatt et al., CVPR Workshops 2022): a DDPM trained and sampled with simplex noise.

Simplex noise (octaves 6, persistence 0.8, frequency 64) replaces the Gaussian noise
everywhere: in training (the network predicts the simplex noise that was added), in the
partial noising to ``t_start`` = 250 of T = 1000, and in every ancestral step of the
reverse chain. Map = ``|x - x_hat|`` (channel mean, data units).

Departures from the authors' code (Julian-Wyatt/AnoDDPM):

* the backbone and schedule are the suite's shared ones (MONAI UNet of THOR/ci-ber,
  linear betas, "fixed_small" posterior variance), as DESIGN.md fixes for all pixel
  diffusion baselines; the authors use their own guided-diffusion UNet and the
  "fixed_large" variance.
* the simplex noise is our batched torch implementation (``methods.common.simplex``):
  independent noise per sample (the authors repeat one noise image over the batch),
  Gustavson 3D simplex instead of OpenSimplex, normalised to zero mean / unit variance.
* the authors clamp x_t to [-1, 1] before predicting x0; we clip the x0 prediction
  instead (``clip_denoised``), as the DDPM references do.
* ``quick``: small UNet, T = 100 with t_start 25, internal 64 x 64, simplex frequency
  scaled with the resolution (32 at 64 x 64).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from methods.base import inference_field
from methods.common.diffusion import QUICK_BACKBONE, TINY_BACKBONE, PixelDiffusionConfig, PixelDiffusionMethod
from methods.common.simplex import simplex_noise_like
from methods.registry import register_method


@dataclass
class AnoDDPMConfig(PixelDiffusionConfig):
    t_start: int = inference_field(250)
    simplex_octaves: int = 6
    simplex_persistence: float = 0.8
    simplex_frequency: float = 64.0  # period (pixels at the internal resolution) of the coarsest octave


@register_method("anoddpm")
class AnoDDPM(PixelDiffusionMethod):
    """Simplex-noise DDPM: partial simplex noising to t_start, simplex reverse chain, residual map."""

    Config = AnoDDPMConfig
    config: AnoDDPMConfig
    profiles = {
        "paper": {},
        "quick": {**QUICK_BACKBONE, "t_start": 25, "simplex_frequency": 32.0},
        "tiny": {**TINY_BACKBONE, "t_start": 3, "simplex_frequency": 8.0},
    }

    def simplex(self, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        c = self.config
        return simplex_noise_like(
            like, generator, octaves=c.simplex_octaves, persistence=c.simplex_persistence, frequency=c.simplex_frequency
        )

    def training_noise(self, x0: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return self.simplex(x0, generator)

    def restore(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        t = int(self.config.t_start)
        x_t = self.noise_to(x, t, self.simplex(x, generator))
        return self.reverse_chain(x_t, t, 0, generator, noise_fn=self.simplex)
