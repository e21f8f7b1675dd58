"""The latent space of MAD-AD: a one-channel ``AutoencoderKL`` in Stable Diffusion's layout.

Two ways in:

* ``load_pretrained_grey_vae(path)``: a user-supplied SD VAE (diffusers folder or
  ``.safetensors``, diffusers or original LDM key names) adapted from RGB to one channel.
  ``conv_in``: the three input filters are **summed**. A grey image replicated to RGB gives
  ``conv(x, x, x) = (W_r + W_g + W_b) * x``, so the summed filter reproduces the RGB
  network's activations exactly (a mean would scale them by 1/3 and shift every later
  layer). ``conv_out``: the three output filters and biases are **averaged**, so the
  one-channel output is the mean of the RGB outputs (equal to each of them for a grey
  reconstruction). The adapted VAE is then fine-tuned on the training slices.
* ``build_vae(...)``: the same architecture family untrained, for training from scratch.

Images enter the VAE on [-1, 1] (SD convention) at the internal resolution.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn

from methods.progress import progress_bar

log = logging.getLogger(__name__)

SD_SCALING_FACTOR = 0.18215
# Stable Diffusion's kl-f8 VAE (the diffusers config of SD 1.x/2.x "vae").
SD_KL_F8 = {
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
}


def build_vae(arch: dict[str, Any], in_channels: int = 1) -> AutoencoderKL:
    """An untrained ``AutoencoderKL`` with ``len(block_out_channels) - 1`` downsamplings."""
    n = len(arch["block_out_channels"])
    return AutoencoderKL(
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(arch["block_out_channels"]),
        layers_per_block=int(arch["layers_per_block"]),
        latent_channels=int(arch["latent_channels"]),
        norm_num_groups=int(arch["norm_num_groups"]),
        sample_size=int(arch.get("sample_size", 256)),
    )


def vae_arch(vae: AutoencoderKL) -> dict[str, Any]:
    """The JSON-serialisable architecture facts ``build_vae`` needs to rebuild ``vae``."""
    c = vae.config
    return {
        "block_out_channels": list(c.block_out_channels),
        "layers_per_block": int(c.layers_per_block),
        "latent_channels": int(c.latent_channels),
        "norm_num_groups": int(c.norm_num_groups),
        "sample_size": int(c.sample_size) if isinstance(c.sample_size, int) else int(c.sample_size[0]),
    }


def load_rgb_vae(path: str | Path) -> AutoencoderKL:
    """Load an SD VAE from a diffusers folder or a ``.safetensors``/``.pt`` state dict (offline)."""
    path = Path(path)
    if path.is_dir():
        return AutoencoderKL.from_pretrained(path, local_files_only=True)
    if not path.is_file():
        raise FileNotFoundError(f"vae_path {path}: no such file or directory")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    config_path = path.with_name("config.json")
    arch = dict(SD_KL_F8)
    if config_path.is_file():
        cfg = json.loads(config_path.read_text())
        arch.update({k: cfg[k] for k in arch if k in cfg})
    vae = build_vae(arch, in_channels=3)
    if not any(k.startswith("encoder.down_blocks") for k in state):  # original LDM key names
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        state = convert_ldm_vae_checkpoint(state, dict(vae.config))
    missing, unexpected = vae.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(f"vae_path {path}: not an SD kl-f8 VAE; missing weights such as {missing[:3]}")
    if unexpected:
        log.warning("vae_path %s: ignoring %d unexpected keys", path, len(unexpected))
    return vae


def adapt_rgb_to_grey(rgb: AutoencoderKL) -> AutoencoderKL:
    """A one-channel copy of ``rgb``: ``conv_in`` filters summed, ``conv_out`` filters averaged."""
    grey = build_vae(vae_arch(rgb), in_channels=1)
    state = {k: v.clone() for k, v in rgb.state_dict().items()}
    state["encoder.conv_in.weight"] = state["encoder.conv_in.weight"].sum(1, keepdim=True)
    state["decoder.conv_out.weight"] = state["decoder.conv_out.weight"].mean(0, keepdim=True)
    state["decoder.conv_out.bias"] = state["decoder.conv_out.bias"].mean(0, keepdim=True)
    grey.load_state_dict(state)
    grey.register_to_config(scaling_factor=rgb.config.scaling_factor)
    return grey


def load_pretrained_grey_vae(path: str | Path) -> AutoencoderKL:
    return adapt_rgb_to_grey(load_rgb_vae(path))


class PatchDiscriminator(nn.Module):
    """A small PatchGAN (as in LDM's VAE loss), used only when ``vae_adversarial_weight > 0``."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.GroupNorm(8, 2 * width), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 1, 3, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def train_vae(
    vae: AutoencoderKL,
    batches: Callable[[int], Iterable[torch.Tensor]],
    epochs: int,
    lr: float,
    rec_loss: str = "l1",
    kl_weight: float = 1e-6,
    adversarial_weight: float = 0.0,
    adversarial_start_epoch: int = 0,
    device: torch.device = torch.device("cpu"),
    desc: str = "vae",
) -> list[float]:
    """Train ``vae`` in place; ``batches(epoch)`` yields ``B x 1 x S x S`` images on [-1, 1].

    Loss = reconstruction (L1 or L2, per pixel) + ``kl_weight`` * KL (per element), plus a
    hinge PatchGAN term after ``adversarial_start_epoch`` if ``adversarial_weight > 0``.
    Returns the mean loss per epoch.
    """
    if rec_loss not in ("l1", "l2"):
        raise ValueError(f"vae_rec_loss must be 'l1' or 'l2', got {rec_loss!r}")
    vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.5, 0.9), weight_decay=0.0)
    disc = opt_d = None
    if adversarial_weight > 0:
        disc = PatchDiscriminator().to(device)
        opt_d = torch.optim.AdamW(disc.parameters(), lr=lr, betas=(0.5, 0.9))
    history = []
    for epoch in progress_bar(range(epochs), desc=desc, unit="epoch"):
        total, count = 0.0, 0
        for x in batches(epoch):
            x = x.to(device)
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample
            err = (recon - x).abs() if rec_loss == "l1" else (recon - x) ** 2
            kl = posterior.kl().sum() / posterior.mean.numel()
            loss = err.mean() + kl_weight * kl
            use_adv = disc is not None and epoch >= adversarial_start_epoch
            if use_adv:
                loss = loss - adversarial_weight * disc(recon).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if use_adv:
                d_loss = F.relu(1 - disc(x)).mean() + F.relu(1 + disc(recon.detach())).mean()
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                opt_d.step()
            total += float(loss.detach()) * x.shape[0]
            count += x.shape[0]
        history.append(total / max(count, 1))
    vae.eval()
    for p in vae.parameters():
        p.requires_grad_(False)
    return history


def encode_stats(vae: AutoencoderKL, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of ``x`` (unscaled latents)."""
    dist = vae.encode(x).latent_dist
    return dist.mean, dist.std
