"""Cycl.UNet (Liang, Anthony, Wagner, Kamnitsas, MICCAI 2023; ZiyunLiang/MMCCD, the UNet-only variant).

Two UNets without time input: the forward F translates modality A (the one tested) into
an intermediate modality B, the backward G translates B into A. Each is trained alone,
with MSE over the whole image on paired healthy slices of the same subject (F: A -> B,
G: B -> A, both on real images; ``modality_cyclic_train.py`` run twice). At test only A
is needed: the map is the squared cycle residual (x_A - G(F(x_A)))^2 in the brain
(``modality_cyclic_sample.py``, ``models/gaussian_diffusion.py``, ``model_name == 'unet'``).

The runner hands ``fit`` a two-channel view [A, B] of the same slices (see
``training_modalities``) and ``score`` only A.

Units: the authors scale each volume like IterMask2 (brain 90th percentile -> 3,
background -> -3), i.e. u = 6 x / p90 - 3 for our x / p90; the networks work in
u = ``unit_scale`` x + ``unit_offset`` and maps are returned in data units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from datasets.format import SliceSet
from methods.base import DRY_RUN_BATCH, DRY_RUN_STEPS, ConfigError, MethodConfig, UADMethod, inference_field
from methods.common.accel import compile_forward, prefetch_endless, to_channels_last, train_autocast
from methods.common.liang_train import epoch_batches, train_steps
from methods.common.liang_unet import LiangUNet, resolve_channel_mult, unet_kwargs
from methods.registry import register_method

#: Intermediate modality B for each input A when ``intermediate_modality`` is None.
#: FLAIR <-> T2 is the authors' example (the README trains flair->t2 and t2->flair); the
#: others are our choice: T1 <-> T2 (both in the authors' default preprocessing list
#: 't2,flair,t1'), and T1CE -> T1, its closest contrast.
DEFAULT_INTERMEDIATE: dict[str, str] = {"FLAIR": "T2", "T2": "FLAIR", "T1": "T2", "T1CE": "T1"}


@dataclass
class CyclUNetConfig(MethodConfig):
    intermediate_modality: str | None = None  # B; None = DEFAULT_INTERMEDIATE[A]
    # network (configs/brats_configs.py, models/unet.py, models/nn.py: GroupNorm(16))
    model_channels: int = 32
    channel_mult: tuple[int, ...] | None = None  # None: the authors' table, (1, 1, 2, 3, 4) at 128 px
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    num_heads: int = 1
    dropout: float = 0.1
    norm: str = "group"
    norm_groups: int = 16
    image_size: int | None = None  # internal resolution; None = the data's (S2: 128, as theirs)
    unit_scale: float = 6.0
    unit_offset: float = -3.0
    # training (utils/train_util.py; the sampler loads model100000.pt, the last of 100k steps)
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 32
    steps: int = 100_000
    lr_decay_steps: int = 150_000
    lr_decay_factor: float = 0.5
    # scoring: modality_cyclic_sample.py keeps the map inside the brain eroded by skimage's disk(4)
    brain_erosion_radius: int = inference_field(4)  # px at the data's resolution; 0 = the whole brain


def intermediate_for(modality: str, configured: str | None) -> str:
    """B for input A: the configured one, else the default table."""
    if configured:
        if configured == modality:
            raise ConfigError(f"cyclunet: intermediate_modality must differ from the input modality {modality!r}")
        return configured
    if modality not in DEFAULT_INTERMEDIATE:
        raise ConfigError(
            f"cyclunet: no default intermediate modality for {modality!r} (defaults: {DEFAULT_INTERMEDIATE}); "
            "set intermediate_modality"
        )
    return DEFAULT_INTERMEDIATE[modality]


@register_method("cyclunet")
class CyclUNet(UADMethod):
    """Cycl.UNet: map = (x_A - G(F(x_A)))^2 with F: A -> B and G: B -> A trained on paired slices."""

    Config = CyclUNetConfig
    config: CyclUNetConfig
    profiles = {
        # The authors' run: 100,000 AdamW steps of batch 32 per network at lr 1e-4.
        "paper": {},
        # Same algorithm at 64 px (the authors' 64-px channel_mult (1, 2, 3, 4)) at a quarter of the
        # width (GroupNorm(8) so that 8 channels divide), without the 32-px attention; minutes on 2 CPU cores.
        "quick": {
            "image_size": 64,
            "model_channels": 8,
            "norm_groups": 8,
            "attention_resolutions": (16, 8),
            "steps": 120,
            "batch_size": 8,
            "lr": 1e-3,
        },
        # For the conformance test: seconds on a CPU.
        "tiny": {
            "image_size": 32,
            "model_channels": 16,
            "channel_mult": (1, 2),
            "num_res_blocks": 1,
            "attention_resolutions": (16,),
            "steps": 3,
            "batch_size": 4,
        },
    }

    def __init__(self, config: CyclUNetConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self.forward_net: LiangUNet | None = None
        self.backward_net: LiangUNet | None = None

    @classmethod
    def dry_run_overrides(cls, config: MethodConfig) -> dict[str, Any]:
        """Two optimiser steps of batch 2 per network."""
        return {**super().dry_run_overrides(config), "steps": DRY_RUN_STEPS, "batch_size": DRY_RUN_BATCH}

    def training_modalities(self, modality: str) -> list[str]:
        """[A, B]: fit gets both, channel 0 = A (tested), channel 1 = B (intermediate)."""
        return [modality, intermediate_for(modality, self.config.intermediate_modality)]

    # ------------------------------------------------------------------ construction
    @property
    def internal_size(self) -> tuple[int, int]:
        if self.config.image_size is not None:
            return (int(self.config.image_size),) * 2
        if self.input_shape_ is None:
            raise RuntimeError("internal size unknown before fit/load")
        return (int(self.input_shape_[1]), int(self.input_shape_[2]))

    def _build(self) -> None:
        h, w = self.internal_size
        if h != w:
            raise ConfigError(f"cyclunet: the UNet needs square images, got {h} x {w} (set image_size)")
        resolve_channel_mult(self.config.channel_mult, h)
        kwargs = unet_kwargs(self.config)
        self.forward_net = LiangUNet(1, 1, h, **kwargs).to(self.device).eval()
        self.backward_net = LiangUNet(1, 1, h, **kwargs).to(self.device).eval()
        self.notes.setdefault("internal_resolution", [h, w])

    def networks(self) -> dict[str, nn.Module]:
        if self.forward_net is None or self.backward_net is None:
            return {}
        return {"forward": self.forward_net, "backward": self.backward_net}

    def cost_plan(self, n_train: int, n_val: int):
        from methods.cost import CostPlan, Evaluations, Stage, endless_phase

        c, (h, w) = self.config, self.internal_size

        def probe(net: nn.Module):
            return lambda: net(torch.zeros(1, 1, h, w, device=self.device))

        plan = CostPlan(stages=[Stage("forward", "forward", probe(self.forward_net)), Stage("backward", "backward", probe(self.backward_net))])
        plan.score += [Evaluations("forward", 1), Evaluations("backward", 1)]  # G(F(x_A))
        plan.train += [endless_phase(name, int(c.steps), n_train, int(c.batch_size), "steps") for name in ("forward", "backward")]
        return plan

    def _to_units(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if tuple(x.shape[-2:]) != self.internal_size:
            x = F.interpolate(x, size=self.internal_size, mode="area")
        return self.config.unit_scale * x + self.config.unit_offset

    # ------------------------------------------------------------------ fit
    def _fit(self, train: SliceSet, val: SliceSet | None) -> None:
        if train.images.shape[1] != 2 or len(train.modalities) != 2:
            raise ValueError(
                f"cyclunet: fit needs paired slices [A, B] (input and intermediate modality) as two channels, "
                f"got modalities {train.modalities}; the runner builds them from training_modalities(A)"
            )
        a, b = train.modalities
        expected = intermediate_for(a, self.config.intermediate_modality)
        if b != expected:
            raise ValueError(f"cyclunet: for input {a!r} the intermediate modality is {expected!r}, but fit got {b!r}")
        self.input_shape_ = (1, *train.images.shape[2:])  # score sees A only
        self.notes["input_modality"], self.notes["intermediate_modality"] = a, b
        self._build()
        c = self.config
        device = self.device
        gen = torch.Generator().manual_seed(c.seed)
        for net in (self.forward_net, self.backward_net):
            to_channels_last(net, device, c.channels_last)
        forward_net, backward_net = (compile_forward(net, device, c.compile) for net in (self.forward_net, self.backward_net))

        def read(index: np.ndarray) -> tuple[np.ndarray]:
            return (np.asarray(train.images[index], dtype=np.float32),)

        def mse(net, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            with train_autocast(device, c.train_amp):
                out = net(source)
            return F.mse_loss(out.float(), target)

        def loss_forward(batch) -> torch.Tensor:
            u = self._to_units(batch[1][0])
            return mse(forward_net, u[:, :1], u[:, 1:])

        def loss_backward(batch) -> torch.Tensor:
            u = self._to_units(batch[1][0])
            return mse(backward_net, u[:, 1:], u[:, :1])

        schedule = dict(lr=c.lr, weight_decay=c.weight_decay, lr_decay_steps=c.lr_decay_steps, lr_decay_factor=c.lr_decay_factor)
        for name, net, loss in (("forward", self.forward_net, loss_forward), ("backward", self.backward_net, loss_backward)):
            batches = prefetch_endless(read, lambda: epoch_batches(len(train), c.batch_size, gen), device)
            losses = train_steps(net, loss, batches, c.steps, desc=f"fit cyclunet {name}", log_every=c.log_every, **schedule)
            batches.close()
            self.notes[f"{name}_final_mse"] = float(np.mean(losses[-10:])) if losses else None

    # ------------------------------------------------------------------ scoring
    def _reconstruct_batch(self, images: torch.Tensor, brain_masks: torch.Tensor) -> torch.Tensor:
        assert self.forward_net is not None and self.backward_net is not None
        u = self._to_units(images)
        cycle = (self.backward_net(self.forward_net(u)) - self.config.unit_offset) / self.config.unit_scale
        if tuple(cycle.shape[-2:]) != tuple(images.shape[-2:]):
            cycle = F.interpolate(cycle, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return cycle

    def _score_batch(self, images: torch.Tensor, brain_masks: torch.Tensor) -> torch.Tensor:
        # (u - G(F(u)))^2 / unit_scale^2 is (x - cycle)^2 in data units
        u = self._to_units(images)
        err = ((u - self.backward_net(self.forward_net(u))) / self.config.unit_scale) ** 2  # type: ignore[misc]
        if tuple(err.shape[-2:]) != tuple(images.shape[-2:]):
            err = F.interpolate(err, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return err[:, 0] * erode(brain_masks, int(self.config.brain_erosion_radius))


def erode(brain_masks: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary erosion of ``B x H x W`` masks by a disk (skimage ``disk(radius)``: y^2 + x^2 <= r^2).

    Pixels beyond the image border count as brain, as in skimage's ``erosion``.
    """
    brain = (brain_masks > 0.5).float()
    if radius <= 0:
        return brain
    yy, xx = torch.meshgrid(torch.arange(-radius, radius + 1), torch.arange(-radius, radius + 1), indexing="ij")
    disk = ((yy**2 + xx**2) <= radius**2).float().to(brain)
    padded = F.pad(brain[:, None], (radius,) * 4, value=1.0)
    hits = F.conv2d(padded, disk[None, None])
    return (hits[:, 0] >= disk.sum() - 0.5).float()
