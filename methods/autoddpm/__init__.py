"""AutoDDPM: automatic masking, stitching and resampling (Bercea et al., ICML 2023).

A plain DDPM (epsilon, L2, T = 1000 linear betas; training shared with the other pixel
baselines) is used three times at test time:

1. **coarse**: Gaussian noise to ``t_recon`` = 200, full reverse chain -> ``x_rec``; the
   coarse map ``c = P(x, x_rec) * clip(r / q95(r), 0, 1)`` with ``r = |x - x_rec|`` (data
   units) normalised by its per-image 95th percentile and ``P`` the spatial perceptual
   distance (LPIPS or the SSIM substitute, ``methods.common.perceptual``);
2. **mask**: ``c > mask_threshold`` (0.13; a negative value uses each image's 95th
   percentile of ``c``, the authors' fallback), dilated with a 3 x 3 square;
3. **stitch and resample**: the stitched image (the input where the mask is 0, ``x_rec``
   where it is 1) is noised to ``t_inpaint`` = 50 and restored with RePaint: at every
   step the unknown (masked) region comes from the model's ancestral step and the known
   region is the input noised to the same level with fresh noise; each step is
   resampled ``resample_steps`` = 5 times (jump back one step by re-noising with
   ``beta_t``, denoise again).

Map = ``|x - x_inpainted| * c`` (channel mean, data units). Network evaluations per slice:
``(t_recon + 1) + (t_inpaint + 1) * resample_steps``.

Departures from the authors' code (ci-ber/autoDDPM ``model_zoo/ddpm.py``):

* the resampling chain starts from the *stitched* image, as the paper
  describe; the authors' code noises the whole coarse reconstruction ``x_rec`` instead
  (``inpaint_start="coarse"`` reproduces that);
* the resampling jump from level t - 1 back to t uses ``beta_t``; the authors use
  ``beta_{t-1}`` (one step off). Their loop also skips the network at t = 0 and keeps the
  previous prediction; here the chain takes its last step to clean data like every
  other chain of the suite (``methods.common.schedules``' index convention);
* LPIPS is fed model-range images once (the authors pass ``2x - 1`` with
  ``normalize=True``: [-3, 1]); without local LPIPS weights the documented SSIM
  substitute is used and ``notes["perceptual"]`` says which;
* the 95th-percentile normalisation adds 1e-8 (a perfect reconstruction divides by 0 in
  theirs); no ``clamp(0, 1)`` of the inpainted image (data keep their real range);
* batched torch throughout, scoring noise from per-slice generators seeded by
  (``config.seed``, slice index).
* training: the network is the one DDPM and THOR train (THOR's config: 1500 epochs of
  464 slices = 43,500 steps, see ``methods.common.diffusion``), so the three share one
  checkpoint; the authors' AutoDDPM config (ci-ber/GenAI_UAD
  ``projects/24_normative_eval/configs/autoddpm.yaml``) trains 999 epochs at batch 16:
  ``max_steps=28971`` (999 x 29 steps over the same 464 slices) trains AutoDDPM its own
  network with that budget.
* units: the model range is the training set's range (``data_range``), see ``methods.ddpm``.
* ``quick``: small UNet, T = 100 respaced from 1000 with t_recon 19 and t_inpaint 4
  (``scale_timestep`` of 200 and 50), internal 64 x 64, 60 epochs shared with DDPM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from methods.base import DRY_RUN_STEPS, ConfigError, inference_field
from methods.common.diffusion import QUICK_SHARED_DDPM, TINY_BACKBONE, PixelDiffusionConfig, PixelDiffusionMethod, gaussian_noise
from methods.common.perceptual import PerceptualConfig, PerceptualMixin
from methods.registry import register_method

__all__ = ["AutoDDPM", "AutoDDPMConfig", "binary_mask", "dilate", "per_image_quantile"]


def per_image_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """``q``-quantile of each image of ``x`` (B x ...), linear interpolation as numpy's default; B x 1 x 1 x 1.

    Sort-based: ``torch.quantile`` refuses inputs beyond 2**24 elements (large GPU batches).
    """
    flat = x.flatten(1).float().sort(dim=1).values
    pos = q * (flat.shape[1] - 1)
    lo, frac = int(pos), pos - int(pos)
    hi = min(lo + 1, flat.shape[1] - 1)
    return (flat[:, lo] * (1 - frac) + flat[:, hi] * frac).view(-1, 1, 1, 1)


def dilate(mask: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Binary dilation with a k x k square (outside the image counts as background, as cv2.dilate)."""
    if k <= 1:
        return mask
    return F.max_pool2d(mask, k, stride=1, padding=k // 2)


def binary_mask(coarse_map: torch.Tensor, threshold: float, dilation: int = 3) -> torch.Tensor:
    """``coarse_map > threshold`` (per-image 95th percentile if threshold < 0), dilated; float 0/1, B x 1 x H x W."""
    if threshold >= 0:
        thr = torch.full((coarse_map.shape[0], 1, 1, 1), float(threshold), device=coarse_map.device)
    else:
        thr = per_image_quantile(coarse_map, 0.95).clamp(0, 1)
    return dilate((coarse_map > thr).to(coarse_map.dtype), dilation)


@dataclass
class AutoDDPMConfig(PixelDiffusionConfig, PerceptualConfig):
    t_recon: int = inference_field(200)  # noise level of the coarse reconstruction (of T = 1000)
    t_inpaint: int = inference_field(50)  # noise level the stitched image is resampled from
    resample_steps: int = inference_field(5)  # RePaint resamplings per step
    mask_threshold: float = inference_field(0.13)  # < 0: per-image 95th percentile of the coarse map
    mask_dilation: int = inference_field(3)  # square kernel of the mask dilation
    residual_quantile: float = inference_field(0.95)  # per-image normalisation of the coarse residual
    inpaint_start: str = inference_field("stitch")  # stitch (paper) | coarse (authors' code)


@register_method("autoddpm")
class AutoDDPM(PerceptualMixin, PixelDiffusionMethod):
    """Coarse DDPM restoration -> perceptual-residual mask -> stitch -> RePaint resampling."""

    Config = AutoDDPMConfig
    config: AutoDDPMConfig
    training_family = "pixel-ddpm"
    profiles = {
        "paper": {},
        "quick": {**QUICK_SHARED_DDPM, "t_recon": 19, "t_inpaint": 4},
        "tiny": {**TINY_BACKBONE, "t_recon": 2, "t_inpaint": 1, "resample_steps": 2, "ssim_scales": 1},
    }

    def validate_config(self) -> None:
        super().validate_config()
        c = self.config
        for name in ("t_recon", "t_inpaint"):
            if not 0 <= getattr(c, name) < c.num_train_timesteps:
                raise ConfigError(f"{name}={getattr(c, name)} must be in 0..{c.num_train_timesteps - 1}")
        if c.resample_steps < 1:
            raise ConfigError(f"resample_steps must be >= 1, got {c.resample_steps}")
        if c.inpaint_start not in ("stitch", "coarse"):
            raise ConfigError(f"inpaint_start must be 'stitch' or 'coarse', got {c.inpaint_start!r}")
        if not 0 < c.residual_quantile <= 1:
            raise ConfigError(f"residual_quantile must be in (0, 1], got {c.residual_quantile}")

    def _build(self) -> None:
        super()._build()
        self.perceptual_distance()

    @classmethod
    def dry_run_overrides(cls, config) -> dict:
        """The pixel-DDPM dry run, and at most two RePaint resamplings per step (the jump back runs)."""
        return {**super().dry_run_overrides(config), "resample_steps": min(int(config.resample_steps), DRY_RUN_STEPS)}

    def score_evaluations(self) -> int:
        c = self.config  # coarse chain t_recon .. 0, then RePaint t_inpaint .. 0 with resample_steps passes per step
        return len(self.chain_steps(int(c.t_recon))) + len(self.chain_steps(int(c.t_inpaint))) * int(c.resample_steps)

    # ------------------------------------------------------------------ stages
    def coarse(self, x: torch.Tensor, generator) -> torch.Tensor:
        t = int(self.config.t_recon)
        return self.reverse_chain(self.noise_to(x, t, gaussian_noise(x, generator)), t, 0, generator)

    def coarse_map(self, x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
        """``P(x, x_rec) * clip(r / q(r), 0, 1)``, B x 1 x h x w (inputs in model space)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            x, x_rec = x.float(), x_rec.float()
            r = self.data_residual(x, x_rec)
            q = per_image_quantile(r, float(self.config.residual_quantile))
            r = (r / (q + 1e-8)).clamp(0.0, 1.0)
            return self.perceptual_distance()(x, x_rec) * r

    def repaint(
        self,
        known: torch.Tensor,
        start: torch.Tensor,
        mask: torch.Tensor,
        generator,
        on_step: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """RePaint from ``start`` noised to ``t_inpaint``: ``mask`` = 1 is generated, 0 is kept from ``known``.

        ``on_step(t, u, x_prev, known_prev)`` sees every stitched sample (tests use it).
        """
        c = self.config
        t0, sched = int(c.t_inpaint), self.schedule
        mask = mask.to(known.dtype)
        x_t = self.noise_to(start, t0, gaussian_noise(known, generator))
        for t in self.chain_steps(t0, 0):  # t0, ..., 0 (a dry run: t0 and 0)
            for u in range(int(c.resample_steps)):
                x_prev, _ = self.reverse_step(x_t, t, generator)
                if t > 0:  # the known region at level t - 1, with fresh noise
                    known_prev = sched.q_sample(known, t - 1, gaussian_noise(known, generator))
                else:
                    known_prev = known
                x_prev = mask * x_prev + (1.0 - mask) * known_prev
                if on_step is not None:
                    on_step(t, u, x_prev, known_prev)
                if u < c.resample_steps - 1:  # jump back to level t: q(x_t | x_{t-1})
                    beta = sched.betas[t].to(known.device, known.dtype)
                    x_t = (1.0 - beta).sqrt() * x_prev + beta.sqrt() * gaussian_noise(known, generator)
                else:
                    x_t = x_prev
        return x_t

    def detect(self, x: torch.Tensor, generator) -> dict[str, torch.Tensor]:
        """All stages on ``x`` (model space): coarse, map, mask, stitch, inpainted, anomaly map."""
        c = self.config
        x_rec = self.coarse(x, generator)
        cmap = self.coarse_map(x, x_rec)
        mask = binary_mask(cmap, c.mask_threshold, c.mask_dilation).to(x.dtype)
        stitch = mask * x_rec + (1.0 - mask) * x
        inpainted = self.repaint(x, stitch if c.inpaint_start == "stitch" else x_rec, mask, generator)
        residual = self.data_residual(x.float(), inpainted.float())
        return {"coarse": x_rec, "coarse_map": cmap, "mask": mask, "stitch": stitch, "inpainted": inpainted, "map": residual * cmap}

    # ------------------------------------------------------------------ scoring
    def restore(self, x: torch.Tensor, generator) -> torch.Tensor:
        return self.detect(x, generator)["inpainted"]

    def _score_batch(self, images: torch.Tensor, brain_masks: torch.Tensor) -> torch.Tensor:
        self.nfe = 0
        x = self.prepare(images)
        out = self.detect(x, self.generator(x.shape[0]))
        return self.resize(out["map"][:, 0], tuple(images.shape[-2:]))
