"""The MAD-AD denoiser: a UNet with attention predicting z0, plus a mask head.

The mask head is a real second head on the UNet's last decoder features (the input of
``conv_norm_out``, before the z0 output convolution): GroupNorm -> [SiLU] -> 3x3 conv -> one
logit per latent cell (sigmoid at use). The authors' code (farzad-bz/MAD-AD,
``ldm/modules/diffusionmodules/openaimodel_medical.py``, ``mt_out``) is GroupNorm ->
zero-initialised 3x3 conv -> sigmoid, without the SiLU their z0 head has: ``silu=False``.
``zero_init`` makes the mask start at p = 0.5 everywhere.
"""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers import UNet2DModel
from torch import nn


class MaskedDenoiser(nn.Module):
    """``forward(z_t, t_index) -> (z0_hat, mask_logits)``; ``t_index`` in ``0 .. T-1``."""

    def __init__(
        self,
        latent_channels: int,
        sample_size: int,
        block_out_channels: Sequence[int],
        layers_per_block: int,
        attention_levels: Sequence[bool],
        attention_head_dim: int,
        norm_groups: int,
        dropout: float = 0.0,
        zero_init: bool = True,
        silu: bool = True,
    ) -> None:
        super().__init__()
        if len(attention_levels) != len(block_out_channels):
            raise ValueError(
                f"unet_attention_levels {tuple(attention_levels)} needs one entry per level of unet_block_out_channels {tuple(block_out_channels)}"
            )
        down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels)
        up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels))
        self.unet = UNet2DModel(
            sample_size=sample_size,
            in_channels=latent_channels,
            out_channels=latent_channels,
            down_block_types=down,
            up_block_types=up,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_groups,
            dropout=dropout,
            add_attention=True,  # attention in the middle block
        )
        width = block_out_channels[0]
        conv = nn.Conv2d(width, 1, 3, padding=1)
        if zero_init:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        act = [nn.SiLU()] if silu else []
        self.mask_head = nn.Sequential(nn.GroupNorm(norm_groups, width), *act, conv)
        self._features: torch.Tensor | None = None
        # Tap the features entering the z0 output block; both heads share them.
        self.unet.conv_norm_out.register_forward_pre_hook(self._tap)

    def _tap(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self._features = args[0]

    def forward(self, z_t: torch.Tensor, t_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z0_hat = self.unet(z_t, t_index).sample
        features, self._features = self._features, None
        return z0_hat, self.mask_head(features)
