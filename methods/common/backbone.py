"""The pixel-space UNet shared by the diffusion baselines (DDPM, AnoDDPM, pDDPM, AutoDDPM, THOR).

As in the THOR / ci-ber code: MONAI ``DiffusionModelUNet``, channels (128, 256, 256),
attention at the two lower levels (and, always, the middle block), one residual block per
level, 256 channels per attention head. It is called as ``model(x, timesteps)`` with
``timesteps`` a ``LongTensor`` of shape ``(B,)``.

MONAI >= 1.4 spells the width argument ``channels=`` (the old MONAI-Generative package
used ``num_channels=``); every channel count must be divisible by ``norm_num_groups``
and every attention level's width by ``num_head_channels``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Sequence

from torch import nn

#: Names of the backbone fields a method config carries (same names as ``build_unet``).
BACKBONE_FIELDS = ("channels", "attention_levels", "num_res_blocks", "num_head_channels", "norm_num_groups")


@dataclass
class BackboneConfig:
    """The UNet's hyperparameters; method configs repeat these field names (see ``backbone_kwargs``)."""

    channels: tuple[int, ...] = (128, 256, 256)
    attention_levels: tuple[bool, ...] = (False, True, True)
    num_res_blocks: int = 1
    num_head_channels: int = 256
    norm_num_groups: int = 32


def backbone_kwargs(config: Any) -> dict[str, Any]:
    """The ``build_unet`` keyword arguments held by any config that has the backbone fields."""
    return {f.name: getattr(config, f.name) for f in fields(BackboneConfig)}


def check_backbone(channels: Sequence[int], attention_levels: Sequence[bool], num_head_channels: int, norm_num_groups: int) -> None:
    """Fail early, with a readable message, on combinations MONAI rejects deep inside."""
    if len(channels) != len(attention_levels):
        raise ValueError(f"channels {tuple(channels)} and attention_levels {tuple(attention_levels)} must have the same length")
    for c in channels:
        if c % norm_num_groups:
            raise ValueError(f"every channel count must be divisible by norm_num_groups={norm_num_groups}; {c} is not")
    for c, attn in zip(channels, attention_levels):
        if attn and c % num_head_channels:
            raise ValueError(f"attention level width {c} is not divisible by num_head_channels={num_head_channels}")


def build_unet(
    in_channels: int = 1,
    out_channels: int = 1,
    channels: Sequence[int] = (128, 256, 256),
    attention_levels: Sequence[bool] = (False, True, True),
    num_res_blocks: int = 1,
    num_head_channels: int = 256,
    norm_num_groups: int = 32,
    spatial_dims: int = 2,
) -> nn.Module:
    """MONAI ``DiffusionModelUNet``; the input side must be divisible by ``2 ** (len(channels) - 1)``."""
    from monai.networks.nets import DiffusionModelUNet

    check_backbone(channels, attention_levels, num_head_channels, norm_num_groups)
    return DiffusionModelUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=tuple(int(c) for c in channels),
        attention_levels=tuple(bool(a) for a in attention_levels),
        num_res_blocks=int(num_res_blocks),
        num_head_channels=int(num_head_channels),
        norm_num_groups=int(norm_num_groups),
        include_fc=False,  # the authors' MONAI-Generative copy never applies the attention output projection
    )
