"""THOR: implicit anomaly guidance in diffusion models (Bercea et al., MICCAI 2024).

A plain DDPM (epsilon, L2, T = 1000 linear betas; training shared with the other pixel
baselines) restores the input from Gaussian noise at ``t_start`` = 350 and, at the
harmonisation steps 300, 150 and 50, pulls the chain back towards the input wherever the
input looks healthy:

1. the step map ``m_t = norm( clip(G_sigma * P(x0_hat, x), 0, 1) * |x0_hat - x| )``, with
   ``P`` the spatial perceptual distance (LPIPS, or the SSIM substitute, see
   ``methods.common.perceptual``), ``G_sigma`` a Gaussian (sigma 2 px), the residual in
   data units and ``norm`` the division by the per-image maximum (then clip to [0, 1]);
2. the soft mask ``M = clip((dilate_k(close_k(m_t)) + m_t) / 2, 0, 1)``, grey morphology with
   k x k squares, k = 13;
3. the blend ``x0_blend = M x0_hat + (1 - M) x`` is re-noised with the *same* noise drawn
   at the start to the chain's next level, and the chain continues.

The anomaly map is the pixel-wise harmonic mean of the step maps. As in the authors'
code, step maps are taken at every ``map_every`` = 50th step from ``t_start`` down to 0
(their hidden ``t_visualization`` default) plus the harmonisation steps, not only at
the three harmonisation steps; ``map_every=0`` uses only the harmonisation steps.

Departures from the authors' code (ci-ber/THOR_DDPM ``model_zoo/ddpm.py``):

* **range fix**: the authors blend in [-1, 1] and then ``torch.clamp(x0_blend, 0, 1)``,
  which sends every dark pixel (the whole background, data < 0.5) to mid grey before
  re-noising. Here the blend is a convex combination of x0_hat (clipped to the model
  range by ``clip_denoised``) and the input, so it stays in the data's real range and is
  never clamped.
* LPIPS is fed the model-range images once (the authors pass ``2x - 1`` *and*
  ``normalize=True``, so LPIPS sees [-3, 1]); without local LPIPS weights the documented
  SSIM substitute is used and ``notes["perceptual"]`` says which.
* re-noising after the harmonisation at step t goes to the level the chain is at (index
  t - 1 in ``methods.common.schedules``'s convention); the authors re-noise to t and then
  denoise with the t - 1 network input (off by one step).
* everything is batched torch on the scoring device (no scipy round trips), the final
  ``clip(0, 0.999)`` is dropped (maps are already in [0, 1]), and scoring noise comes
  from per-slice generators seeded by (``config.seed``, slice index).
* units: the model range is the training set's range (``data_range``), see
  ``methods.ddpm``; the training (one network shared with DDPM and AutoDDPM) is THOR's
  own config, see ``methods.common.diffusion``.
* ``quick``: small UNet, T = 100 respaced from 1000 with every timestep scaled by
  ``scale_timestep`` (t_start 34, harmonisation 29/14/4; maps every 5 steps, which only
  approximates the scaled 50-step grid), internal 64 x 64, morphology kernel 7 and
  smoothing sigma 1 (scaled with the resolution), 60 epochs shared with DDPM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from methods.base import ConfigError, inference_field
from methods.common.diffusion import QUICK_SHARED_DDPM, TINY_BACKBONE, PixelDiffusionConfig, PixelDiffusionMethod, gaussian_noise
from methods.common.perceptual import PerceptualConfig, PerceptualMixin, gaussian_blur
from methods.registry import register_method
from methods.thor.maps import harmonic_mean, normalise_per_image, soft_mask

__all__ = ["THOR", "THORConfig"]


@dataclass
class THORConfig(PixelDiffusionConfig, PerceptualConfig):
    t_start: int = inference_field(350)  # Gaussian noise level of the partial noising (of T = 1000)
    t_harmonization: tuple[int, ...] = inference_field((300, 150, 50))
    map_every: int = inference_field(50)  # step maps at every n-th step too (0 = harmonisation steps only)
    morph_kernel: int = inference_field(13)  # closing / dilation square, pixels at the internal size
    perceptual_sigma: float = inference_field(2.0)  # Gaussian smoothing of the perceptual map, pixels
    step_map_norm: str = inference_field("max")  # max (per image, authors) | none


@register_method("thor")
class THOR(PerceptualMixin, PixelDiffusionMethod):
    """DDPM restoration with perceptual-residual harmonisation; map = harmonic mean of step maps."""

    Config = THORConfig
    config: THORConfig
    training_family = "pixel-ddpm"
    profiles = {
        "paper": {},
        "quick": {
            **QUICK_SHARED_DDPM,
            "t_start": 34,
            "t_harmonization": (29, 14, 4),
            "map_every": 5,
            "morph_kernel": 7,
            "perceptual_sigma": 1.0,
        },
        "tiny": {
            **TINY_BACKBONE,
            "t_start": 4,
            "t_harmonization": (3, 2, 1),
            "map_every": 1,
            "morph_kernel": 3,
            "perceptual_sigma": 0.5,
            "ssim_scales": 1,
        },
    }

    # ------------------------------------------------------------------ construction
    def validate_config(self) -> None:
        super().validate_config()
        c = self.config
        if not 0 <= c.t_start < c.num_train_timesteps:
            raise ConfigError(f"t_start={c.t_start} must be in 0..{c.num_train_timesteps - 1}")
        bad = [t for t in c.t_harmonization if not 0 <= int(t) <= c.t_start]
        if bad:
            raise ConfigError(f"t_harmonization {bad} must lie in 0..t_start={c.t_start}")
        if c.morph_kernel < 1 or c.morph_kernel % 2 == 0:
            raise ConfigError(f"morph_kernel must be odd and >= 1, got {c.morph_kernel}")
        if c.step_map_norm not in ("max", "none"):
            raise ConfigError(f"step_map_norm must be 'max' or 'none', got {c.step_map_norm!r}")

    def _build(self) -> None:
        super()._build()
        self.perceptual_distance()  # resolve now so fit/load records name the distance

    def dry_run_steps_first(self) -> list[int]:
        """A dry run's two-step chain keeps the first harmonisation step (the branch that blends)."""
        return sorted((int(t) for t in self.config.t_harmonization), reverse=True)

    def map_steps(self) -> list[int]:
        """Steps whose map enters the harmonic mean (descending)."""
        c = self.config
        steps = {int(t) for t in c.t_harmonization}
        if c.map_every > 0:
            steps |= set(range(0, int(c.t_start) + 1, int(c.map_every)))
        return sorted((t for t in steps if t <= c.t_start), reverse=True)

    def score_evaluations(self) -> int:
        return len(self.chain_steps(int(self.config.t_start)))  # one chain t_start .. 0; harmonisation re-noises, no extra pass

    # ------------------------------------------------------------------ maps
    def step_map(self, x0_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """B x 1 x h x w map of one step (inputs in model space)."""
        c = self.config
        with torch.autocast(device_type=x.device.type, enabled=False):
            x0_hat, x = x0_hat.float(), x.float()
            perceptual = gaussian_blur(self.perceptual_distance()(x0_hat, x), c.perceptual_sigma).clamp(0.0, 1.0)
            residual = self.data_residual(x0_hat, x)
            return normalise_per_image(perceptual * residual, c.step_map_norm)

    def harmonise(self, x: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Run THOR's chain on ``x`` (model space); returns ``(x_hat, map B x 1 x h x w)``."""
        c = self.config
        t_start = int(c.t_start)
        harmonise_at = {int(t) for t in c.t_harmonization}
        map_at = set(self.map_steps())
        noise = gaussian_noise(x, generator)
        maps: list[torch.Tensor] = []

        def callback(t: int, x_prev: torch.Tensor, x0_hat: torch.Tensor) -> torch.Tensor | None:
            if t not in map_at:
                return None
            m = self.step_map(x0_hat, x)
            maps.append(m)
            if t not in harmonise_at:
                return None
            mask = soft_mask(m, c.morph_kernel).to(x.dtype)
            blend = mask * x0_hat + (1.0 - mask) * x  # convex: stays in the data's range, no clamp
            return self.noise_to(blend, t - 1, noise) if t > 0 else blend

        x_hat = self.reverse_chain(self.noise_to(x, t_start, noise), t_start, 0, generator, callback=callback)
        return x_hat, harmonic_mean(maps)

    # ------------------------------------------------------------------ scoring
    def restore(self, x: torch.Tensor, generator) -> torch.Tensor:
        return self.harmonise(x, generator)[0]

    def _score_batch(self, images: torch.Tensor, brain_masks: torch.Tensor) -> torch.Tensor:
        self.nfe = 0
        x = self.prepare(images)
        _, amap = self.harmonise(x, self.generator(x.shape[0]))
        return self.resize(amap[:, 0], tuple(images.shape[-2:]))
