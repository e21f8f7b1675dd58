"""The DAE's UNet (Kascenas et al., MIDL 2022; AntanasKascenas/DenoisingAE, src/unet.py,
src/ws_conv.py, src/swish.py).

A plain UNet without attention or time input. Each level is a block of two
[reflect-pad 1, weight-standardised 3x3 conv, Swish, GroupNorm] layers (normalisation after
the activation, as in their block). Down: 2x2 average pooling between levels (not after the
deepest). Up: a 2x2 stride-2 transposed convolution, concatenation [upsampled, skip], then a
block. Head: a plain 1x1 convolution, no output activation, so the output follows
intensities above 1 (S2 data are scaled by the brain's 90th percentile).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def group_count(channels: int) -> int:
    """GroupNorm groups as the authors choose them: the middle divisor of ``channels``.

    The divisors are sorted and the one at index ``len // 2`` is taken (the upper middle
    when there is an even number): 64 -> 8, 128 -> 16, 256 -> 16, 512 -> 32.
    """
    if channels < 1:
        raise ValueError(f"group_count: channels must be positive, got {channels}")
    divisors = sorted({d for i in range(1, math.isqrt(channels) + 1) if channels % i == 0 for d in (i, channels // i)})
    return divisors[len(divisors) // 2]


class WSConv2d(nn.Conv2d):
    """Convolution with weight standardisation (Qiao et al., 2019).

    Each output filter is centred and divided by (its unbiased standard deviation + 1e-5)
    before the convolution; the stored parameters stay unstandardised.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = w - w.mean(dim=(1, 2, 3), keepdim=True)
        w = w / (w.flatten(1).std(dim=1).view(-1, 1, 1, 1) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ConvBlock(nn.Sequential):
    """Two [reflect-pad, WS conv 3x3, Swish, GroupNorm] layers."""

    def __init__(self, c_in: int, c_out: int) -> None:
        layers: list[nn.Module] = []
        for a in (c_in, c_out):
            layers += [nn.ReflectionPad2d(1), WSConv2d(a, c_out, kernel_size=3), nn.SiLU(), nn.GroupNorm(group_count(c_out), c_out)]
        super().__init__(*layers)


class UpBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(c_in, c_out, kernel_size=2, stride=2)
        self.block = ConvBlock(2 * c_out, c_out)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([self.up(x), skip], dim=1))


class DAEUNet(nn.Module):
    """UNet with ``len(channels)`` levels; input and output have ``in_channels`` channels."""

    def __init__(self, in_channels: int, channels: tuple[int, ...] = (64, 128, 256, 512)) -> None:
        super().__init__()
        if len(channels) < 2:
            raise ValueError(f"DAEUNet: need at least two levels, got channels={channels}")
        widths = (in_channels, *channels)
        self.down = nn.ModuleList(ConvBlock(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.up = nn.ModuleList(UpBlock(channels[i + 1], channels[i]) for i in reversed(range(len(channels) - 1)))
        self.head = nn.Conv2d(channels[0], in_channels, kernel_size=1)
        self.factor = 2 ** (len(channels) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] % self.factor or x.shape[-1] % self.factor:
            raise ValueError(f"DAEUNet: image size {tuple(x.shape[-2:])} must be divisible by {self.factor}")
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < len(self.down) - 1:
                skips.append(x)
                x = F.avg_pool2d(x, 2)
        for block in self.up:
            x = block(x, skips.pop())
        return self.head(x)
