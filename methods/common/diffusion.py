"""The pixel-space DDPM machinery shared by DDPM, AnoDDPM, pDDPM, AutoDDPM and THOR.

``PixelDiffusionMethod`` trains one UNet (``backbone.build_unet``) as a DDPM and offers
the pieces the baselines assemble at test time: partial noising (``noise_to``), a reverse
chain from any ``t_start`` (``reverse_chain``; MONAI's ``DiffusionInferer.sample`` always
runs the whole chain), a single ancestral step (``reverse_step``) and a one-pass x0
prediction (``denoise_one_pass``). A subclass writes ``restore`` (pseudo-healthy image)
or overrides ``_score_batch``, plus its config defaults.

Units. Data arrive as the prepared sets store them (the embedded set and the protocols'
normalisations put brain intensities in about [0, 1]). The network works on
``2 * x - 1`` (about [-1, 1], the range DDPMs are trained for and the range the x0 clip
``clip_denoised`` refers to) at ``image_size`` x ``image_size`` pixels. Every helper
below takes and returns tensors in this *model space*; ``prepare`` goes there from data,
``to_data`` comes back, and ``residual_map`` returns maps in *data* units
(``|x - x_hat|`` of the data, channel mean), resampled to the input resolution.

Resolution. When the data are not ``image_size`` square, inputs are resampled (bilinear,
antialiased) to ``image_size`` and maps are computed there and resampled back
(bilinear); ``image_size=None`` keeps the data's own resolution.

Timesteps follow ``schedules``: index ``t`` in ``0..T-1``, ``reverse_chain(x, t_start)``
runs steps ``t_start, ..., 0`` (``t_start + 1`` network evaluations) and returns clean
data. ``self.nfe`` counts network evaluations per scored slice for the benchmarks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from methods.base import ConfigError, MethodConfig, UADMethod, inference_field
from methods.common.backbone import backbone_kwargs, build_unet
from methods.common.schedules import NoiseSchedule, make_schedule
from methods.progress import progress_bar

if TYPE_CHECKING:  # pragma: no cover
    from datasets.format import SliceSet

#: ``noise_fn(like, generator) -> noise`` with the shape, device and dtype of ``like``.
NoiseFn = Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]


def gaussian_noise(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


#: Profile overrides shared by the pixel diffusion baselines (each method adds its scaled
#: timesteps). ``quick``: the same algorithms on 2 CPU cores in minutes: a small UNet
#: (self-attention only at the lowest level and the middle, because attention over 32 x 32
#: tokens dominates CPU time), internal 64 x 64, few epochs with a larger Adam step (5e-4),
#: and T = 100 with the linear betas scaled by 1000 / T (1e-3..0.2, the improved-DDPM /
#: AnoDDPM convention), so that a timestep scaled in proportion (350 -> 35) keeps the
#: noise level: alphas_cumprod 0.28 at t = 350 of 1000 and 0.27 at t = 35 of 100.
#: (Unscaled betas would leave 88 % of the signal at t = 35, and the method would not
#: remove lesions.) The cosine schedule needs no scaling.
QUICK_BACKBONE: dict = {
    "channels": (32, 64, 64),
    "attention_levels": (False, False, True),
    "num_head_channels": 32,
    "norm_num_groups": 16,
    "num_train_timesteps": 100,
    "beta_start": 1e-3,
    "beta_end": 0.2,
    "lr": 5e-4,
    "image_size": 64,
    "batch_size": 32,
    "epochs": 15,
}
#: ``tiny``: seconds, for the conformance and unit tests only (T = 10, 16 x 16).
TINY_BACKBONE: dict = {
    "channels": (8, 16),
    "attention_levels": (False, True),
    "num_head_channels": 8,
    "norm_num_groups": 8,
    "num_train_timesteps": 10,
    "image_size": 16,
    "batch_size": 4,
    "epochs": 2,
    "progress": False,
}


@dataclass
class PixelDiffusionConfig(MethodConfig):
    """A pixel-space DDPM on the THOR/ci-ber backbone (defaults: the published THOR setting)."""

    # backbone (names as in backbone.build_unet)
    channels: tuple[int, ...] = (128, 256, 256)
    attention_levels: tuple[bool, ...] = (False, True, True)
    num_res_blocks: int = 1
    num_head_channels: int = 256
    norm_num_groups: int = 32
    # diffusion
    schedule: str = "linear"  # linear | cosine
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: str = "epsilon"  # epsilon | sample (x0)
    # training (THOR config: Adam 1e-4, batch 16, 1500 epochs, L2)
    loss: str = "l2"  # l2 | l1
    lr: float = 1e-4
    batch_size: int = 16
    epochs: int = 1500
    image_size: int | None = 128  # internal resolution; None = the data's own
    # scoring
    clip_denoised: bool = inference_field(True)  # clip x0 predictions to the model range [-1, 1]
    progress: bool = inference_field(True)  # tqdm bars in fit


class PixelDiffusionMethod(UADMethod):
    """Base class: DDPM training loop, partial noising and reverse chains in pixel space."""

    Config = PixelDiffusionConfig
    config: PixelDiffusionConfig
    #: sampling noise is drawn per batch from a generator seeded by ``config.seed``, so the
    #: maps are deterministic for a fixed batch size but depend on how slices are batched
    batch_invariant = False

    def __init__(self, config: PixelDiffusionConfig | None = None, **overrides) -> None:
        super().__init__(config, **overrides)
        self.model: nn.Module | None = None
        self._schedule: NoiseSchedule | None = None
        self.nfe = 0  # network evaluations in the last _score_batch call, per slice

    # ------------------------------------------------------------------ construction
    def validate_config(self) -> None:
        c = self.config
        if c.prediction_type not in ("epsilon", "sample"):
            raise ConfigError(f"prediction_type must be 'epsilon' or 'sample', got {c.prediction_type!r}")
        if c.loss not in ("l1", "l2"):
            raise ConfigError(f"loss must be 'l1' or 'l2', got {c.loss!r}")
        if c.schedule not in ("linear", "cosine"):
            raise ConfigError(f"schedule must be 'linear' or 'cosine', got {c.schedule!r}")
        if c.image_size is not None and c.image_size % (2 ** (len(c.channels) - 1)):
            raise ConfigError(f"image_size={c.image_size} must be divisible by {2 ** (len(c.channels) - 1)} for {len(c.channels)} UNet levels")

    def networks(self) -> dict[str, nn.Module]:
        return {"unet": self.model} if self.model is not None else {}

    def _build(self) -> None:
        self.validate_config()
        if self.input_shape_ is None:
            raise RuntimeError("input_shape_ must be set before _build")
        c_in = int(self.input_shape_[0])
        self.model = build_unet(in_channels=c_in, out_channels=c_in, **backbone_kwargs(self.config)).to(self.device)
        self.model.eval()
        self.notes.setdefault("internal_resolution", self.internal_size)
        self.notes.setdefault("model_range", "2*x-1 (data [0,1] -> [-1,1]); maps in data units")

    @property
    def schedule(self) -> NoiseSchedule:
        if self._schedule is None:
            c = self.config
            self._schedule = make_schedule(c.schedule, c.num_train_timesteps, c.beta_start, c.beta_end).to(self.device)
        return self._schedule

    @property
    def T(self) -> int:
        return int(self.config.num_train_timesteps)

    @property
    def internal_size(self) -> tuple[int, int]:
        if self.config.image_size is not None:
            return (int(self.config.image_size), int(self.config.image_size))
        if self.input_shape_ is None:
            raise RuntimeError("internal size unknown before fit/load")
        return (int(self.input_shape_[1]), int(self.input_shape_[2]))

    # ------------------------------------------------------------------ units & resolution
    @staticmethod
    def to_model(x: torch.Tensor) -> torch.Tensor:
        return x * 2.0 - 1.0

    @staticmethod
    def to_data(y: torch.Tensor) -> torch.Tensor:
        return (y + 1.0) * 0.5

    def resize(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(x.shape[-2:]) == tuple(size):
            return x
        squeeze = x.ndim == 3
        x = x.unsqueeze(1) if squeeze else x
        out = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return out.squeeze(1) if squeeze else out

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Data (B x C x H x W) -> model space at the internal resolution."""
        return self.to_model(self.resize(images.float(), self.internal_size))

    def residual_map(self, x: torch.Tensor, x_hat: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """``mean_c |x - x_hat|`` in data units (inputs in model space), resampled to ``out_size``."""
        diff = (x - x_hat).abs().mean(dim=1) * 0.5  # model units are twice data units
        return self.resize(diff, tuple(out_size))

    def generator(self, offset: int = 0) -> torch.Generator:
        """A generator on the scoring device, reseeded per batch so scoring is deterministic."""
        return torch.Generator(device=self.device).manual_seed(int(self.config.seed) + offset)

    # ------------------------------------------------------------------ network & chain
    def _timesteps(self, t: int | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
        if isinstance(t, torch.Tensor) and t.ndim == 1:
            return t.to(device).long()
        return torch.full((batch,), int(t), device=device, dtype=torch.long)

    def model_output(self, x_t: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        assert self.model is not None, "network not built"
        self.nfe += 1
        return self.model(x_t, self._timesteps(t, x_t.shape[0], x_t.device)).to(x_t.dtype)

    def _clip(self, x0: torch.Tensor) -> torch.Tensor:
        return x0.clamp(-1.0, 1.0) if self.config.clip_denoised else x0

    def noise_to(self, x0: torch.Tensor, t_start: int | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Partial noising: the sample at index ``t_start`` of q(. | x0), with the given noise."""
        self.schedule.check_t(t_start)
        return self.schedule.q_sample(x0, t_start, noise)

    def denoise_one_pass(self, x_t: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """x0 prediction from one network evaluation (clipped if ``clip_denoised``)."""
        out = self.model_output(x_t, t)
        return self._clip(self.schedule.predict_x0(x_t, t, out, self.config.prediction_type))

    def reverse_step(
        self, x_t: torch.Tensor, t: int, generator: torch.Generator | None = None, noise_fn: NoiseFn | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One ancestral step from index ``t`` to ``t - 1``; returns ``(x_{t-1}, x0_pred)``."""
        x0 = self.denoise_one_pass(x_t, t)
        noise = (noise_fn or gaussian_noise)(x_t, generator) if t > 0 else None
        return self.schedule.posterior_step(x0, x_t, t, noise), x0

    def reverse_chain(
        self,
        x_t: torch.Tensor,
        t_start: int,
        t_end: int = 0,
        generator: torch.Generator | None = None,
        noise_fn: NoiseFn | None = None,
        callback: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """Run steps ``t_start, t_start-1, ..., t_end``; with ``t_end=0`` the result is clean data.

        The result is the sample at index ``t_end - 1`` (index -1 = clean). ``callback(t,
        x_prev, x0_pred)`` may return a replacement for ``x_prev`` (THOR's harmonisation,
        RePaint's stitching).
        """
        if not 0 <= t_end <= t_start < self.T:
            raise ValueError(f"need 0 <= t_end <= t_start < T={self.T}, got t_start={t_start}, t_end={t_end}")
        x = x_t
        for t in range(int(t_start), int(t_end) - 1, -1):
            x, x0 = self.reverse_step(x, t, generator, noise_fn)
            if callback is not None:
                replaced = callback(t, x, x0)
                if replaced is not None:
                    x = replaced
        return x

    # ------------------------------------------------------------------ scoring
    def restore(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Pseudo-healthy restoration of ``x`` (model space, internal size) -> model space."""
        raise NotImplementedError(f"{type(self).__name__} must implement restore() or override _score_batch()")

    def _score_batch(self, images: torch.Tensor, brain_masks: torch.Tensor) -> torch.Tensor:
        self.nfe = 0
        x = self.prepare(images)
        x_hat = self.restore(x, self.generator())
        return self.residual_map(x, x_hat, tuple(images.shape[-2:]))

    def _reconstruct_batch(self, images: torch.Tensor, brain_masks: torch.Tensor) -> torch.Tensor:
        x = self.prepare(images)
        x_hat = self.restore(x, self.generator())
        return self.resize(self.to_data(x_hat), tuple(images.shape[-2:]))

    # ------------------------------------------------------------------ training
    def training_noise(self, x0: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The noise of the forward process used in training (Gaussian; AnoDDPM: simplex)."""
        return gaussian_noise(x0, generator)

    def training_loss(self, x0: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Standard DDPM loss: uniform t, noise x0, predict noise (or x0), L2 (or L1)."""
        assert self.model is not None
        b = x0.shape[0]
        t = torch.randint(0, self.T, (b,), generator=generator, device=x0.device)
        noise = self.training_noise(x0, generator)
        x_t = self.schedule.q_sample(x0, t, noise)
        out = self.model(x_t, t)
        target = noise if self.config.prediction_type == "epsilon" else x0
        return self.loss_fn(out, target)

    def loss_fn(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(pred, target) if self.config.loss == "l1" else F.mse_loss(pred, target)

    def _fit(self, train: "SliceSet", val: "SliceSet | None") -> None:
        self._build()
        assert self.model is not None
        c = self.config
        device = self.device
        cpu_gen = torch.Generator().manual_seed(int(c.seed))  # batch order
        gen = torch.Generator(device=device).manual_seed(int(c.seed) + 1)  # t and noise
        optimizer = torch.optim.Adam(self.model.parameters(), lr=c.lr)
        n = len(train)
        self.model.train()
        history: list[float] = []
        bar = progress_bar(range(c.epochs), desc=f"fit {self.name}", unit="epoch", enabled=c.progress)
        for _epoch in bar:
            total, count = 0.0, 0
            for idx in self.iterate_minibatches(n, c.batch_size, cpu_gen):
                batch = torch.from_numpy(np.asarray(train.images[idx], dtype=np.float32)).to(device)
                x0 = self.prepare(batch)
                loss = self.training_loss(x0, gen)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(idx)
                count += len(idx)
            history.append(total / max(count, 1))
            bar.set_postfix(loss=f"{history[-1]:.4f}")
        self.model.eval()
        if history and not math.isfinite(history[-1]):
            raise RuntimeError(f"{self.name}: training diverged (loss {history[-1]})")
        self.notes["final_train_loss"] = history[-1] if history else None
        self.notes["train_steps"] = int(c.epochs * math.ceil(n / c.batch_size))
