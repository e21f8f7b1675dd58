"""The pixel-space DDPM machinery shared by DDPM, AnoDDPM, pDDPM, AutoDDPM and THOR.

``PixelDiffusionMethod`` trains one UNet (``backbone.build_unet``) as a DDPM and offers
the pieces the baselines assemble at test time: partial noising (``noise_to``), a reverse
chain from any ``t_start`` (``reverse_chain``; MONAI's ``DiffusionInferer.sample`` always
runs the whole chain), a single ancestral step (``reverse_step``) and a one-pass x0
prediction (``denoise_one_pass``). A subclass writes ``restore`` (pseudo-healthy image)
or overrides ``_score_batch``, plus its config defaults.

Units. Data arrive as the prepared sets store them, and these are not bounded by 1 (S2
divides each volume by its brain's 90th percentile, so healthy voxels reach 2 or 3). The
network works in a *model space* ``y = 2 (x - lo) / (hi - lo) - 1``, where ``[lo, hi]``
is ``config.data_range`` or, by default (``None``), the range of the training set
recorded by ``fit`` (saved with the model, ``extra_state``). The training range maps to
[-1, 1], the range DDPMs are trained for, and ``clip_denoised`` clips x0 predictions to
it: that is the range seen in training, never an assumed [0, 1]. ``data_range=(0, 1)``
gives the authors' ``2x - 1`` (their data are divided by each slice's maximum). Every
helper below takes and returns tensors in model space; ``prepare`` goes there from data,
``to_data`` comes back, and ``residual_map`` / ``data_residual`` return maps in *data*
units (``|x - x_hat|`` of the data, channel mean), resampled to the input resolution.

Resolution. When the data are not ``image_size`` square, inputs are resampled (bilinear,
antialiased) to ``image_size`` and maps are computed there and resampled back
(bilinear); ``image_size=None`` keeps the data's own resolution.

Timesteps follow ``schedules``: index ``t`` in ``0..T-1``, ``reverse_chain(x, t_start)``
runs steps ``t_start, ..., 0`` (``t_start + 1`` network evaluations) and returns clean
data. ``self.nfe`` counts network evaluations per scored slice for the benchmarks.
``max_reverse_steps`` (dry runs only, ``benchmarks.run --dry-run``) cuts every chain to
that many steps (``chain_steps``); its maps are meaningless, its code paths the real ones.

Scoring noise. Every slice draws its noise from its own generator, seeded by
``(config.seed, index of the slice in the scored set)`` and living on the scoring device
(``SliceGenerators``): a slice's map does not depend on the batch it is scored in.

Training (``_fit``), as in the authors' configs (ci-ber/THOR_DDPM
``projects/thor/configs/brain/thor.yaml``, ``projects/thor/DDPMTrainer.py``,
``data/loaders/brain_loader.py``): Adam, batch 16, L2 on the noise, the loader's
``RandomAffine(10, 0.1, 0.9-1.1)`` + horizontal flip (``augment``), a validation every
``val_every`` optimiser steps that scores the full reconstruction from ``val_t`` (their
``noise_level_recon``) with the training loss, and the best-validation weights kept
(``keep_best``); departure: at most ``val_slices`` = 64 validation slices (the authors
validate their whole, small, IXI validation set). The budget is ``max_steps`` optimiser steps, the authors' epochs x their
training set / their batch (``paper_steps``); ``max_steps=None`` trains ``epochs`` epochs
of the data at hand instead. Options beyond the ci-ber set-up, for AnoDDPM (Wyatt's
code): ``train_t_max`` (timesteps drawn from ``0..train_t_max-1``) and ``ema_decay``
(scoring and validation use the exponential moving average of the weights).

GPU execution (``methods.common.accel``, no-ops on the CPU): batches come through the
prefetching loader, the network's forward passes run under bf16 autocast (``train_amp``;
outputs and losses in float32), the losses stay on the device and are read back every
``log_every`` steps (when the divergence check runs), and ``compile`` compiles the forward
pass used in training and scoring (``networks()`` keeps the plain module).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from methods.base import DRY_RUN_BATCH, DRY_RUN_STEPS, ConfigError, MethodConfig, UADMethod, inference_field
from methods.common.accel import compile_forward, prefetch_epoch, to_channels_last, train_autocast
from methods.common.augment import random_affine_flip
from methods.common.loss_meter import LossMeter
from methods.common.backbone import backbone_kwargs, build_unet, load_unet_checkpoint
from methods.common.noise import SliceGenerators, gaussian_noise, per_slice, slice_seed  # noqa: F401 (re-exported)
from methods.common.schedules import NoiseSchedule, make_schedule
from methods.progress import progress_bar

if TYPE_CHECKING:  # pragma: no cover
    from datasets.format import SliceSet

#: ``noise_fn(like, generator) -> noise`` with the shape, device and dtype of ``like``.
NoiseFn = Callable[[torch.Tensor, "torch.Generator | SliceGenerators | None"], torch.Tensor]


def paper_steps(epochs: int, n_train: int, batch_size: int) -> int:
    """The authors' budget in optimiser steps: ``epochs x ceil(n_train / batch_size)`` (no dropped batch)."""
    return int(epochs) * math.ceil(int(n_train) / int(batch_size))


#: THOR's training set-up (ci-ber/THOR_DDPM ``projects/thor/configs/brain/thor.yaml``):
#: 1500 epochs at batch 16 over the 464 IXI T1 slices of the THOR paper = 43,500 steps.
THOR_EPOCHS, THOR_N_TRAIN, THOR_BATCH = 1500, 464, 16
THOR_STEPS = paper_steps(THOR_EPOCHS, THOR_N_TRAIN, THOR_BATCH)

#: Profile overrides shared by the pixel diffusion baselines (each method adds its scaled
#: timesteps). ``quick``: the same algorithms on 2 CPU cores in minutes: a small UNet
#: (self-attention only at the lowest level and the middle, because attention over 32 x 32
#: tokens dominates CPU time), internal 64 x 64, few epochs with a larger Adam step (5e-4),
#: no augmentation, validation or best-checkpoint selection (CPU time), and T = 100 steps
#: *respaced* from the published T = 1000 schedule (``respace_from``: the 100-step
#: schedule keeps every 10th noise level), so a timestep scaled with
#: ``schedules.scale_timestep`` keeps the noise level: alphas_cumprod 0.283 at t = 350 of
#: 1000 and 0.285 at t = 34 of 100 (0.521 / 0.524 at AnoDDPM's 250 -> 24).
QUICK_BACKBONE: dict = {
    "channels": (32, 64, 64),
    "attention_levels": (False, False, True),
    "num_head_channels": 32,
    "norm_num_groups": 16,
    "num_train_timesteps": 100,
    "respace_from": 1000,
    "lr": 5e-4,
    "image_size": 64,
    "batch_size": 32,
    "max_steps": None,
    "epochs": 15,
    "augment": False,
    "keep_best": False,
    "val_every": None,
    "val_t": 34,  # scale_timestep(350, 1000, 100), used when a validation is switched on
}
#: ``quick`` of DDPM, THOR and AutoDDPM, which share one trained network: 60 epochs (with 15
#: the DDPM reconstructions do not beat a constant map on the embedded T1 data).
QUICK_SHARED_DDPM: dict = {**QUICK_BACKBONE, "epochs": 60}
#: ``tiny``: seconds, for the conformance and unit tests only (T = 10, 16 x 16); keeps
#: augmentation and best-validation selection so that those paths run in the tests.
TINY_BACKBONE: dict = {
    "channels": (8, 16),
    "attention_levels": (False, True),
    "num_head_channels": 8,
    "norm_num_groups": 8,
    "num_train_timesteps": 10,
    "image_size": 16,
    "batch_size": 4,
    "max_steps": None,
    "epochs": 2,
    "val_every": 2,
    "val_t": 3,
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
    include_fc: bool = False  # True: MONAI's default projection after attention (not in the authors' UNet)
    unet_checkpoint: str | None = None  # an authors' UNet state dict: fit loads it instead of training
    # units: data [lo, hi] -> model [-1, 1]; None = the training set's range, recorded by fit
    data_range: tuple[float, float] | None = None
    # diffusion
    schedule: str = "linear"  # linear | cosine
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    respace_from: int | None = None  # T_base: respace a T_base-step schedule to num_train_timesteps
    prediction_type: str = "epsilon"  # epsilon | sample (x0)
    # training (THOR config: Adam 1e-4, batch 16, 1500 epochs of 464 slices = 43,500 steps, L2)
    loss: str = "l2"  # l2 | l1
    lr: float = 1e-4
    batch_size: int = 16
    max_steps: int | None = THOR_STEPS  # optimiser steps; None = ``epochs`` epochs of the data
    epochs: int = THOR_EPOCHS  # used only when max_steps is None
    augment: bool = True  # ci-ber loader: RandomAffine(10, 0.1, 0.9-1.1) + horizontal flip
    keep_best: bool = True  # keep the weights of the best validation (needs a validation set)
    val_every: int | None = 1450  # optimiser steps between validations (ci-ber: every 50 epochs of 29 steps)
    val_t: int = 350  # validation: full reconstruction from this timestep (THOR's noise_level_recon)
    val_slices: int | None = 64  # validate on this many slices, evenly spaced over the validation set (None = all)
    train_t_max: int | None = None  # draw training timesteps from 0..train_t_max-1 (None = T)
    ema_decay: float | None = None  # EMA of the weights used for scoring (None = the trained weights)
    image_size: int | None = 128  # internal resolution; None = the data's own
    # scoring
    clip_denoised: bool = inference_field(True)  # clip x0 predictions to the model range of the training data
    progress: bool = inference_field(True)  # tqdm bars in fit
    # dry runs only: run at most this many steps of every reverse chain (None = all; see chain_steps)
    max_reverse_steps: int | None = inference_field(None)


class PixelDiffusionMethod(UADMethod):
    """Base class: DDPM training loop, partial noising and reverse chains in pixel space."""

    Config = PixelDiffusionConfig
    config: PixelDiffusionConfig
    #: scoring noise is drawn per slice (``SliceGenerators``), so maps do not depend on batching
    batch_invariant = True

    def __init__(self, config: PixelDiffusionConfig | None = None, **overrides) -> None:
        super().__init__(config, **overrides)
        self.model: nn.Module | None = None
        self._schedule: NoiseSchedule | None = None
        self.data_range_: tuple[float, float] | None = None  # [lo, hi] of the training data, set by fit
        self.nfe = 0  # network evaluations in the last _score_batch call, per slice
        self._first_index = 0  # index in the scored set of the current batch's first slice
        self._forward: tuple[nn.Module, Callable] | None = None  # (self.model, its (compiled) forward pass)

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
        if c.data_range is not None and not (len(c.data_range) == 2 and float(c.data_range[1]) > float(c.data_range[0])):
            raise ConfigError(f"data_range must be (lo, hi) with hi > lo, got {c.data_range!r}")
        if c.max_steps is not None and c.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1 or None, got {c.max_steps}")
        if c.train_t_max is not None and not 1 <= c.train_t_max <= c.num_train_timesteps:
            raise ConfigError(f"train_t_max={c.train_t_max} must be in 1..num_train_timesteps={c.num_train_timesteps}")
        if c.ema_decay is not None and not 0.0 <= c.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1) or None, got {c.ema_decay}")
        if not 0 <= c.val_t < c.num_train_timesteps:
            raise ConfigError(f"val_t={c.val_t} must be in 0..{c.num_train_timesteps - 1}")
        if c.max_reverse_steps is not None and c.max_reverse_steps < 1:
            raise ConfigError(f"max_reverse_steps must be >= 1 or None, got {c.max_reverse_steps}")

    @classmethod
    def dry_run_overrides(cls, config: MethodConfig) -> dict:
        """Two optimiser steps of batch 2, a validation (on 2 slices) after the last, chains of two steps.

        Validation and best-weight selection run as in the full training;
        the UNet, ``image_size`` and the schedule (T) stay those of ``config``.
        """
        return {
            **super().dry_run_overrides(config),
            "max_steps": DRY_RUN_STEPS,
            "batch_size": DRY_RUN_BATCH,
            "val_every": DRY_RUN_STEPS,
            "val_slices": DRY_RUN_BATCH,
            "max_reverse_steps": DRY_RUN_STEPS,
        }

    def networks(self) -> dict[str, nn.Module]:
        return {"unet": self.model} if self.model is not None else {}

    def _build(self) -> None:
        self.validate_config()
        if self.input_shape_ is None:
            raise RuntimeError("input_shape_ must be set before _build")
        c_in = int(self.input_shape_[0])
        flash = self.device.type == "cuda"  # SDPA attention on CUDA; the CPU keeps the matrix form (bit-for-bit results)
        self.model = build_unet(in_channels=c_in, out_channels=c_in, use_flash_attention=flash, **backbone_kwargs(self.config)).to(self.device)
        to_channels_last(self.model, self.device, self.config.channels_last)
        self.model.eval()
        self._forward = None
        self.notes.setdefault("internal_resolution", self.internal_size)

    def extra_state(self) -> dict:
        return {"data_range": list(self.data_range_) if self.data_range_ is not None else None}

    def set_extra_state(self, state: dict) -> None:
        value = state.get("data_range")
        self.data_range_ = (float(value[0]), float(value[1])) if value is not None else None

    @property
    def schedule(self) -> NoiseSchedule:
        if self._schedule is None:
            c = self.config
            self._schedule = make_schedule(c.schedule, c.num_train_timesteps, c.beta_start, c.beta_end, c.respace_from).to(self.device)
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
    @property
    def data_range(self) -> tuple[float, float]:
        """``[lo, hi]`` of the data that maps to the model range [-1, 1] (config, else the training set's)."""
        if self.config.data_range is not None:
            return (float(self.config.data_range[0]), float(self.config.data_range[1]))
        if self.data_range_ is None:
            raise RuntimeError(f"{self.name}: the data range is recorded by fit(); call fit() or load() first, or set data_range")
        return self.data_range_

    @property
    def data_scale(self) -> float:
        """Data units per model unit, ``(hi - lo) / 2``."""
        lo, hi = self.data_range
        return (hi - lo) / 2.0

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.data_range
        return (x - lo) * (2.0 / (hi - lo)) - 1.0

    def to_data(self, y: torch.Tensor) -> torch.Tensor:
        lo, _ = self.data_range
        return (y + 1.0) * self.data_scale + lo

    def record_data_range(self, images: np.ndarray) -> None:
        """Record the training set's [min, max] (scanned in chunks: the set may be memory-mapped)."""
        lo, hi = math.inf, -math.inf
        for start in range(0, len(images), 256):
            chunk = np.asarray(images[start : start + 256], dtype=np.float32)
            lo, hi = min(lo, float(chunk.min())), max(hi, float(chunk.max()))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"{self.name}: the training images contain non-finite values")
        self.data_range_ = (lo, hi if hi > lo else lo + 1.0)
        self.notes["data_range"] = list(self.data_range)

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

    def data_residual(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """``mean_c |x - x_hat|`` in data units, B x 1 x h x w (inputs in model space)."""
        return (x - x_hat).abs().mean(dim=1, keepdim=True) * self.data_scale

    def residual_map(self, x: torch.Tensor, x_hat: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """``mean_c |x - x_hat|`` in data units (inputs in model space), resampled to ``out_size``."""
        return self.resize(self.data_residual(x, x_hat)[:, 0], tuple(out_size))

    def generator(self, batch: int) -> SliceGenerators:
        """Per-slice generators for the current batch, seeded by (seed, index of the slice in the scored set)."""
        start = self._first_index
        return SliceGenerators(int(self.config.seed), range(start, start + int(batch)), self.device)

    def _batched(self, fn, images, brain_masks, progress, desc, is_map):
        """``UADMethod._batched``, tracking each batch's position so noise is seeded per slice."""
        self._first_index = 0

        def tracked(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
            try:
                return fn(x, m)
            finally:
                self._first_index += x.shape[0]

        return super()._batched(tracked, images, brain_masks, progress, desc, is_map)

    # ------------------------------------------------------------------ network & chain
    def _timesteps(self, t: int | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
        if isinstance(t, torch.Tensor) and t.ndim == 1:
            return t.to(device).long()
        return torch.full((batch,), int(t), device=device, dtype=torch.long)

    @property
    def forward(self) -> Callable:
        """The network's forward pass: ``self.model``, or its ``torch.compile`` on CUDA with ``compile``."""
        assert self.model is not None, "network not built"
        if self._forward is None or self._forward[0] is not self.model:  # built once per network
            self._forward = (self.model, compile_forward(self.model, self.device, self.config.compile))
        return self._forward[1]

    def model_output(self, x_t: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        assert self.model is not None, "network not built"
        self.nfe += 1
        return self.forward(x_t, self._timesteps(t, x_t.shape[0], x_t.device)).to(x_t.dtype)

    def train_output(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's output in training: bf16 autocast on CUDA (``train_amp``), returned in float32."""
        with train_autocast(x_t.device, self.config.train_amp):
            out = self.forward(x_t, t)
        return out.float()

    def _clip(self, x0: torch.Tensor) -> torch.Tensor:
        """Clip to [-1, 1]: the model image of the training range (or of ``data_range``)."""
        return x0.clamp(-1.0, 1.0) if self.config.clip_denoised else x0

    def noise_to(self, x0: torch.Tensor, t_start: int | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Partial noising: the sample at index ``t_start`` of q(. | x0), with the given noise."""
        self.schedule.check_t(t_start)
        return self.schedule.q_sample(x0, t_start, noise)

    def denoise_one_pass(self, x_t: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """x0 prediction from one network evaluation (clipped if ``clip_denoised``)."""
        out = self.model_output(x_t, t)
        return self._clip(self.schedule.predict_x0(x_t, t, out, self.config.prediction_type))

    def reverse_step(self, x_t: torch.Tensor, t: int, generator=None, noise_fn: NoiseFn | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One ancestral step from index ``t`` to ``t - 1``; returns ``(x_{t-1}, x0_pred)``."""
        x0 = self.denoise_one_pass(x_t, t)
        noise = (noise_fn or gaussian_noise)(x_t, generator) if t > 0 else None
        return self.schedule.posterior_step(x0, x_t, t, noise), x0

    def reverse_chain(
        self,
        x_t: torch.Tensor,
        t_start: int,
        t_end: int = 0,
        generator=None,
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
        for t in self.chain_steps(t_start, t_end):
            x, x0 = self.reverse_step(x, t, generator, noise_fn)
            if callback is not None:
                replaced = callback(t, x, x0)
                if replaced is not None:
                    x = replaced
        return x

    def chain_steps(self, t_start: int, t_end: int = 0) -> list[int]:
        """The timesteps a reverse chain from ``t_start`` to ``t_end`` visits, descending.

        All of them, unless ``max_reverse_steps`` = k (dry runs) cuts the chain to k steps:
        the last step ``t_end``, the steps ``dry_run_steps_first`` names, the first one
        ``t_start``, then k evenly spaced ones, in that order of preference. The cut chain
        jumps between noise levels, so its output is not a sample of the model: it only
        exercises the code.
        """
        steps = list(range(int(t_start), int(t_end) - 1, -1))
        k = self.config.max_reverse_steps
        if k is None or len(steps) <= k:
            return steps
        preferred = [int(t) for t in self.dry_run_steps_first() if t_end <= int(t) <= t_start]
        spread = [steps[round(i * (len(steps) - 1) / max(int(k) - 1, 1))] for i in range(int(k))]
        wanted = list(dict.fromkeys([int(t_end), *preferred, int(t_start), *spread]))  # in order of preference, once each
        return sorted(wanted[: int(k)], reverse=True)

    def dry_run_steps_first(self) -> list[int]:
        """Timesteps a cut chain keeps first (THOR: its harmonisation steps, where its chain branches)."""
        return []

    # ------------------------------------------------------------------ scoring
    def restore(self, x: torch.Tensor, generator) -> torch.Tensor:
        """Pseudo-healthy restoration of ``x`` (model space, internal size) -> model space."""
        raise NotImplementedError(f"{type(self).__name__} must implement restore() or override _score_batch()")

    def _score_batch(self, images: torch.Tensor, brain_masks: torch.Tensor) -> torch.Tensor:
        self.nfe = 0
        x = self.prepare(images)
        x_hat = self.restore(x, self.generator(x.shape[0]))
        return self.residual_map(x, x_hat, tuple(images.shape[-2:]))

    def _reconstruct_batch(self, images: torch.Tensor, brain_masks: torch.Tensor) -> torch.Tensor:
        x = self.prepare(images)
        x_hat = self.restore(x, self.generator(x.shape[0]))
        return self.resize(self.to_data(x_hat), tuple(images.shape[-2:]))

    # ------------------------------------------------------------------ cost (methods.cost)
    def score_evaluations(self) -> int:
        """UNet evaluations per scored slice (``restore``'s chain); each method states its own."""
        raise NotImplementedError(f"{type(self).__name__} must state its UNet evaluations per slice")

    def validation_evaluations(self) -> int:
        """UNet evaluations per validation slice (``validation_restore``: the chain from ``val_t``)."""
        return len(self.chain_steps(int(self.config.val_t)))

    def cost_plan(self, n_train: int, n_val: int):
        from methods.cost import CostPlan, Evaluations, Stage, endless_phase, epoch_phase

        c = self.config
        channels, (h, w), device = int(self.input_shape_[0]), self.internal_size, self.device

        def probe() -> torch.Tensor:
            return self.model(torch.zeros(1, channels, h, w, device=device), torch.zeros(1, dtype=torch.long, device=device))

        plan = CostPlan(stages=[Stage("unet", "unet", probe)], score=[Evaluations("unet", self.score_evaluations())])
        if c.unet_checkpoint:
            plan.notes.append("unet_checkpoint: loaded, not trained")
            return plan
        if c.max_steps is not None:
            phase = endless_phase("unet", int(c.max_steps), n_train, c.batch_size, "max_steps")
        else:
            phase = epoch_phase("unet", c.epochs, n_train, c.batch_size, what="epochs")
        plan.train.append(phase)
        if n_val > 0 and c.val_every is not None:
            slices = n_val if c.val_slices is None else min(n_val, int(c.val_slices))
            count = phase.steps // int(c.val_every)
            what = f"{count} validations x {slices} slices x {self.validation_evaluations()}"
            plan.fit_forward.append(Evaluations("unet", count * slices * self.validation_evaluations(), what))
        return plan

    # ------------------------------------------------------------------ training
    def training_noise(self, x0: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The noise of the forward process used in training (Gaussian; AnoDDPM: simplex)."""
        return gaussian_noise(x0, generator)

    def chain_noise(self, like: torch.Tensor, generator) -> torch.Tensor:
        """The noise of partial noising and reverse steps in validation (Gaussian; AnoDDPM: simplex)."""
        return gaussian_noise(like, generator)

    def training_timesteps(self, batch: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """Uniform timesteps in ``0..T-1`` (``0..train_t_max-1`` if set, as Wyatt's ``train_start``)."""
        t_max = self.T if self.config.train_t_max is None else int(self.config.train_t_max)
        return torch.randint(0, t_max, (batch,), generator=generator, device=device)

    def training_loss(self, x0: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Standard DDPM loss: uniform t, noise x0, predict noise (or x0), L2 (or L1)."""
        assert self.model is not None
        t = self.training_timesteps(x0.shape[0], generator, x0.device)
        noise = self.training_noise(x0, generator)
        x_t = self.schedule.q_sample(x0, t, noise)
        out = self.train_output(x_t, t)
        target = noise if self.config.prediction_type == "epsilon" else x0
        return self.loss_fn(out, target)

    def loss_fn(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(pred, target) if self.config.loss == "l1" else F.mse_loss(pred, target)

    def validation_restore(self, x: torch.Tensor, generator: SliceGenerators) -> torch.Tensor:
        """The ci-ber validation's restoration: noise to ``val_t`` and run the full reverse chain."""
        t = int(self.config.val_t)
        return self.reverse_chain(self.noise_to(x, t, self.chain_noise(x, generator)), t, 0, generator, noise_fn=self.chain_noise)

    def validation_loss(self, val: "SliceSet") -> float:
        """The training loss between validation slices and ``validation_restore`` of them, in data units.

        At most ``val_slices`` slices (evenly spaced): a full reverse chain per slice makes
        validating a large set (S2) cost more than training. Noise comes from per-slice
        generators (seed + 2), so every validation sees the same noise.
        """
        c = self.config
        total, count = 0.0, 0
        size = max(1, int(c.score_batch_size))
        rows = np.arange(len(val))
        if c.val_slices is not None and len(val) > c.val_slices:  # a fixed, evenly spaced subset
            rows = np.unique(np.linspace(0, len(val) - 1, int(c.val_slices)).round().astype(np.int64))
        with torch.no_grad():
            for start in range(0, len(rows), size):
                batch = torch.from_numpy(np.asarray(val.images[rows[start : start + size]], dtype=np.float32)).to(self.device)
                x = self.prepare(batch)
                x_hat = self.validation_restore(x, SliceGenerators(int(c.seed) + 2, range(start, start + x.shape[0]), self.device))
                total += float(self.loss_fn(self.to_data(x_hat), self.to_data(x))) * x.shape[0]
                count += x.shape[0]
        return total / max(count, 1)

    def _fit(self, train: "SliceSet", val: "SliceSet | None") -> None:
        c = self.config
        self.record_data_range(train.images)
        self._build()
        assert self.model is not None
        if c.unet_checkpoint:
            load_unet_checkpoint(self.model, c.unet_checkpoint)
            self.model.to(self.device).eval()
            self.notes.update(unet_checkpoint=str(c.unet_checkpoint), train_steps=0)
            return
        self._train(train, val)

    def _train(self, train: "SliceSet", val: "SliceSet | None") -> None:
        assert self.model is not None
        c = self.config
        device = self.device
        cpu_gen = torch.Generator().manual_seed(int(c.seed))  # batch order
        gen = torch.Generator(device=device).manual_seed(int(c.seed) + 1)  # t, noise and augmentation
        optimizer = torch.optim.Adam(self.model.parameters(), lr=c.lr)
        ema = copy.deepcopy(self.model).eval() if c.ema_decay is not None else None
        n = len(train)
        steps_per_epoch = math.ceil(n / c.batch_size)
        total_steps = int(c.max_steps) if c.max_steps is not None else int(c.epochs) * steps_per_epoch
        validate = val is not None and len(val) > 0 and c.val_every is not None
        best: tuple[float, int, dict] | None = None
        step = 0
        self.model.train()
        bar = progress_bar(range(total_steps), desc=f"fit {self.name}", unit="step", enabled=c.progress)

        def read(idx: np.ndarray) -> tuple[np.ndarray]:
            return (np.asarray(train.images[idx], dtype=np.float32),)

        meter = LossMeter(self.name, device)
        epoch_means: list[torch.Tensor] = []  # per epoch, on the device (read once, after training)
        while step < total_steps:
            # the epoch's order is drawn here, before any draw of the steps, as a direct loop does
            for _, (batch,) in prefetch_epoch(read, list(self.iterate_minibatches(n, c.batch_size, cpu_gen)), device):
                batch = self.resize(batch, self.internal_size)
                if c.augment:
                    batch = random_affine_flip(batch, gen)  # in data units: the fill 0 is the background
                loss = self.training_loss(self.to_model(batch), gen)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if ema is not None:
                    with torch.no_grad():
                        for p_ema, p in zip(ema.parameters(), self.model.parameters()):
                            p_ema.mul_(c.ema_decay).add_(p.detach(), alpha=1.0 - c.ema_decay)
                meter.add(loss)
                step += 1
                bar.update(1)
                if step % int(c.log_every) == 0:  # the only host sync of the loop
                    bar.set_postfix(meter.postfix(meter.read(step)))
                if validate and step % int(c.val_every) == 0:
                    best = self._validate(val, ema, step, best)  # type: ignore[arg-type]
                    self.model.train()
                if step >= total_steps:
                    break
            epoch_means.append(meter.end_epoch())
        bar.close()
        meter.read(step)  # the steps since the last read-out
        history = torch.cat(epoch_means).tolist() if epoch_means else []
        if ema is not None:
            self.model.load_state_dict(ema.state_dict())  # score with the averaged weights (Wyatt's code)
        self.model.eval()
        if c.keep_best and best is not None:
            self.model.load_state_dict(best[2])
            self.notes["best_val_step"], self.notes["best_val_loss"] = best[1], best[0]
        self.notes["final_train_loss"] = history[-1] if history else None
        self.notes["train_steps"] = total_steps
        self.notes["train_epochs"] = round(total_steps / steps_per_epoch, 2)  # epochs of this training set

    def _validate(self, val: "SliceSet", ema: nn.Module | None, step: int, best: tuple[float, int, dict] | None):
        """Validate the weights scoring would use; keep a copy if they are the best so far."""
        assert self.model is not None
        weights = (ema if ema is not None else self.model).state_dict()
        trained = {k: v.detach().clone() for k, v in self.model.state_dict().items()} if ema is not None else None
        if ema is not None:
            self.model.load_state_dict(weights)
        self.model.eval()
        loss = self.validation_loss(val)
        if trained is not None:
            self.model.load_state_dict(trained)
        self.notes.setdefault("val_history", []).append([step, loss])
        if self.config.keep_best and (best is None or loss < best[0]):
            return (loss, step, {k: v.detach().clone() for k, v in weights.items()})
        return best
