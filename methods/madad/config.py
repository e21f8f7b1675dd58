"""MAD-AD configuration: every knob of the paper and of the authors' code, one dataclass.

Defaults are the paper's published values (Beizaee et al., IPMI 2025, sec. 4.1). Where the
paper is silent the default is ours and the comment says so. ``PROFILES`` holds the named
overrides: ``official`` (the authors' public code) and the ``quick`` size profiles; they
change values, never code paths. methods/madad/README.md has the paper-vs-official table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from methods.base import MethodConfig, inference_field

# Values shared by every knob that needs validating (method.py checks them in _check_config).
SCHEDULES = ("linear", "cosine")
MASK_LOSSES = ("bce", "mse")
BRAIN_RULES = ("latent_mask", "block16_90pct", "none")
STARTS = ("sample", "posterior_mean")
SOURCES = ("image_diff", "latent_diff", "mean_mask")
REFERENCES = ("input", "vae_reconstruction")
LR_SCHEDULES = ("constant", "cosine")
LATENT_NORMS = ("global", "channel", "whiten")
LATENT_NORM_REGIONS = ("brain", "all")
CHECKPOINTS = ("last", "best_val_mse")
DDIM_SPACINGS = ("official", "even")


@dataclass
class MadadConfig(MethodConfig):
    # ------------------------------------------------------------------ resolution / intensities
    image_size: int = 256  # internal resolution: slices are resampled to it and maps back (paper: 256)
    data_range: tuple[float, float] = (0.0, 1.0)  # mapped linearly to the VAE's [-1, 1]

    # ------------------------------------------------------------------ latent space (VAE)
    vae_path: Optional[str] = None  # diffusers folder or .safetensors of an SD VAE; None = train here
    vae_block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # kl-f8: 256 -> 32
    vae_layers_per_block: int = 2
    vae_latent_channels: int = 4
    vae_norm_groups: int = 32
    vae_epochs: int = 100  # from-scratch training (ours; the paper fine-tunes a pretrained VAE)
    vae_finetune_epochs: int = 10  # fine-tuning of a pretrained VAE (paper: unstated); 0 = adapt only
    vae_lr: float = 1e-4
    vae_batch_size: int = 16
    vae_rec_loss: str = "l1"  # "l1" | "l2"
    vae_kl_weight: float = 1e-6  # LDM kl-f8 value
    # LDM trains its VAE with LPIPS + a patch discriminator. LPIPS needs downloaded weights
    # (unavailable), so it stays off; the adversarial term can be switched on.
    vae_perceptual_weight: float = 0.0
    vae_adversarial_weight: float = 0.0
    vae_adversarial_start_epoch: int = 0
    latent_scale: Optional[float] = None  # None: 0.18215 (SD VAE config) if pretrained, else set by latent_norm
    # VAE trained here, latent_scale None (a pretrained SD VAE keeps its own scaling_factor):
    # "whiten" = ZCA over the latent channels, A (z - mean) with identity channel covariance
    # (ours, default); "channel" = (z - mean_c) / std_c; "global" = z / std (one scalar, LDM
    # practice). Why whiten: the from-scratch VAE's channels are correlated, with means several
    # of their own stds from 0; eq. 2's N(0, I) noise is then told apart from content by its
    # channel statistics alone, the mask head learns that shortcut and rarely flags a lesion
    # (docs/notes/madad-diagnosis.md). Whitened latents share the noise's first two moments, so the head
    # must judge a cell against its context, which is what transfers to anomalies.
    latent_norm: str = "whiten"
    # Cells the normalisation is fitted on: "brain" = latent cells >= latent_brain_threshold
    # brain (the only cells the forward process noises, so where the latents must match the
    # N(0, I) noise); "all" = every cell (background included; what the code did before).
    latent_norm_region: str = "brain"
    train_latent: str = "sample"  # "sample" (LDM convention) | "posterior_mean"

    # ------------------------------------------------------------------ denoiser
    timesteps: int = 10  # T (paper: 10)
    schedule: str = "cosine"  # paper: unstated; the authors ran cosine (forward.py) | "linear" (option)
    unet_block_out_channels: tuple[int, ...] = (128, 256, 512)  # paper: "UNet with attention" (sizes ours)
    unet_layers_per_block: int = 2
    unet_attention_levels: tuple[bool, ...] = (False, True, True)  # attention per level (mid block always)
    unet_attention_head_dim: int = 64
    unet_norm_groups: int = 32
    dropout: float = 0.0
    mask_head_zero_init: bool = True  # zero-initialised last conv of the mask head (as in the authors' code)
    mask_head_silu: bool = True  # GroupNorm -> SiLU -> conv (ours); the authors' head has no SiLU

    # ------------------------------------------------------------------ training masks (sec. 4.1)
    mask_ratio_min: float = 0.0
    mask_ratio_max: float = 0.4  # ratio ~ U[0, 0.4]
    patch_sizes: tuple[int, ...] = (1, 2, 4, 8)  # per axis, drawn independently
    patch_size_probs: Optional[tuple[float, ...]] = None  # None = uniform (paper: unstated)
    patch_size_per: str = "batch"  # "batch" (paper: "at each iteration") | "sample"
    brain_restriction: str = "latent_mask"  # mask x brain mask on the latent grid
    latent_brain_threshold: float = 0.5  # latent cell is brain if >= this fraction of its pixels is
    brain_block_latent: int = 2  # block16_90pct: block side in latent cells (16 px at f8)
    brain_block_min_fraction: float = 0.9

    # ------------------------------------------------------------------ optimisation (sec. 4.1)
    epochs: int = 300
    batch_size: int = 96
    lr: float = 5e-4
    weight_decay: float = 0.01  # AdamW default (paper: unstated)
    lr_schedule: str = "constant"  # paper: unstated
    warmup_epochs: int = 0
    ema_decay: float = 0.0  # 0 = no EMA (paper: none mentioned)
    mask_loss: str = "bce"  # eq. 5
    mask_loss_weight: float = 1.0  # lambda of eq. 5 (paper: unstated; 1.0 is ours)
    # Which weights are kept: "last" (paper: unstated) | "best_val_mse" (authors' code: the
    # z0 MSE on the validation slices every val_every epochs, epoch 0 excluded; the validation
    # masks use ratio ~ U[0, val_mask_ratio_max] and val_patch_size_probs, with the same
    # draws at every validation). "best_val_mse" needs a validation set.
    checkpoint: str = "last"
    val_every: int = 10  # authors' --ckpt-every default
    val_mask_ratio_max: float = 0.3
    val_patch_size_probs: tuple[float, ...] = (0.3, 0.3, 0.2, 0.2)
    # GPU: ``train_amp`` (bf16 autocast of the network forwards in training; DDIM state,
    # latents and losses stay fp32), ``amp`` (the same when scoring) and ``log_every`` are
    # the execution fields every method shares (methods/base.py), all on by default.

    # ------------------------------------------------------------------ augmentation (authors' code only; augment.py)
    aug_p: float = 0.0  # probability of each of the three transforms
    aug_rotate_deg: float = 0.0  # fixed rotation (albumentations Affine(rotate=5) is a fixed +5 deg)
    aug_translate_px: float = 0.0  # fixed (+px, +px) shift, pixels of the internal resolution
    aug_brightness: float = 0.0  # additive, beta ~ U[-b, b] (on [0, 1] units)
    aug_contrast: float = 0.0  # multiplicative, alpha ~ 1 + U[-c, c]

    # ------------------------------------------------------------------ inference (eqs. 6-8), no retraining
    ddim_steps: int = inference_field(10)
    ddim_spacing: str = inference_field("official")  # visited timesteps for K < T (sampler.py)
    sigma: float = inference_field(0.5)  # eta-style scale of the DDIM sigma_t (0 = deterministic)
    mask_threshold: float = inference_field(0.5)  # B(.) of eq. 6
    inference_start: str = inference_field("sample")  # z_T = E(x): a posterior sample | its mean
    anomaly_source: str = inference_field("image_diff")  # Table 3
    map_reference: str = inference_field("input")  # compare x0_tilde with the input | with D(E(x))
    gamma: Optional[float] = inference_field(0.2)  # eq. 8 clip; None = no clip, map = |x0_tilde - x0|
    smoothing_sigma: float = inference_field(5.0)  # Gaussian G, in internal-resolution pixels (paper: unstated; code: 5)


# Quick sizes: a narrow kl-f8 VAE (64 px -> 4 x 8 x 8 latents), a small UNet, few epochs.
# Same algorithm; trains on 2 CPU cores in a few minutes on ~320 slices. The VAE keeps the
# paper's factor 8 and so its compression (16 pixels per latent value): an f4 VAE at 64 px
# (4 pixels per value) reconstructed the lesions themselves, leaving the map nothing to
# find (docs/notes/madad-diagnosis.md).
_QUICK_SIZES: dict[str, Any] = {
    "image_size": 64,
    "vae_block_out_channels": (16, 32, 64, 64),
    "vae_layers_per_block": 1,
    "vae_norm_groups": 8,
    # 24 epochs: 12 left the VAE blurry (T1CE below the AE), 30 let it reconstruct the
    # T2/FLAIR lesions too (docs/notes/madad-diagnosis.md, points 3 and 7)
    "vae_epochs": 24,
    "vae_finetune_epochs": 2,
    "vae_lr": 1e-3,
    "vae_batch_size": 16,
    "unet_block_out_channels": (32, 64, 64),
    "unet_layers_per_block": 1,
    "unet_attention_head_dim": 32,
    "unet_norm_groups": 16,
    "epochs": 160,
    "batch_size": 32,
    "smoothing_sigma": 1.25,  # 5 px at 256 = 1.25 px at 64
    "brain_block_latent": 1,  # 16 px at 256 = 4 px at 64, under one 8-px latent cell: the smallest block
    "score_batch_size": 64,
}

# The authors' public code (github.com/farzad-bz/MAD-AD), where it departs from the paper.
_OFFICIAL: dict[str, Any] = {
    "schedule": "cosine",
    "mask_loss": "mse",
    "mask_loss_weight": 1e-3,
    "lr": 4e-5,
    "lr_schedule": "cosine",
    "warmup_epochs": 10,
    "epochs": 200,
    "weight_decay": 1e-4,
    "ema_decay": 0.0,  # the EMA was dropped from the authors' code on 2025-07-31
    "mask_head_silu": False,
    "checkpoint": "best_val_mse",
    "apply_brain_mask": False,  # evaluate-MAD-AD.py does not mask the map with the brain
    "unet_attention_levels": (True, True, True),
    "dropout": 0.4,
    "patch_size_probs": (0.2, 0.3, 0.3, 0.2),
    "brain_restriction": "block16_90pct",
    "inference_start": "posterior_mean",
    "map_reference": "vae_reconstruction",
    "gamma": 0.25,  # clip 0.25 then x 4 == min(d, 0.25) / 0.25
    "smoothing_sigma": 5.0,
    "aug_p": 0.5,
    "aug_rotate_deg": 5.0,
    "aug_translate_px": 8.0,  # image_size // 32 at 256
    "aug_brightness": 0.1,
    "aug_contrast": 0.1,
}

# Seconds-scale sizes for the conformance tests (32 px, f2 VAE, 16 x 16 latents).
_TINY_SIZES: dict[str, Any] = {
    "image_size": 32,
    "vae_block_out_channels": (16, 32),
    "vae_layers_per_block": 1,
    "vae_norm_groups": 8,
    "vae_epochs": 1,
    "vae_finetune_epochs": 1,
    "vae_batch_size": 8,
    "unet_block_out_channels": (16, 32),
    "unet_layers_per_block": 1,
    "unet_attention_levels": (False, True),
    "unet_attention_head_dim": 16,
    "unet_norm_groups": 8,
    "epochs": 2,
    "batch_size": 8,
    "smoothing_sigma": 1.0,
    "brain_block_latent": 1,
}

PROFILES: dict[str, dict[str, Any]] = {
    "paper": {},
    "quick": dict(_QUICK_SIZES),
    "tiny": dict(_TINY_SIZES),
    "official": dict(_OFFICIAL),
    # Official knobs at quick sizes. One value cannot survive the short run and is replaced
    # (README says so): lr 4e-5 needs thousands of steps.
    "official-quick": {
        **_OFFICIAL,
        **_QUICK_SIZES,
        "lr": 5e-4,
        "warmup_epochs": 3,
        "aug_translate_px": 2.0,  # image_size // 32 at 64
    },
    "official-tiny": {
        **_OFFICIAL, **_TINY_SIZES, "unet_attention_levels": (True, True), "lr": 5e-4, "aug_translate_px": 1.0, "val_every": 1,
    },
}
