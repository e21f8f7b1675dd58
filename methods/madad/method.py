"""MAD-AD: masked latent diffusion for unsupervised brain anomaly detection
(Beizaee et al., IPMI 2025). See methods/madad/README.md for every choice.

Pipeline: slices -> internal resolution -> VAE latents (frozen VAE) -> a UNet trained on
the masked forward process (eq. 2) to predict z0 and the mask -> at test time masked DDIM
from ``z_T = E(x)`` (eqs. 6-7) -> decode -> eq. 8 map -> back to the input size.
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from datasets.format import SliceSet
from methods.base import DRY_RUN_BATCH, DRY_RUN_STEPS, ConfigError, MethodConfig, UADMethod
from methods.common.accel import compile_forward, configure_backends, prefetch_epoch, to_channels_last, train_autocast
from methods.common.loss_meter import LossMeter
from methods.madad import anomaly
from methods.madad.augment import augment
from methods.madad.config import (
    BRAIN_RULES,
    CHECKPOINTS,
    DDIM_SPACINGS,
    LATENT_NORM_REGIONS,
    LATENT_NORMS,
    LR_SCHEDULES,
    MASK_LOSSES,
    PROFILES,
    REFERENCES,
    SCHEDULES,
    SOURCES,
    STARTS,
    MadadConfig,
)
from methods.madad.forward import alphas_cumprod, masked_q_sample
from methods.madad.masking import latent_brain_mask, restrict_to_brain, sample_patch_masks
from methods.madad.sampler import MaskedDDIMOutput, ddim_timesteps, masked_ddim
from methods.madad.unet import MaskedDenoiser
from methods.madad.vae import SD_SCALING_FACTOR, build_vae, encode_stats, load_pretrained_grey_vae, train_vae, vae_arch
from methods.progress import progress_bar
from methods.registry import register_method


def latent_affine(sample: torch.Tensor, norm: str, cells: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, A) so that ``A (z - mean)`` has zero mean and, per channel ("channel"), unit
    std or ("whiten", ZCA) identity channel covariance over the ``N x C x h x w`` sample,
    counting only the cells where ``cells`` (``N x 1 x h x w``, bool) is set (all if None)."""
    flat = sample.double().permute(1, 0, 2, 3).reshape(sample.shape[1], -1)  # C x (N h w)
    if cells is not None:
        flat = flat[:, cells.permute(1, 0, 2, 3).reshape(-1).bool()]
    mean = flat.mean(1)
    if norm == "channel":
        matrix = torch.diag(1.0 / flat.std(1).clamp(min=1e-6))
    else:
        eigval, eigvec = torch.linalg.eigh(torch.cov(flat))
        # bounded gain: a (near-)collapsed latent direction is amplified at most 1000x more than the widest
        eigval = eigval.clamp(min=1e-6 * float(eigval.max().clamp(min=1e-12)))
        matrix = eigvec @ torch.diag(eigval.rsqrt()) @ eigvec.T
    return mean.float(), matrix.float()


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"madad: {name} must be one of {allowed}, got {value!r}")


@register_method("madad")
class MADAD(UADMethod):
    """Masked latent diffusion; maps are higher = more anomalous."""

    Config = MadadConfig
    profiles = PROFILES

    def __init__(self, config: Optional[MadadConfig] = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self.vae: Optional[nn.Module] = None
        self.denoiser: Optional[MaskedDenoiser] = None
        self.latent_scale_: Optional[float] = None
        # affine of latent_norm "channel"/"whiten": z -> A (z - mean) (None: only latent_scale_)
        self.latent_mean_: Optional[torch.Tensor] = None
        self.latent_matrix_: Optional[torch.Tensor] = None  # A, C x C (diagonal for "channel")
        self.latent_inverse_: Optional[torch.Tensor] = None  # A^-1, computed once when A is set
        self._score_index = 0  # running slice index within one score() call (noise seeds)

    @classmethod
    def dry_run_overrides(cls, config: MethodConfig) -> dict[str, Any]:
        """One VAE epoch (or fine-tuning epoch), two denoiser epochs of batch 2 with a validation
        after the second (the authors' schedule skips epoch 0), and two DDIM steps."""
        c = config
        return {
            **super().dry_run_overrides(config),
            "vae_epochs": 1,
            "vae_finetune_epochs": min(int(c.vae_finetune_epochs), 1),  # 0 (adapt only) stays 0
            "vae_batch_size": DRY_RUN_BATCH,
            "vae_adversarial_start_epoch": 0 if c.vae_adversarial_weight else c.vae_adversarial_start_epoch,
            "epochs": 2,
            "batch_size": DRY_RUN_BATCH,
            "warmup_epochs": min(int(c.warmup_epochs), 1),
            "val_every": 1,
            "ddim_steps": min(int(c.ddim_steps), DRY_RUN_STEPS),
            "log_every": 1,
        }

    # ------------------------------------------------------------------ config checks
    def _check_config(self) -> None:
        c = self.config
        _choice("schedule", c.schedule, SCHEDULES)
        _choice("mask_loss", c.mask_loss, MASK_LOSSES)
        _choice("brain_restriction", c.brain_restriction, BRAIN_RULES)
        _choice("inference_start", c.inference_start, STARTS)
        _choice("train_latent", c.train_latent, STARTS)
        _choice("anomaly_source", c.anomaly_source, SOURCES)
        _choice("map_reference", c.map_reference, REFERENCES)
        _choice("lr_schedule", c.lr_schedule, LR_SCHEDULES)
        _choice("latent_norm", c.latent_norm, LATENT_NORMS)
        _choice("latent_norm_region", c.latent_norm_region, LATENT_NORM_REGIONS)
        _choice("checkpoint", c.checkpoint, CHECKPOINTS)
        _choice("ddim_spacing", c.ddim_spacing, DDIM_SPACINGS)
        if c.val_every < 1:  # log_every is checked by the base class, for every method
            raise ConfigError(f"madad: val_every must be >= 1, got {c.val_every}")
        factor = 2 ** (len(c.vae_block_out_channels) - 1)
        if c.image_size % factor:
            raise ConfigError(f"madad: image_size {c.image_size} must be divisible by the VAE factor {factor}")
        if c.vae_perceptual_weight > 0:
            raise ConfigError(
                "madad: vae_perceptual_weight > 0 needs LPIPS weights, which cannot be downloaded here; "
                "leave it at 0 (reconstruction + KL, optionally vae_adversarial_weight)"
            )
        try:
            ddim_timesteps(c.timesteps, c.ddim_steps, c.ddim_spacing)
        except ValueError as err:
            raise ConfigError(f"madad: {err}") from err
        anomaly.gaussian_sigma_check(c.smoothing_sigma)

    # ------------------------------------------------------------------ geometry helpers
    @property
    def _vae_factor(self) -> int:
        arch = self.notes.get("vae_arch") or {"block_out_channels": self.config.vae_block_out_channels}
        return 2 ** (len(arch["block_out_channels"]) - 1)

    @property
    def _latent_hw(self) -> tuple[int, int]:
        s = self.config.image_size // self._vae_factor
        return s, s

    def _to_vae(self, x: torch.Tensor) -> torch.Tensor:
        """Data (``B x C x H x W``) -> VAE input: internal resolution, [-1, 1]."""
        lo, hi = self.config.data_range
        x = (x - lo) / (hi - lo) * 2 - 1
        return anomaly.resample(x, (self.config.image_size, self.config.image_size))

    def _from_vae(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        lo, hi = self.config.data_range
        return anomaly.resample((x + 1) / 2 * (hi - lo) + lo, size)

    def _brain_internal(self, brain: torch.Tensor) -> torch.Tensor:
        s = self.config.image_size
        return anomaly.resample(brain.float().unsqueeze(1), (s, s))[:, 0]

    # ------------------------------------------------------------------ networks
    def _vae_arch_from_config(self) -> dict[str, Any]:
        c = self.config
        return {
            "block_out_channels": list(c.vae_block_out_channels),
            "layers_per_block": c.vae_layers_per_block,
            "latent_channels": c.vae_latent_channels,
            "norm_num_groups": c.vae_norm_groups,
            "sample_size": c.image_size,
        }

    def _make_denoiser(self, latent_channels: int) -> MaskedDenoiser:
        c = self.config
        return MaskedDenoiser(
            latent_channels=latent_channels,
            sample_size=self._latent_hw[0],
            block_out_channels=c.unet_block_out_channels,
            layers_per_block=c.unet_layers_per_block,
            attention_levels=tuple(bool(a) for a in c.unet_attention_levels),
            attention_head_dim=c.unet_attention_head_dim,
            norm_groups=c.unet_norm_groups,
            dropout=c.dropout,
            zero_init=c.mask_head_zero_init,
            silu=c.mask_head_silu,
        )

    def _build(self) -> None:
        self._check_config()
        if self.input_shape_ is None:
            raise RuntimeError("madad: _build needs input_shape_ (set by fit or load)")
        channels = self.input_shape_[0]
        arch = self.notes.get("vae_arch") or self._vae_arch_from_config()
        self.vae = build_vae(arch, in_channels=channels).to(self.device).eval()
        self.vae.requires_grad_(False)
        self.denoiser = self._make_denoiser(int(arch["latent_channels"])).to(self.device)
        self.abar = alphas_cumprod(self.config.schedule, self.config.timesteps)

    def cost_plan(self, n_train: int, n_val: int):
        from methods.cost import CostPlan, Evaluations, Stage, epoch_phase

        c, device = self.config, self.device
        channels, latent = int(self.input_shape_[0]), int(self.vae.config.latent_channels)
        s, (h, w) = c.image_size, self._latent_hw
        plan = CostPlan(
            stages=[
                Stage("encoder", "vae.encoder", lambda: self.vae.encode(torch.zeros(1, channels, s, s, device=device))),
                Stage("decoder", "vae.decoder", lambda: self.vae.decode(torch.zeros(1, latent, h, w, device=device))),
                Stage("denoiser", "denoiser", lambda: self.denoiser(torch.zeros(1, latent, h, w, device=device), torch.zeros(1, dtype=torch.long, device=device))),
            ]
        )
        decodes = 1 + int(c.anomaly_source == "image_diff" and c.map_reference == "vae_reconstruction")  # + D(E(x))
        plan.score += [Evaluations("encoder", 1), Evaluations("denoiser", int(c.ddim_steps)), Evaluations("decoder", decodes)]
        vae_epochs = int(c.vae_finetune_epochs if c.vae_path else c.vae_epochs)
        plan.train += [epoch_phase(stage, vae_epochs, n_train, c.vae_batch_size, what="VAE epochs") for stage in ("encoder", "decoder")]
        if c.vae_adversarial_weight > 0:
            plan.notes.append("the VAE's patch discriminator is not counted")
        plan.train.append(epoch_phase("denoiser", int(c.epochs), n_train, c.batch_size, what="denoiser epochs"))
        plan.fit_forward.append(Evaluations("encoder", n_train, "latents of the training set"))
        if c.aug_p > 0:  # augmented batches are re-encoded at every step
            plan.fit_forward.append(Evaluations("encoder", int(c.epochs) * n_train, "re-encoding augmented batches"))
        if c.checkpoint == "best_val_mse" and n_val > 0:
            validations = sum(1 for epoch in range(int(c.epochs)) if epoch % c.val_every == 0 and epoch != 0)
            plan.fit_forward += [
                Evaluations("encoder", n_val, "latents of the validation set"),
                Evaluations("denoiser", validations * n_val, f"{validations} validations x {n_val} slices"),
            ]
        return plan

    def networks(self) -> dict[str, nn.Module]:
        if self.vae is None or self.denoiser is None:
            return {}
        return {"vae": self.vae, "denoiser": self.denoiser}

    def extra_state(self) -> dict[str, Any]:
        as_list = lambda t: None if t is None else t.tolist()  # noqa: E731
        return {"latent_scale": self.latent_scale_, "latent_mean": as_list(self.latent_mean_), "latent_matrix": as_list(self.latent_matrix_)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.latent_scale_ = float(state["latent_scale"])
        as_tensor = lambda v: None if v is None else torch.tensor(v, dtype=torch.float32)  # noqa: E731
        matrix = as_tensor(state.get("latent_matrix"))
        if matrix is None and state.get("latent_std") is not None:  # checkpoints before "whiten"
            matrix = torch.diag(1.0 / as_tensor(state["latent_std"]))
        self._set_latent_affine(as_tensor(state.get("latent_mean")), matrix)

    # ------------------------------------------------------------------ latent normalisation
    def _set_latent_affine(self, mean: Optional[torch.Tensor], matrix: Optional[torch.Tensor]) -> None:
        """Store ``z -> A (z - mean)`` and its inverse (one float64 inversion, here only)."""
        self.latent_mean_, self.latent_matrix_ = mean, matrix
        self.latent_inverse_ = None if matrix is None else torch.linalg.inv(matrix.double()).float()

    @staticmethod
    def _mix(matrix: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Apply a C x C matrix to the channels of ``B x C x h x w`` latents."""
        return torch.einsum("dc,bchw->bdhw", matrix.to(z), z)

    def _normalise(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latent -> diffusion latent: ``A (z - mean) * latent_scale_``, in float32 even
        under autocast (the diffusion state is never rounded to bf16)."""
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            if self.latent_mean_ is not None:
                z = self._mix(self.latent_matrix_, z - self.latent_mean_.to(z).view(1, -1, 1, 1))
            return z * self.latent_scale_

    def _denormalise(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of ``_normalise`` (what the VAE decoder takes), float32."""
        with torch.autocast(z.device.type, enabled=False):
            z = z.float() / self.latent_scale_
            if self.latent_mean_ is not None:
                z = self._mix(self.latent_inverse_, z) + self.latent_mean_.to(z).view(1, -1, 1, 1)
            return z

    # ------------------------------------------------------------------ training
    def _batch(self, data: SliceSet, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.asarray(data.images[idx], dtype=np.float32))
        b = torch.from_numpy(np.asarray(data.brain_masks[idx], dtype=np.float32))
        return x, b

    def _train_autocast(self, device: torch.device):
        """bf16 autocast for network forward passes in training (CUDA and ``train_amp`` only)."""
        return train_autocast(device, self.config.train_amp)

    @staticmethod
    def _enable_tf32(device: torch.device) -> None:
        configure_backends(device)  # TF32 as the authors' train-MAD-AD.py, and cuDNN autotuning

    def _read(self, data: SliceSet):
        """Rows of ``data`` as the loader reads them (images, brain masks; float32)."""
        return lambda idx: (np.asarray(data.images[idx], dtype=np.float32), np.asarray(data.brain_masks[idx], dtype=np.float32))

    @property
    def _denoiser_forward(self):
        """The denoiser's forward pass (``torch.compile`` of it on CUDA with ``compile``); built once per network."""
        if getattr(self, "_compiled", None) is None or self._compiled[0] is not self.denoiser:
            self._compiled = (self.denoiser, compile_forward(self.denoiser, self.device, self.config.compile))
        return self._compiled[1]

    def _fit(self, train: SliceSet, val: Optional[SliceSet]) -> None:
        self._check_config()
        if self.config.checkpoint == "best_val_mse" and (val is None or len(val) == 0):
            raise ConfigError("madad: checkpoint='best_val_mse' keeps the weights with the best validation MSE and needs a validation set; pass val to fit() or use checkpoint='last'")
        self._enable_tf32(self.device)
        gen = torch.Generator().manual_seed(self.config.seed)
        self._fit_latent_space(train, gen)
        self._fit_denoiser(train, val, gen)

    def _fit_latent_space(self, train: SliceSet, gen: torch.Generator) -> None:
        """Step 1: the VAE (loaded [+ fine-tuned], or trained here), then frozen."""
        c = self.config
        device = self.device
        channels = self.input_shape_[0]
        t0 = time.perf_counter()
        if c.vae_path:
            if channels != 1:
                raise ConfigError(f"madad: a pretrained VAE is used with one-channel data; the data have {channels}")
            self.vae = load_pretrained_grey_vae(c.vae_path)
            epochs = c.vae_finetune_epochs
            self.notes["vae_source"] = f"pretrained:{c.vae_path}+finetune" if epochs > 0 else f"pretrained:{c.vae_path}"
        else:
            self.vae = build_vae(self._vae_arch_from_config(), in_channels=channels)
            epochs = c.vae_epochs
            self.notes["vae_source"] = "trained-from-scratch"
        self.notes["vae_arch"] = vae_arch(self.vae)
        self.notes["vae_epochs"] = epochs

        def vae_batches(epoch: int):
            order = list(self.iterate_minibatches(len(train), c.vae_batch_size, gen))
            for _, (x, _) in prefetch_epoch(self._read(train), order, device):
                yield self._to_vae(x)

        to_channels_last(self.vae.to(device), device, c.channels_last)
        history = train_vae(
            self.vae, vae_batches, epochs, c.vae_lr, c.vae_rec_loss, c.vae_kl_weight,
            c.vae_adversarial_weight, c.vae_adversarial_start_epoch, device, desc="madad vae", amp=c.train_amp,
        )
        self.vae.to(device).eval().requires_grad_(False)  # frozen from here on
        self.notes["vae_final_loss"] = history[-1] if history else None
        self.notes["vae_seconds"] = round(time.perf_counter() - t0, 2)

    def _encode_set(self, data: SliceSet) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and std of every slice, encoded in chunks of ``vae_batch_size``
        (on the device; float32)."""
        c = self.config
        device = self.device
        means, stds = [], []
        with torch.no_grad(), self._train_autocast(device):
            for start in range(0, len(data), c.vae_batch_size):
                idx = np.arange(start, min(start + c.vae_batch_size, len(data)))
                m, s = encode_stats(self.vae, self._to_vae(self._batch(data, idx)[0].to(device)))
                means.append(m.float())
                stds.append(s.float())
        return torch.cat(means), torch.cat(stds)

    def _allowed_cells(self, data: SliceSet) -> torch.Tensor:
        """``N x 1 x h x w`` (device): the latent cells each slice's training masks may noise."""
        c = self.config
        hw = self._latent_hw
        out = []
        for start in range(0, len(data), 256):
            brain = self._batch(data, np.arange(start, min(start + 256, len(data))))[1]
            ones = torch.ones(brain.shape[0], 1, *hw)
            out.append(restrict_to_brain(ones, brain, c.brain_restriction, c.latent_brain_threshold, c.brain_block_latent, c.brain_block_min_fraction))
        return torch.cat(out).to(self.device)

    def _fit_latent_norm(self, train: SliceSet, means: torch.Tensor, stds: torch.Tensor) -> None:
        """``latent_scale_`` and the affine of ``latent_norm``, fitted on one posterior sample
        per training slice, over the brain's latent cells (``latent_norm_region="brain"``)."""
        c = self.config
        self._set_latent_affine(None, None)
        if c.latent_scale is not None:
            self.latent_scale_ = float(c.latent_scale)
        elif c.vae_path:
            self.latent_scale_ = float(getattr(self.vae.config, "scaling_factor", SD_SCALING_FACTOR))
        else:  # LDM practice for a new VAE: unit-variance latents (per channel or one scalar)
            m, s = means.cpu(), stds.cpu()
            sample = (m + s * torch.randn(m.shape, generator=torch.Generator().manual_seed(c.seed)).to(m)).float()
            cells = None
            if c.latent_norm_region == "brain":
                brain = torch.cat([self._batch(train, np.arange(i, min(i + 256, len(train))))[1] for i in range(0, len(train), 256)])
                cells = latent_brain_mask(brain, self._latent_hw, c.latent_brain_threshold).bool()
                if int(cells.sum()) < 10 * sample.shape[1]:  # too few brain cells to fit C x C statistics
                    cells = None
                self.notes["latent_norm_cells"] = "all (too few brain cells)" if cells is None else int(cells.sum())
            if c.latent_norm == "global":
                values = sample if cells is None else sample[cells.expand_as(sample)]
                self.latent_scale_ = float(1.0 / values.std().clamp(min=1e-6))
            else:
                self._set_latent_affine(*latent_affine(sample, c.latent_norm, cells))
                self.latent_scale_ = 1.0
        self.notes["latent_scale"] = self.latent_scale_
        if self.latent_mean_ is not None:
            self.notes["latent_channel_mean"] = [round(float(v), 5) for v in self.latent_mean_]
            self.notes["latent_matrix"] = [[round(float(v), 5) for v in row] for row in self.latent_matrix_]

    def _fit_denoiser(self, train: SliceSet, val: Optional[SliceSet], gen: torch.Generator) -> None:
        """Steps 2-3 on the frozen VAE: latent normalisation, then the masked denoiser."""
        c = self.config
        device = self.device
        # 2. Latents of the training set (kept on the device unless augmentation re-encodes).
        means, stds = self._encode_set(train)
        self._fit_latent_norm(train, means, stds)
        cached = None if c.aug_p > 0 else (means, stds, self._allowed_cells(train))
        del means, stds
        val_set = None
        if c.checkpoint == "best_val_mse":
            val_set = (*self._encode_set(val), self._allowed_cells(val))

        # 3. Denoiser on the masked forward process.
        self.abar = alphas_cumprod(c.schedule, c.timesteps)
        latent_channels = int(self.notes["vae_arch"]["latent_channels"])
        self.denoiser = to_channels_last(self._make_denoiser(latent_channels).to(device), device, c.channels_last)
        ema = None
        if c.ema_decay > 0:
            ema = self._make_denoiser(latent_channels).to(device)
            ema.load_state_dict(self.denoiser.state_dict())
            ema.requires_grad_(False)
        t1 = time.perf_counter()
        self._train_denoiser(train, cached, val_set, gen, ema)
        if ema is not None:
            self.denoiser.load_state_dict(ema.state_dict())
        self.denoiser.eval()
        self.notes["denoiser_seconds"] = round(time.perf_counter() - t1, 2)

    def _lr_factor(self, epoch: int) -> float:
        c = self.config
        if epoch < c.warmup_epochs:
            return (epoch + 1) / (c.warmup_epochs + 1)
        if c.lr_schedule == "cosine":  # decays to 0 at 1.2 x epochs, as the authors' code
            total = max(1.0, 1.2 * c.epochs - c.warmup_epochs)
            return 0.5 * (1 + math.cos(math.pi * (epoch - c.warmup_epochs) / total))
        return 1.0

    def _denoiser_loss(
        self,
        model: nn.Module,
        z0: torch.Tensor,
        allowed: torch.Tensor,
        dgen: torch.Generator,
        size_gen: torch.Generator,
        ratio_max: float,
        probs: Optional[tuple[float, ...]],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Eq. 5 on one batch of diffusion latents ``z0`` (float32, on the device): draw the
        masks (restricted to ``allowed``), ``t ~ U{1..T}`` and the noise on ``dgen``'s device,
        noise with eq. 2 and feed the network ``t - 1`` (the index the sampler feeds for the
        same ``abar_t``). Returns ``(loss, mse, mask_term)``, float32 scalars."""
        c = self.config
        b = z0.shape[0]
        masks, _, _ = sample_patch_masks(
            b, self._latent_hw, dgen, (c.mask_ratio_min, ratio_max), c.patch_sizes, probs, c.patch_size_per, size_gen=size_gen
        )
        masks = masks.to(z0.device) * allowed
        t = torch.randint(1, c.timesteps + 1, (b,), generator=dgen, device=dgen.device).to(z0.device)
        noise = torch.randn(z0.shape, generator=dgen, device=dgen.device).to(z0.device)
        z_t = masked_q_sample(z0, t, masks, noise, self.abar)
        with self._train_autocast(z0.device):
            z0_hat, logits = model(z_t, t - 1)
        z0_hat, logits = z0_hat.float(), logits.float()
        mse = F.mse_loss(z0_hat, z0)
        if c.mask_loss == "bce":
            mask_term = F.binary_cross_entropy_with_logits(logits, masks)
        else:  # authors' code: MSE on the sigmoid output
            mask_term = F.mse_loss(torch.sigmoid(logits), masks)
        return mse + c.mask_loss_weight * mask_term, mse, mask_term

    def _diffusion_latents(self, mean: torch.Tensor, std: torch.Tensor, dgen: torch.Generator) -> torch.Tensor:
        if self.config.train_latent == "sample":
            mean = mean + std * torch.randn(mean.shape, generator=dgen, device=dgen.device).to(mean.device)
        return self._normalise(mean)

    def _validation_mse(self, model: nn.Module, val_set: tuple[torch.Tensor, ...]) -> float:
        """Mean z0 MSE over the validation slices with the same draws every time (the
        authors re-seed before each validation)."""
        c = self.config
        device = self.device
        dgen = torch.Generator(device=device).manual_seed(c.seed + 1)
        size_gen = torch.Generator().manual_seed(c.seed + 1)
        means, stds, allowed = val_set
        total = torch.zeros((), device=device)
        model.eval()
        with torch.no_grad():
            for start in range(0, means.shape[0], c.batch_size):
                sl = slice(start, start + c.batch_size)
                z0 = self._diffusion_latents(means[sl], stds[sl], dgen)
                _, mse, _ = self._denoiser_loss(model, z0, allowed[sl], dgen, size_gen, c.val_mask_ratio_max, tuple(c.val_patch_size_probs))
                total += mse * z0.shape[0]
        model.train()
        return float(total) / max(means.shape[0], 1)

    def _train_denoiser(self, train: SliceSet, cached, val_set, gen: torch.Generator, ema: Optional[nn.Module]) -> None:
        c = self.config
        device = self.device
        model = self.denoiser
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self._lr_factor)
        probs = tuple(c.patch_size_probs) if c.patch_size_probs is not None else None
        # Draws on the training device; on the CPU one stream (``gen``) serves everything.
        dgen = gen if device.type == "cpu" else torch.Generator(device=device).manual_seed(c.seed)
        losses: list[float] = []
        best = (math.inf, -1, None)  # (validation MSE, epoch, weights)
        parts = [0.0, 0.0, 0.0]  # this epoch's mean loss, MSE and mask term
        meter = LossMeter("madad denoiser", device, names=("loss", "mse", "mask"))
        step = 0
        bar = progress_bar(range(c.epochs), desc="madad denoiser", unit="epoch")
        forward = self._denoiser_forward
        for epoch in bar:
            order = list(self.iterate_minibatches(len(train), c.batch_size, gen))
            # the rows are read ahead only when they are used (augmentation re-encodes them)
            batches = prefetch_epoch(self._read(train), order, device) if cached is None else ((idx, None) for idx in order)
            for idx, rows in batches:
                if cached is None:
                    x, brain = rows
                    xv, brain = augment(
                        self._to_vae(x.to(device)), self._brain_internal(brain.to(device)), dgen, c.aug_p,
                        c.aug_rotate_deg, c.aug_translate_px, c.aug_brightness, c.aug_contrast,
                    )
                    with torch.no_grad(), self._train_autocast(device):
                        mean, std = encode_stats(self.vae, xv)
                    mean, std = mean.float(), std.float()
                    allowed = restrict_to_brain(
                        torch.ones(mean.shape[0], 1, *self._latent_hw, device=device), brain, c.brain_restriction,
                        c.latent_brain_threshold, c.brain_block_latent, c.brain_block_min_fraction,
                    )
                else:
                    sel = torch.as_tensor(idx, device=device)
                    mean, std, allowed = cached[0][sel], cached[1][sel], cached[2][sel]
                z0 = self._diffusion_latents(mean, std, dgen)
                loss, mse, mask_term = self._denoiser_loss(forward, z0, allowed, dgen, gen, c.mask_ratio_max, probs)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if ema is not None:
                    with torch.no_grad():
                        for pe, pm in zip(ema.parameters(), model.parameters()):
                            pe.lerp_(pm, 1 - c.ema_decay)
                meter.add(loss, mse, mask_term, weight=z0.shape[0])
                step += 1
                if step % c.log_every == 0:  # the only host syncs within an epoch
                    bar.set_postfix(meter.postfix(meter.read(step)))
            sched.step()
            meter.read(step)  # the divergence check for the epoch's last steps
            parts = meter.end_epoch().tolist()
            losses.append(parts[0])
            bar.set_postfix(mse=f"{parts[1]:.4f}", mask=f"{parts[2]:.4f}")
            if val_set is not None and epoch % c.val_every == 0 and epoch != 0:  # the authors' schedule
                score = self._validation_mse(ema if ema is not None else model, val_set)
                if score < best[0]:
                    source = ema if ema is not None else model
                    best = (score, epoch, {k: v.detach().clone() for k, v in source.state_dict().items()})
        if best[2] is not None:
            (ema if ema is not None else model).load_state_dict(best[2])
        if val_set is not None:
            self.notes["checkpoint_epoch"] = best[1] if best[2] is not None else c.epochs - 1
            self.notes["best_val_mse"] = None if best[2] is None else best[0]
        self.notes["denoiser_final_loss"] = losses[-1] if losses else None
        self.notes["denoiser_final_mse"] = float(parts[1]) if c.epochs else None
        self.notes["denoiser_final_mask_loss"] = float(parts[2]) if c.epochs else None

    # ------------------------------------------------------------------ inference
    def score(self, images: Any, brain_masks: Any, progress: bool = False) -> torch.Tensor:
        self._score_index = 0  # noise is seeded per slice index: reproducible, batch-size free
        self._enable_tf32(self.device)
        return super().score(images, brain_masks, progress)

    def reconstruct(self, images: Any, brain_masks: Any) -> torch.Tensor:
        self._score_index = 0
        return super().reconstruct(images, brain_masks)

    def _slice_noise(self, batch: int, latent_shape: tuple[int, ...], steps: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per slice: one posterior-sample noise and ``steps`` DDIM noises, drawn on ``device``
        from a generator seeded by ``(config.seed, slice index)``, so a slice's noise does not
        depend on which batch it is in (on the CPU the same values as a CPU generator)."""
        start, self._score_index = self._score_index, self._score_index + batch
        eps0, eps = [], []
        for i in range(start, start + batch):
            g = torch.Generator(device=device).manual_seed(self.config.seed * 1_000_003 + i)
            eps0.append(torch.randn(latent_shape, generator=g, device=device))
            eps.append(torch.randn((steps, *latent_shape), generator=g, device=device))
        return torch.stack(eps0), torch.stack(eps, 1)  # B x C x h x w, steps x B x C x h x w

    def _denoise(self, z: torch.Tensor, t_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The network under the caller's autocast; outputs back in float32."""
        z0_hat, logits = self._denoiser_forward(z, t_index)
        return z0_hat.float(), logits.float()

    def _restore(self, images: torch.Tensor) -> dict[str, Any]:
        """Run MAD-AD on a batch; returns internal-resolution tensors on [-1, 1]. Under
        autocast only the networks run in bf16: latents and the DDIM state are float32."""
        c = self.config
        x = self._to_vae(images)
        mean, std = encode_stats(self.vae, x)
        mean, std = mean.float(), std.float()
        eps0, eps = self._slice_noise(x.shape[0], tuple(mean.shape[1:]), c.ddim_steps, x.device)
        z_input = mean + std * eps0 if c.inference_start == "sample" else mean
        z_T = self._normalise(z_input)
        out: MaskedDDIMOutput = masked_ddim(
            self._denoise, z_T, self.abar, c.ddim_steps, c.sigma, c.mask_threshold, eps if c.sigma > 0 else None, c.ddim_spacing
        )
        restored = self.vae.decode(self._denormalise(out.z0)).sample.float()
        return {"x": x, "z_T": z_T, "out": out, "restored": restored}

    def _score_batch(self, images: torch.Tensor, brain_masks: torch.Tensor) -> torch.Tensor:
        c = self.config
        r = self._restore(images)
        size = (c.image_size, c.image_size)
        if c.anomaly_source == "image_diff":
            if c.map_reference == "input":
                reference = r["x"]
            else:  # authors' code: compare with the VAE's own reconstruction D(E(x))
                reference = self.vae.decode(self._denormalise(r["z_T"])).sample.float()
            amap = anomaly.image_diff_map(r["restored"], reference.float(), c.gamma, c.smoothing_sigma)
        elif c.anomaly_source == "latent_diff":
            amap = anomaly.latent_diff_map(r["out"].z0.float(), r["z_T"].float(), size, c.smoothing_sigma)
        else:
            amap = anomaly.mean_mask_map(r["out"].mean_mask, size, c.smoothing_sigma)
        return anomaly.resample(amap.float(), tuple(images.shape[-2:]))[:, 0]

    def _reconstruct_batch(self, images: torch.Tensor, brain_masks: torch.Tensor) -> torch.Tensor:
        return self._from_vae(self._restore(images)["restored"], tuple(images.shape[-2:]))
