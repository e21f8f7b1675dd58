"""IterMask2 (Liang, Guo, Noble, Kamnitsas, MICCAI 2024; ZiyunLiang/IterMask2).

Two UNets without time input. ``net0`` ("first_iter") maps the frequency-masked image
hp(x) to x; ``net1`` ("masked_autoencoder") maps [x with masked pixels replaced by N(0, 1)
noise, hp(x)] to x. Both are trained with MSE over the whole image.

Threshold: tau is the 80th percentile of net1's squared error over the masked pixels of
the healthy validation slices, each masked by the training sampler.

Scoring, per image (``models/test_model.py``, ``iter_mask_refinement``):
e = (x - net0(hp x))^2 in the brain; M = the top 60 % of the brain by e; repeat
{ y = net1([x (1 - M) + noise M, hp x]); M' = brain & (M (x - y))^2 > tau } until M
shrinks by less than 1 % (or the iteration cap); the map is (x - y)^2 in the brain, with
y the last reconstruction.

Units: the authors scale each volume so that its brain's 2nd..90th percentile spans
[-3, 3] with a background of 0 mapped to -3, i.e. u = 6 x / p90 - 3. Our S2 data are
x / p90 with background 0, so the model works in u = ``unit_scale`` x + ``unit_offset``
= 6 x - 3; noise is N(0, 1) in u, tau is in u^2 and maps are returned in data units,
((u - y) / 6)^2.
"""

from __future__ import annotations

import zlib
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
from methods.itermask2.frequency import high_pass_phase
from methods.itermask2.masks import MaskSamplerConfig, masked_error_threshold, sample_training_masks, top_fraction_mask
from methods.registry import register_method


#: net1 passes per scored image in the cost estimate (``cost_plan``): the refinement stops when
#: the mask shrinks by < 1 %, so the count depends on the image; the mean over the shipped S2
#: quick runs (embedded data, seed 0) was 10.4 .. 13.1 per modality. ``max_iterations`` bounds it.
TYPICAL_NET1_PASSES = 12


@dataclass
class IterMask2Config(MethodConfig):
    # network (config/brats_configs.py, models/unet.py, models/nn.py: BatchNorm)
    model_channels: int = 32
    channel_mult: tuple[int, ...] | None = None  # None: the authors' table, (1, 1, 2, 3, 4) at 128 px
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    num_heads: int = 1
    dropout: float = 0.1
    norm: str = "batch"  # the authors' IterMask2 code; "group" = MMCCD's GroupNorm(16)
    norm_groups: int = 16
    image_size: int | None = None  # internal resolution; None = the data's (S2: 128, as theirs)
    # units: u = unit_scale * x + unit_offset (x / p90 -> 6 x / p90 - 3)
    unit_scale: float = 6.0
    unit_offset: float = -3.0
    # frequency and spatial masks (utils/train_util.py, datasets/brats2021.py)
    hp_radius: float = 15.0  # frequency-index units (cycles per field of view)
    mask_grid_size: int = 240
    mask_square_sizes: tuple[int, ...] = (4, 8, 16)
    # training (utils/train_util.py; test.py loads model090000.pt of a 150k-step run)
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 32
    steps: int = 90_000
    lr_decay_steps: int = 150_000
    lr_decay_factor: float = 0.1
    tau_percentile: float = 80.0
    # scoring (models/test_model.py)
    first_mask_fraction: float = inference_field(0.6)
    stop_ratio: float = inference_field(0.01)
    max_iterations: int = inference_field(100)  # ours: the authors loop until the 1 % rule holds


@register_method("itermask2")
class IterMask2(UADMethod):
    """IterMask2: frequency-conditioned masked reconstruction with iterative mask shrinking."""

    Config = IterMask2Config
    config: IterMask2Config
    profiles = {
        # The authors' run: 90,000 AdamW steps of batch 32 per network at lr 1e-4.
        "paper": {},
        # Same algorithm at 64 px (the authors' 64-px channel_mult (1, 2, 3, 4)) at a quarter of the
        # width, without the 32-px attention (it dominates CPU time); minutes on 2 CPU cores.
        "quick": {
            "image_size": 64,
            "model_channels": 8,
            "attention_resolutions": (16, 8),
            "steps": 120,
            "batch_size": 8,
            "lr": 1e-3,
            "max_iterations": 30,
        },
        # For the conformance test: seconds on a CPU.
        "tiny": {
            "image_size": 32,
            "model_channels": 8,
            "channel_mult": (1, 2),
            "num_res_blocks": 1,
            "attention_resolutions": (16,),
            "steps": 3,
            "batch_size": 4,
            "max_iterations": 5,
        },
    }

    def __init__(self, config: IterMask2Config | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self.net0: LiangUNet | None = None
        self.net1: LiangUNet | None = None
        self.tau_: float | None = None
        self.iterations_: np.ndarray = np.zeros(0, dtype=np.int64)  # net1 passes per image, last score() call
        self.capped_: np.ndarray = np.zeros(0, dtype=bool)  # which of them stopped at max_iterations
        self._iteration_log: list[np.ndarray] | None = None

    @classmethod
    def dry_run_overrides(cls, config: MethodConfig) -> dict[str, Any]:
        """Two optimiser steps of batch 2 per network; at most two mask refinements per slice."""
        return {
            **super().dry_run_overrides(config),
            "steps": DRY_RUN_STEPS,
            "batch_size": DRY_RUN_BATCH,
            "max_iterations": min(int(config.max_iterations), DRY_RUN_STEPS),
        }

    # ------------------------------------------------------------------ construction
    @property
    def internal_size(self) -> tuple[int, int]:
        if self.config.image_size is not None:
            return (int(self.config.image_size),) * 2
        if self.input_shape_ is None:
            raise RuntimeError("internal size unknown before fit/load")
        return (int(self.input_shape_[1]), int(self.input_shape_[2]))

    def _validate(self) -> None:
        c = self.config
        h, w = self.internal_size
        if h != w:
            raise ConfigError(f"itermask2: the UNet needs square images, got {h} x {w} (set image_size)")
        resolve_channel_mult(c.channel_mult, h)  # fails early, naming the fix
        if not 0 < c.first_mask_fraction <= 1:
            raise ConfigError(f"itermask2: first_mask_fraction must be in (0, 1], got {c.first_mask_fraction}")
        if c.max_iterations < 1:
            raise ConfigError(f"itermask2: max_iterations must be >= 1, got {c.max_iterations}")
        if not 0 < c.tau_percentile < 100:
            raise ConfigError(f"itermask2: tau_percentile must be in (0, 100), got {c.tau_percentile}")
        if len(c.mask_square_sizes) != 3:
            raise ConfigError(f"itermask2: mask_square_sizes needs three sizes (small, medium, large), got {c.mask_square_sizes}")

    def _build(self) -> None:
        self._validate()
        channels = int(self.input_shape_[0])  # type: ignore[index]
        size = self.internal_size[0]
        kwargs = unet_kwargs(self.config)
        self.net0 = LiangUNet(channels, channels, size, **kwargs).to(self.device).eval()
        self.net1 = LiangUNet(2 * channels, channels, size, **kwargs).to(self.device).eval()
        self.notes.setdefault("internal_resolution", list(self.internal_size))
        self.notes.setdefault(
            "units",
            f"model units u = {self.config.unit_scale} x + {self.config.unit_offset} (x / p90 -> the authors' 6 x / p90 - 3); "
            "noise N(0, 1) and tau in u; maps ((u - y) / unit_scale)^2 in data units",
        )

    def networks(self) -> dict[str, nn.Module]:
        if self.net0 is None or self.net1 is None:
            return {}
        return {"net0": self.net0, "net1": self.net1}

    def extra_state(self) -> dict[str, Any]:
        return {"tau": self.tau_}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.tau_ = state.get("tau")

    def cost_plan(self, n_train: int, n_val: int):
        from methods.cost import CostPlan, Evaluations, Stage, endless_phase

        c, channels, (h, w) = self.config, int(self.input_shape_[0]), self.internal_size  # type: ignore[index]
        plan = CostPlan(
            stages=[
                Stage("net0", "net0", lambda: self.net0(torch.zeros(1, channels, h, w, device=self.device))),
                Stage("net1", "net1", lambda: self.net1(torch.zeros(1, 2 * channels, h, w, device=self.device))),
            ]
        )
        passes = min(TYPICAL_NET1_PASSES, int(c.max_iterations))
        plan.score += [
            Evaluations("net0", 1),
            Evaluations("net1", passes, f"data-dependent: {passes} typical (mean of the embedded S2 quick runs), at most max_iterations", bound=int(c.max_iterations)),
        ]
        plan.train += [endless_phase(name, int(c.steps), n_train, int(c.batch_size), "steps") for name in ("net0", "net1")]
        if n_val > 0:
            plan.fit_forward.append(Evaluations("net1", n_val, "tau: one masked pass per validation slice"))
        return plan

    # ------------------------------------------------------------------ units
    def _to_units(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if tuple(x.shape[-2:]) != self.internal_size:
            x = F.interpolate(x, size=self.internal_size, mode="area")
        return self.config.unit_scale * x + self.config.unit_offset

    def _brain(self, brain_masks: torch.Tensor) -> torch.Tensor:
        b = brain_masks.float()[:, None]
        if tuple(b.shape[-2:]) != self.internal_size:
            b = F.interpolate(b, size=self.internal_size, mode="nearest")
        return (b > 0.5).float()

    def _load(self, data: SliceSet, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self._prepare(*(torch.from_numpy(a).to(self.device) for a in self._read(data, index)))

    @staticmethod
    def _read(data: SliceSet, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(data.images[index], dtype=np.float32), np.asarray(data.brain_masks[index])

    def _prepare(self, x: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._to_units(x), self._brain(b)

    def _sampler(self) -> MaskSamplerConfig:
        return MaskSamplerConfig(int(self.config.mask_grid_size), tuple(int(s) for s in self.config.mask_square_sizes))  # type: ignore[arg-type]

    def _masked_input(self, u: torch.Tensor, hp: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return torch.cat([(1 - mask) * u + mask * noise, hp], dim=1)

    # ------------------------------------------------------------------ fit
    def _fit(self, train: SliceSet, val: SliceSet | None) -> None:
        if val is None or len(val) == 0:
            raise ValueError(
                "itermask2: fit needs the healthy validation split `val` (tau is the 80th percentile of "
                "net1's masked error on it); pass fit(train, val)"
            )
        if int(np.asarray(val.lesion_areas()).sum()) > 0:
            raise ValueError("itermask2: the validation slices that set tau must be healthy, but some carry lesion pixels")
        self._build()
        c = self.config
        rng = np.random.default_rng(c.seed)
        gen = torch.Generator().manual_seed(c.seed)
        sampler, radius = self._sampler(), float(c.hp_radius)
        device = self.device
        for net in (self.net0, self.net1):
            to_channels_last(net, device, c.channels_last)
        net0, net1 = (compile_forward(net, device, c.compile) for net in (self.net0, self.net1))

        def mse(net, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            with train_autocast(device, c.train_amp):
                out = net(inputs)
            return F.mse_loss(out.float(), target)

        def loss_net0(batch) -> torch.Tensor:
            u, _ = self._prepare(*batch[1])
            return mse(net0, high_pass_phase(u, radius), u)

        def loss_net1(batch) -> torch.Tensor:
            u, brain = self._prepare(*batch[1])
            mask = sample_training_masks(brain[:, 0], self.internal_size, rng, sampler)
            noise = torch.randn(u.shape, generator=gen).to(u)
            return mse(net1, self._masked_input(u, high_pass_phase(u, radius), mask, noise), u)

        schedule = dict(lr=c.lr, weight_decay=c.weight_decay, lr_decay_steps=c.lr_decay_steps, lr_decay_factor=c.lr_decay_factor)
        for name, net, loss in (("net0", self.net0, loss_net0), ("net1", self.net1, loss_net1)):
            batches = prefetch_endless(lambda index: self._read(train, index), lambda: epoch_batches(len(train), c.batch_size, gen), device)
            losses = train_steps(net, loss, batches, c.steps, desc=f"fit itermask2 {name}", log_every=c.log_every, **schedule)
            batches.close()
            self.notes[f"{name}_final_mse"] = float(np.mean(losses[-10:])) if losses else None
        self.tau_ = self._fit_tau(val, rng, gen)
        self.notes["tau"] = self.tau_

    @torch.no_grad()
    def _fit_tau(self, val: SliceSet, rng: np.random.Generator, gen: torch.Generator) -> float:
        """The authors' ``validation_thres``: one training-style mask per healthy val slice."""
        assert self.net1 is not None
        self.net1.eval()
        errors, masks = [], []
        for start in range(0, len(val), max(1, self.config.score_batch_size)):
            index = np.arange(start, min(start + self.config.score_batch_size, len(val)))
            u, brain = self._load(val, index)
            mask = sample_training_masks(brain[:, 0], self.internal_size, rng, self._sampler())
            noise = torch.randn(u.shape, generator=gen).to(u)
            y = self.net1(self._masked_input(u, high_pass_phase(u, self.config.hp_radius), mask, noise))
            errors.append(((u - y) ** 2).mean(dim=1, keepdim=True).cpu())
            masks.append(mask.cpu())
        return masked_error_threshold(torch.cat(errors), torch.cat(masks), self.config.tau_percentile)

    # ------------------------------------------------------------------ scoring
    def _noise_generators(self, images: torch.Tensor) -> list[torch.Generator]:
        """One generator per image, seeded by the seed and the image's bytes: maps do not depend on batching."""
        data = images.detach().float().cpu().numpy()
        return [torch.Generator().manual_seed(int(self.config.seed) * 1_000_003 + zlib.crc32(img.tobytes())) for img in data]

    def _refine(
        self, images: torch.Tensor, brain_masks: torch.Tensor, trace: list | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
        """The iterative mask refinement: (u, final y, brain, net1 passes per image, stopped by the cap).

        ``trace``, if given, receives ``(active indices, M, M')`` for every net1 pass.
        """
        assert self.net0 is not None and self.net1 is not None
        if self.tau_ is None:
            raise RuntimeError("itermask2: tau is not set; fit() or load() first")
        c = self.config
        u, brain = self._to_units(images), self._brain(brain_masks)
        hp = high_pass_phase(u, c.hp_radius)
        first = ((u - self.net0(hp)) ** 2).mean(dim=1, keepdim=True) * brain
        mask = top_fraction_mask(first, brain, c.first_mask_fraction)
        gens = self._noise_generators(images)
        y_final = torch.zeros_like(u)
        passes = np.zeros(len(u), dtype=np.int64)
        capped = np.zeros(len(u), dtype=bool)
        active = np.arange(len(u))
        while active.size:
            noise = torch.stack([torch.randn(u.shape[1:], generator=gens[i]) for i in active]).to(u)
            m = mask[active]
            y = self.net1(self._masked_input(u[active], hp[active], m, noise))
            shrunk = brain[active] * (((m * (u[active] - y)) ** 2).mean(dim=1, keepdim=True) > self.tau_).float()
            passes[active] += 1
            if trace is not None:
                trace.append((active.copy(), m.clone(), shrunk.clone()))
            old, new = m.sum(dim=(1, 2, 3)), shrunk.sum(dim=(1, 2, 3))
            ratio = torch.where(old > 0, (old - new) / old.clamp_min(1e-12), torch.full_like(old, -1.0))
            converged = (ratio < c.stop_ratio).cpu().numpy()
            stop = converged | (passes[active] >= c.max_iterations)
            capped[active[stop & ~converged]] = True
            y_final[active[stop]] = y[torch.from_numpy(stop).to(y.device)]
            keep = ~stop
            mask[active[keep]] = shrunk[torch.from_numpy(keep).to(y.device)]
            active = active[keep]
        return u, y_final, brain, passes, capped

    def _score_batch(self, images: torch.Tensor, brain_masks: torch.Tensor) -> torch.Tensor:
        u, y, brain, passes, capped = self._refine(images, brain_masks)
        if self._iteration_log is not None:
            self._iteration_log.append(np.stack([passes, capped]))
        err = ((u - y) / self.config.unit_scale) ** 2 * brain
        err = err.mean(dim=1, keepdim=True)
        if tuple(err.shape[-2:]) != tuple(images.shape[-2:]):
            err = F.interpolate(err, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return err[:, 0]

    def _reconstruct_batch(self, images: torch.Tensor, brain_masks: torch.Tensor) -> torch.Tensor:
        _, y, _, _, _ = self._refine(images, brain_masks)
        x = (y - self.config.unit_offset) / self.config.unit_scale
        if tuple(x.shape[-2:]) != tuple(images.shape[-2:]):
            x = F.interpolate(x, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return x

    def score(self, images: Any, brain_masks: Any, progress: bool = False) -> torch.Tensor:
        """Anomaly maps; also records the net1 passes per image (``iterations_``, ``notes``)."""
        self._iteration_log = []
        try:
            maps = super().score(images, brain_masks, progress=progress)
            log = np.concatenate(self._iteration_log, axis=1) if self._iteration_log else np.zeros((2, 0), dtype=np.int64)
        finally:
            self._iteration_log = None
        self.iterations_, self.capped_ = log[0], log[1].astype(bool)
        self._note_iterations(self.iterations_, self.capped_)
        return maps

    def _note_iterations(self, passes: np.ndarray, capped: np.ndarray) -> None:
        cap = int(self.config.max_iterations)
        values, counts = np.unique(passes, return_counts=True)
        summary = {
            "n_images": int(passes.size),
            "cap": cap,
            "cap_hits": int(capped.sum()),  # stopped by the cap, not by the 1 % rule
            "mean": float(passes.mean()) if passes.size else None,
            "max": int(passes.max()) if passes.size else None,
            "histogram": {str(int(v)): int(n) for v, n in zip(values, counts)},
        }
        log = self.notes.setdefault("iterations_per_score_call", [])
        log.append(summary)
        del log[:-8]  # the runner scores test, then validation; keep the last few calls
