"""The UNet of Liang et al.'s IterMask2 and Cycl.UNet (MMCCD): guided-diffusion's layout, no time input.

Both repositories (ZiyunLiang/IterMask2 and ZiyunLiang/MMCCD, ``models/unet.py``) use
OpenAI guided-diffusion's ``UNetModel`` and call it without timesteps, so the timestep
embedding and the FiLM (scale-shift) layers never act; we leave them out. What remains:

* a 3x3 input conv, then per level ``num_res_blocks`` residual blocks (norm -> SiLU -> conv,
  norm -> SiLU -> dropout -> zero-initialised conv, 1x1 skip when the width changes), an
  attention block after each of them at the listed feature-map sizes, and a residual block
  that downsamples (average pooling inside the block: ``resblock_updown=True``);
* a middle of residual block, attention, residual block;
* a decoder of ``num_res_blocks + 1`` blocks per level on the concatenated skips, with
  residual up-sampling blocks (nearest neighbour), and a norm -> SiLU -> zero conv head.

Attention is single-head over the level's full width (``num_heads=1``,
``num_head_channels=-1``: one head whose channels are the level's channels), with
guided-diffusion's zero-initialised output projection.

Normalisation: MMCCD uses ``GroupNorm(16, C)``; IterMask2's ``models/nn.py`` replaces it by
``BatchNorm2d`` (``normalization_bn``). ``norm`` selects either.

Widths: ``model_channels * channel_mult``; the authors' table is ``{64: (1, 2, 3, 4),
128: (1, 1, 2, 3, 4)}`` with ``model_channels=32`` (``config/brats_configs.py``), i.e.
32/32/64/96/128 at 128 px. ``attention_resolutions=(32, 16, 8)`` are feature-map sizes
in pixels (guided-diffusion turns them into downsampling factors ``image_size // r``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: channel_mult by image size in the authors' configs (``config/brats_configs.py`` of both repos)
AUTHORS_CHANNEL_MULT: dict[int, tuple[int, ...]] = {64: (1, 2, 3, 4), 128: (1, 1, 2, 3, 4)}

#: Names of the network fields a method config carries (see ``unet_kwargs``).
LIANG_UNET_FIELDS = ("model_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "num_heads", "dropout", "norm", "norm_groups")


@dataclass
class LiangUNetConfig:
    """The network's hyperparameters, the authors' values as defaults (MMCCD's GroupNorm)."""

    model_channels: int = 32
    channel_mult: tuple[int, ...] | None = None  # None: the authors' table for the image size
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (32, 16, 8)  # feature-map sizes (px) with attention
    num_heads: int = 1
    dropout: float = 0.1
    norm: str = "group"  # group (MMCCD) | batch (IterMask2)
    norm_groups: int = 16


def unet_kwargs(config: object) -> dict:
    """The ``LiangUNet`` keyword arguments held by a config that has the network fields."""
    return {name: getattr(config, name) for name in LIANG_UNET_FIELDS}


def resolve_channel_mult(channel_mult: Sequence[int] | None, image_size: int) -> tuple[int, ...]:
    if channel_mult is not None:
        return tuple(int(m) for m in channel_mult)
    if image_size not in AUTHORS_CHANNEL_MULT:
        raise ValueError(
            f"no channel_mult given and the authors' table only covers image sizes {sorted(AUTHORS_CHANNEL_MULT)}; "
            f"got {image_size} (set channel_mult explicitly)"
        )
    return AUTHORS_CHANNEL_MULT[image_size]


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "group":
        if channels % groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible by norm_groups={groups}")
        return nn.GroupNorm(groups, channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"norm must be 'group' or 'batch', got {kind!r}")


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """norm-SiLU-conv, norm-SiLU-dropout-conv(zero), plus a skip; optionally resamples by 2."""

    def __init__(self, c_in: int, c_out: int, dropout: float, norm: str, groups: int, resample: str | None = None):
        super().__init__()
        self.norm1 = _norm(norm, c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(norm, c_out, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)
        if resample not in (None, "down", "up"):
            raise ValueError(f"resample must be None, 'down' or 'up', got {resample!r}")
        self.resample = resample

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(x))
        h = self.conv1(self._resize(h))  # guided-diffusion resamples between activation and conv
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(self._resize(x)) + h


class AttentionBlock(nn.Module):
    """Self-attention over all positions; ``num_heads`` heads splitting the width."""

    def __init__(self, channels: int, num_heads: int, norm: str, groups: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention width {channels} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm = _norm(norm, channels, groups)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, h * w))
        # guided-diffusion's legacy order: per head, [q; k; v] of c / heads channels each
        ch = c // self.num_heads
        q, k, v = (t.transpose(1, 2) for t in qkv.reshape(b * self.num_heads, 3 * ch, h * w).split(ch, dim=1))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(ch)) v, fused
        out = out.transpose(1, 2).reshape(b, c, h * w)
        return x + self.proj(out).reshape(b, c, h, w)


class _Stage(nn.Sequential):
    """A residual block followed by an optional attention block and/or resampling block."""


class LiangUNet(nn.Module):
    """guided-diffusion UNet without time input; ``forward(x) -> B x out_channels x H x W``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        image_size: int,
        model_channels: int = 32,
        channel_mult: Sequence[int] | None = None,
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (32, 16, 8),
        num_heads: int = 1,
        dropout: float = 0.1,
        norm: str = "group",
        norm_groups: int = 16,
    ):
        super().__init__()
        mult = resolve_channel_mult(channel_mult, int(image_size))
        factor = 2 ** (len(mult) - 1)
        if image_size % factor:
            raise ValueError(f"image size {image_size} must be divisible by {factor} for {len(mult)} UNet levels")
        attn_ds = {int(image_size) // int(r) for r in attention_resolutions}
        block = dict(dropout=dropout, norm=norm, groups=norm_groups)
        attn = dict(num_heads=num_heads, norm=norm, groups=norm_groups)

        ch = mult[0] * model_channels
        self.stem = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        skips, ds = [ch], 1
        for level, m in enumerate(mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, m * model_channels, **block)]
                ch = m * model_channels
                if ds in attn_ds:
                    layers.append(AttentionBlock(ch, **attn))
                self.down.append(_Stage(*layers))
                skips.append(ch)
            if level != len(mult) - 1:
                self.down.append(_Stage(ResBlock(ch, ch, resample="down", **block)))
                skips.append(ch)
                ds *= 2
        self.middle = _Stage(ResBlock(ch, ch, **block), AttentionBlock(ch, **attn), ResBlock(ch, ch, **block))
        self.up = nn.ModuleList()
        for level, m in reversed(list(enumerate(mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), m * model_channels, **block)]
                ch = m * model_channels
                if ds in attn_ds:
                    layers.append(AttentionBlock(ch, **attn))
                if level and i == num_res_blocks:
                    layers.append(ResBlock(ch, ch, resample="up", **block))
                    ds //= 2
                self.up.append(_Stage(*layers))
        self.head = nn.Sequential(_norm(norm, ch, norm_groups), nn.SiLU(), _zero(nn.Conv2d(ch, out_channels, 3, padding=1)))
        self.image_size = int(image_size)
        self.channel_mult = mult

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        hs = [h]
        for stage in self.down:
            h = stage(h)
            hs.append(h)
        h = self.middle(h)
        for stage in self.up:
            h = stage(torch.cat([h, hs.pop()], dim=1))
        return self.head(h)
