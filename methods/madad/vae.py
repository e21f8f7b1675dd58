"""The latent space of MAD-AD: a one-channel ``AutoencoderKL`` in Stable Diffusion's layout.

Two ways in:

* ``load_pretrained_grey_vae(path)``: a user-supplied kl-f8 VAE: a diffusers folder, or a
  ``.safetensors`` / ``.pt`` / ``.ckpt`` state dict with diffusers or original LDM key names
  (``encoder.down.0.block.0...``, ``quant_conv``, ``post_quant_conv``; LDM's ``loss.*``
  entries are ignored). LDM keys are converted with diffusers' single-file helper
  ``convert_ldm_vae_checkpoint``. The architecture (levels, widths, blocks per level,
  latent and image channels) is read from the weights' shapes; the GroupNorm group count,
  which shapes do not show, is LDM's 32 unless a ``config.json`` beside the file says
  otherwise. A one-channel VAE (the authors' ``VAE-Medical-klf8``, farzad-bz/Medical-VAE on
  the Hugging Face hub, once saved as a state dict) is used as is; an RGB one (Stable
  Diffusion's) is adapted to one channel. ``conv_in``: the three input filters are
  **summed**. A grey image replicated to RGB gives
  ``conv(x, x, x) = (W_r + W_g + W_b) * x``, so the summed filter reproduces the RGB
  network's activations exactly (a mean would scale them by 1/3 and shift every later
  layer). ``conv_out``: the three output filters and biases are **averaged**, so the
  one-channel output is the mean of the RGB outputs (equal to each of them for a grey
  reconstruction). The VAE is then fine-tuned on the training slices
  (``vae_finetune_epochs``, 0 = as loaded).
* ``build_vae(...)``: the same architecture family untrained, for training from scratch.

Images enter the VAE on [-1, 1] (SD convention) at the internal resolution.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from methods.common.accel import train_autocast
from methods.common.loss_meter import LossMeter
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


def _levels(state: dict[str, torch.Tensor], pattern: str) -> int:
    """Number of consecutive indices ``i`` with ``pattern.format(i)`` among the keys."""
    n = 0
    while pattern.format(n) in state:
        n += 1
    return n


def arch_from_state(state: dict[str, torch.Tensor], norm_num_groups: int = 32) -> tuple[dict[str, Any], int]:
    """``(arch, in_channels)`` of a diffusers-layout AutoencoderKL state dict, from shapes."""
    n = _levels(state, "encoder.down_blocks.{}.resnets.0.conv1.weight")
    if n == 0 or "quant_conv.weight" not in state or "encoder.conv_in.weight" not in state:
        raise KeyError("encoder.down_blocks / quant_conv / encoder.conv_in")
    arch = {
        "block_out_channels": [int(state[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) for i in range(n)],
        "layers_per_block": _levels(state, "encoder.down_blocks.0.resnets.{}.conv1.weight"),
        "latent_channels": int(state["quant_conv.weight"].shape[0]) // 2,
        "norm_num_groups": norm_num_groups,
        "sample_size": SD_KL_F8["sample_size"],
    }
    return arch, int(state["encoder.conv_in.weight"].shape[1])


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickled module (e.g. the authors' VAE-Medical-klf8.pt) or a broken file
        raise ValueError(
            f"vae_path {path}: not a state dict of tensors ({type(err).__name__}). A pickled module, such as the "
            "authors' VAE-Medical-klf8.pt, is not unpickled here (that would run its code); where its classes "
            "import, save its weights with torch.save(module.state_dict(), 'vae.pt') and pass that file"
        ) from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a Lightning / LDM checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"vae_path {path}: expected a state dict of tensors, got {type(state).__name__}")
    return state


def load_vae(path: str | Path) -> AutoencoderKL:
    """Load a kl-f8 ``AutoencoderKL`` from a diffusers folder or a state dict file (offline)."""
    path = Path(path)
    if path.is_dir():
        return AutoencoderKL.from_pretrained(path, local_files_only=True)
    if not path.is_file():
        raise FileNotFoundError(f"vae_path {path}: no such file or directory")
    state = _read_state(path)
    config_path = path.with_name("config.json")
    groups = SD_KL_F8["norm_num_groups"]
    if config_path.is_file():
        groups = int(json.loads(config_path.read_text()).get("norm_num_groups", groups))
    if not any(k.startswith("encoder.down_blocks") for k in state):  # original LDM key names
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        n = _levels({k.split("first_stage_model.", 1)[-1].split("vae.", 1)[-1]: 0 for k in state}, "encoder.down.{}.block.0.conv1.weight")
        if n == 0:
            raise ValueError(f"vae_path {path}: neither diffusers nor LDM AutoencoderKL keys (e.g. encoder.down.0.block.0.conv1.weight)")
        state = convert_ldm_vae_checkpoint(state, {"down_block_types": ("DownEncoderBlock2D",) * n, "up_block_types": ("UpDecoderBlock2D",) * n})
    try:
        arch, in_channels = arch_from_state(state, groups)
    except KeyError as err:
        raise ValueError(f"vae_path {path}: not a kl AutoencoderKL state dict; missing {err}") from err
    vae = build_vae(arch, in_channels=in_channels)
    missing, unexpected = vae.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(f"vae_path {path}: not a kl-f8 AutoencoderKL of the inferred layout {arch}; missing weights such as {missing[:3]}")
    if unexpected:
        log.warning("vae_path %s: ignoring %d unexpected keys", path, len(unexpected))
    return vae


def load_rgb_vae(path: str | Path) -> AutoencoderKL:
    """Backward-compatible name of ``load_vae``."""
    return load_vae(path)


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
    """A one-channel VAE from ``path``: used as is if it has one channel, adapted if RGB."""
    vae = load_vae(path)
    channels = int(vae.config.in_channels)
    if channels == 1:
        return vae
    if channels == 3:
        return adapt_rgb_to_grey(vae)
    raise ValueError(f"vae_path {path}: a VAE with {channels} input channels; expected 1 (grey) or 3 (RGB, adapted)")


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
    amp: bool = False,
) -> list[float]:
    """Train ``vae`` in place; ``batches(epoch)`` yields ``B x 1 x S x S`` images on [-1, 1].

    Loss = reconstruction (L1 or L2, per pixel) + ``kl_weight`` * KL (per element), plus a
    hinge PatchGAN term after ``adversarial_start_epoch`` if ``adversarial_weight > 0``.
    Returns the mean loss per epoch. ``amp``: the encoder, decoder and discriminator run
    under bf16 autocast on CUDA; the posterior, its sample and the losses stay float32.
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
    meter = LossMeter(desc, device)  # read back once an epoch (no per-step sync)
    for epoch in progress_bar(range(epochs), desc=desc, unit="epoch"):
        for x in batches(epoch):
            x = x.to(device)
            with train_autocast(device, amp):
                posterior = vae.encode(x).latent_dist
            if posterior.parameters.dtype != torch.float32:  # bf16 moments: rebuild the posterior in float32
                posterior = DiagonalGaussianDistribution(posterior.parameters.float())
            with train_autocast(device, amp):
                recon = vae.decode(posterior.sample()).sample
            recon = recon.float()
            err = (recon - x).abs() if rec_loss == "l1" else (recon - x) ** 2
            kl = posterior.kl().sum() / posterior.mean.numel()
            loss = err.mean() + kl_weight * kl
            use_adv = disc is not None and epoch >= adversarial_start_epoch
            if use_adv:
                with train_autocast(device, amp):
                    fake = disc(recon)
                loss = loss - adversarial_weight * fake.float().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if use_adv:
                with train_autocast(device, amp):
                    real, fake = disc(x), disc(recon.detach())
                d_loss = F.relu(1 - real.float()).mean() + F.relu(1 + fake.float()).mean()
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                opt_d.step()
            meter.add(loss, weight=x.shape[0])
        history.append(meter.read(epoch, unit="epoch").get("loss", 0.0))
    vae.eval()
    for p in vae.parameters():
        p.requires_grad_(False)
    return history


def encode_stats(vae: AutoencoderKL, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of ``x`` (unscaled latents)."""
    dist = vae.encode(x).latent_dist
    return dist.mean, dist.std
