"""Denoising autoencoder (Kascenas, Pugeault and O'Neil, "Denoising autoencoders for
unsupervised anomaly detection in brain MRI", MIDL 2022; code: AntanasKascenas/DenoisingAE).

Training: a UNet (``methods.dae.network``) restores healthy slices from a copy corrupted
with coarse noise, N(0, std^2) drawn on a 16 x 16 grid, bilinearly upsampled, rolled by one
random shift per batch and added inside the foreground; loss = MSE on the foreground.
Scoring: ``|x - net(x)|`` (mean over channels) inside the foreground eroded by about 2 px,
then a 5 x 5 median filter. Every setting and its source file: methods/dae/README.md.

GPU execution (``methods.common.accel``; no-ops on the CPU): prefetched batches, bf16
autocast of the UNet's forward passes in training (``train_amp``; the loss in float32),
the loss checked for divergence every ``log_every`` iterations instead of every one,
``compile`` and ``channels_last`` for the training forward passes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from datasets.format import SliceSet
from methods.base import DRY_RUN_BATCH, DRY_RUN_STEPS, ConfigError, MethodConfig, UADMethod, inference_field
from methods.common.accel import compile_forward, prefetch_endless, to_channels_last, train_autocast
from methods.common.loss_meter import LossMeter
from methods.common.resolution import InternalResolution
from methods.dae.network import DAEUNet
from methods.dae.ops import add_coarse_noise, erode_foreground, masked_mse, median_filter, unit_ratio
from methods.progress import progress_bar
from methods.registry import register_method

FOREGROUND_RULES = ("brain_mask", "intensity")


@dataclass
class DAEConfig(MethodConfig):
    # Network: depth 4, 2 ** (6 + i) channels (denoising.py train(): depth=4, wf=6).
    channels: tuple[int, ...] = (64, 128, 256, 512)
    # Noise, in the authors' units (volume / brain 99th percentile): std 0.2 on a 16 x 16 grid.
    noise_std: float = 0.2
    noise_res: int = 16  # grid side at the internal resolution (16 at 128 px)
    # Our units per their unit (p99 / p90 of the brain); None = estimated on the training brain voxels.
    noise_unit_ratio: float | None = None
    # brain_mask = the data's brain mask (non-zero in any modality, the counterpart of their
    # channel sum over all four modalities); intensity = their rule on the given channels.
    foreground: str = "brain_mask"
    foreground_threshold: float = 0.01  # 'intensity': channel sum > this, in their units
    # Optimisation (denoising.py, training.py, trainer.py).
    lr: float = 1e-4
    weight_decay: float = 1e-5
    amsgrad: bool = True
    grad_clip: float = 0.5  # max gradient norm
    batch_size: int = 16
    iterations: int = 67_200  # optimiser steps: 2100 epochs of 32 iterations
    epoch_len: int = 32  # iterations per "epoch": one scheduler step and one validation
    t_max_epochs: int = 100  # CosineAnnealingLR T_max, in epochs; never reset (the cosine keeps cycling)
    val_batches: int = 32  # validation batches per epoch (first ones, in order); best loss is kept
    image_size: int | None = None  # internal resolution; None = the data's (maps are computed at the data's)
    # Scoring.
    erosion_kernel: int = inference_field(5)
    erosion_keep: float = inference_field(0.95)
    median_kernel: int = inference_field(5)


@register_method("dae")
class DenoisingAutoencoder(InternalResolution, UADMethod):
    """Kascenas et al.'s DAE; map = 5 x 5 median of |x - net(x)| in the eroded foreground."""

    Config = DAEConfig
    config: DAEConfig
    profiles = {
        "paper": {},
        # Same algorithm at a quarter of the width and 64 px (noise grid 8 x 8, i.e. 16 x 16 at
        # 128 px): a few minutes per model on 2 CPU cores. 8 epochs of 32 iterations, one
        # cosine half-cycle, lr 1e-3 so the short run converges.
        "quick": {
            "channels": (16, 32, 64, 128),
            "image_size": 64,
            "noise_res": 8,
            "iterations": 256,
            "epoch_len": 32,
            "t_max_epochs": 8,
            "val_batches": 3,
            "lr": 1e-3,
        },
        # For tests: seconds on a CPU, same structure.
        "tiny": {
            "channels": (8, 16, 32, 64),
            "image_size": 32,
            "noise_res": 4,
            "iterations": 8,
            "epoch_len": 4,
            "t_max_epochs": 2,
            "val_batches": 1,
            "batch_size": 4,
        },
    }

    # ------------------------------------------------------------------ helpers
    def _foreground(self, images: torch.Tensor, brain_masks: torch.Tensor) -> torch.Tensor:
        """``B x 1 x H x W`` float 0/1 at the images' resolution."""
        if self.config.foreground == "brain_mask":
            return (brain_masks > 0).float().unsqueeze(1)
        ratio = torch.as_tensor(self.unit_ratio_, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        return ((images / ratio).sum(dim=1, keepdim=True) > self.config.foreground_threshold).float()

    @classmethod
    def dry_run_overrides(cls, config: MethodConfig) -> dict[str, Any]:
        """Two iterations of batch 2 in one "epoch" (then a scheduler step and a one-batch validation)."""
        return {
            **super().dry_run_overrides(config),
            "iterations": DRY_RUN_STEPS,
            "epoch_len": DRY_RUN_STEPS,
            "val_batches": 1,
            "batch_size": DRY_RUN_BATCH,
        }

    def _check_config(self) -> None:
        cfg = self.config
        if cfg.foreground not in FOREGROUND_RULES:
            raise ConfigError(f"dae: foreground={cfg.foreground!r}; choose from {FOREGROUND_RULES}")
        for name in ("iterations", "epoch_len", "t_max_epochs", "val_batches", "batch_size", "noise_res"):
            if int(getattr(cfg, name)) < 1:
                raise ConfigError(f"dae: {name} must be >= 1, got {getattr(cfg, name)}")
        if cfg.noise_unit_ratio is not None and not cfg.noise_unit_ratio > 0:
            raise ConfigError(f"dae: noise_unit_ratio must be positive or None, got {cfg.noise_unit_ratio}")
        factor = 2 ** (len(cfg.channels) - 1)
        if any(side % factor for side in self._internal_size()):
            raise ConfigError(f"dae: the internal image size {self._internal_size()} must be divisible by {factor} ({len(cfg.channels)} levels); set image_size")

    def _build(self) -> None:
        c = self.input_shape_[0]  # type: ignore[index]
        self.model = DAEUNet(c, tuple(self.config.channels)).to(self.device)

    def networks(self) -> dict[str, nn.Module]:
        return {"unet": self.model}

    def extra_state(self) -> dict[str, Any]:
        return {"unit_ratio": [float(r) for r in self.unit_ratio_]}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.unit_ratio_ = np.asarray(state["unit_ratio"], dtype=np.float64)

    def _batch(self, data: SliceSet, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and foreground of ``index`` at the internal resolution."""
        return self._prepare(*(torch.from_numpy(a).to(self.device) for a in self._read(data, index)))

    @staticmethod
    def _read(data: SliceSet, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(data.images[index], dtype=np.float32), np.asarray(data.brain_masks[index])

    def _prepare(self, x: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and brain masks (on the device) -> images and foreground at the internal resolution."""
        fg = self._foreground(x, m)
        x = self._to_internal(x)
        if tuple(fg.shape[-2:]) != tuple(x.shape[-2:]):
            fg = (F.interpolate(fg, size=x.shape[-2:], mode="area") > 0.5).float()
        return x, fg

    def _restoration_loss(self, forward, x: torch.Tensor, fg: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The masked MSE of restoring ``x`` from coarse noise (forward under bf16 autocast on CUDA, the loss in float32)."""
        noisy = add_coarse_noise(x, fg, std, self.config.noise_res, generator)
        with train_autocast(x.device, self.config.train_amp):
            restored = forward(noisy)
        return masked_mse(restored.float(), x, fg)

    def _val_loss(self, val: SliceSet, std: torch.Tensor, generator: torch.Generator, forward=None) -> float:
        """Mean noisy-restoration loss over the first ``val_batches`` validation batches (fresh noise)."""
        cfg = self.config
        batch = min(cfg.batch_size, len(val))
        stop = len(val) - len(val) % batch  # drop_last, as their loader when the set exceeds a batch
        total, count = torch.zeros((), dtype=torch.float64, device=self.device), 0
        self.model.eval()
        with torch.no_grad():
            for start in list(range(0, stop, batch))[: cfg.val_batches]:
                x, fg = self._batch(val, np.arange(start, start + batch))
                total += self._restoration_loss(forward or self.model, x, fg, std, generator).double() * len(x)
                count += len(x)
        self.model.train()
        return float(total) / count

    def cost_plan(self, n_train: int, n_val: int):
        from methods.cost import CostPlan, Evaluations, Stage, TrainPhase

        cfg, c, (h, w) = self.config, int(self.input_shape_[0]), self._internal_size()  # type: ignore[index]
        plan = CostPlan(stages=[Stage("unet", "unet", lambda: self.model(torch.zeros(1, c, h, w, device=self.device)))])
        plan.score.append(Evaluations("unet", 1))
        batch = min(int(cfg.batch_size), n_train)  # drop_last batches, epoch after epoch
        plan.train.append(TrainPhase("unet", int(cfg.iterations), batch, int(cfg.iterations) * batch, "iterations"))
        if n_val > 0:
            vb = min(int(cfg.batch_size), n_val)
            per_validation = min(int(cfg.val_batches), (n_val - n_val % vb) // vb) * vb
            count = int(cfg.iterations) // int(cfg.epoch_len)
            plan.fit_forward.append(Evaluations("unet", count * per_validation, f"{count} validations x {per_validation} slices"))
        return plan

    # ------------------------------------------------------------------ fit / score
    def _fit(self, train: SliceSet, val: SliceSet | None) -> None:
        cfg = self.config
        self._check_config()
        c = self.input_shape_[0]  # type: ignore[index]
        if cfg.noise_unit_ratio is None:
            self.unit_ratio_ = unit_ratio(train.images, train.brain_masks)
            how = "estimated: p99 / p90 of the training brain voxels, per channel"
        else:
            self.unit_ratio_ = np.full(c, float(cfg.noise_unit_ratio))
            how = "fixed by noise_unit_ratio"
        std = torch.as_tensor(cfg.noise_std * self.unit_ratio_, dtype=torch.float32)
        self.notes.update(
            noise_unit_ratio=[round(float(r), 6) for r in self.unit_ratio_],
            noise_unit_ratio_source=how,
            noise_std_data_units=[round(float(s), 6) for s in std],
            noise_grid=f"{cfg.noise_res} x {cfg.noise_res} at {self._internal_size()[0]} x {self._internal_size()[1]}",
        )
        self._build()
        device = self.device
        forward = compile_forward(to_channels_last(self.model, device, cfg.channels_last), device, cfg.compile)
        optimiser = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, amsgrad=cfg.amsgrad)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=cfg.t_max_epochs)
        generator = torch.Generator().manual_seed(cfg.seed)
        batch = min(cfg.batch_size, len(train))
        # shuffled batches without a short last one, epoch after epoch (their DataLoader, drop_last), read ahead
        batches = prefetch_endless(
            lambda index: self._read(train, index), lambda: list(self.iterate_minibatches(len(train), batch, generator, drop_last=True)), device
        )
        best_state, best_loss, best_iteration = None, float("inf"), 0
        meter = LossMeter("dae", device, names=("mse",))
        self.model.train()
        bar = progress_bar(range(1, cfg.iterations + 1), desc="fit dae", unit="it")
        for iteration in bar:
            x, fg = self._prepare(*next(batches)[1])
            loss = self._restoration_loss(forward, x, fg, std, generator)
            meter.add(loss)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=cfg.grad_clip)
            optimiser.step()
            if iteration % cfg.log_every == 0 or iteration == cfg.iterations or iteration % cfg.epoch_len == 0:
                shown = meter.postfix(meter.read(iteration))  # the divergence check (a host sync)
                bar.set_postfix(shown)
            if iteration % cfg.epoch_len:
                continue
            scheduler.step()  # once per epoch of epoch_len iterations, before validation
            if val is not None and len(val):
                val_loss = self._val_loss(val, std, generator, forward)
                if val_loss < best_loss:  # strictly better, as their ModelSaver
                    best_state, best_loss, best_iteration = copy.deepcopy(self.model.state_dict()), val_loss, iteration
                bar.set_postfix({**shown, "val": f"{val_loss:.5f}"})  # shown: read at every epoch end
        if best_state is not None:
            self.model.load_state_dict(best_state)
            self.notes.update(checkpoint="best validation loss", best_val_loss=best_loss, best_iteration=best_iteration)
        else:
            self.notes.update(checkpoint="last iteration (no validation set or no full epoch)")
        batches.close()
        self.model.eval()

    def _reconstruct_batch(self, images: torch.Tensor, brain_masks: torch.Tensor) -> torch.Tensor:
        recon = self.model(self._to_internal(images))
        return recon if recon.shape == images.shape else F.interpolate(recon, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def _score_batch(self, images: torch.Tensor, brain_masks: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        # Residual, erosion and median at the data's resolution (the authors' 128 px kernels).
        keep = erode_foreground(self._foreground(images, brain_masks), cfg.erosion_kernel, cfg.erosion_keep)
        error = ((images - self._reconstruct_batch(images, brain_masks)) * keep).abs().mean(dim=1, keepdim=True)
        return median_filter(error, cfg.median_kernel)[:, 0]
