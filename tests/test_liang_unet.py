"""The Liang et al. UNet (IterMask2 / Cycl.UNet): the authors' layout and size."""

from __future__ import annotations

import pytest
import torch

from methods.common.liang_unet import AttentionBlock, LiangUNet, ResBlock


def _count(net: torch.nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in net.modules())


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_authors_layout_at_128_px(norm):
    net = LiangUNet(1, 1, 128, norm=norm)
    # The authors' UNetModel (32 x (1, 1, 2, 3, 4), 2 res blocks, attention at 32/16/8 px, resblock
    # up/down) has 5,918,753 parameters besides its unused time-embedding layers (counted from their code).
    assert sum(p.numel() for p in net.parameters()) == 5_918_753
    assert net.channel_mult == (1, 1, 2, 3, 4)
    # attention: 2 per encoder level and 3 per decoder level at 32, 16 and 8 px, plus the middle
    assert _count(net, AttentionBlock) == 3 * 2 + 3 * 3 + 1
    # res blocks: 5 levels x 2 + 4 down, middle 2, 5 levels x 3 + 4 up
    assert _count(net, ResBlock) == 14 + 2 + 19
    assert sum(b.resample == "down" for b in net.modules() if isinstance(b, ResBlock)) == 4


def test_shapes_zero_head_and_the_64_px_table():
    net = LiangUNet(2, 1, 64, model_channels=8, norm="group", norm_groups=8).eval()
    assert net.channel_mult == (1, 2, 3, 4)
    x = torch.randn(3, 2, 64, 64)
    with torch.no_grad():
        out = net(x)
    assert out.shape == (3, 1, 64, 64)
    assert torch.all(out == 0), "guided-diffusion zero-initialises the output conv"


def test_sizes_without_an_authors_table_need_channel_mult():
    with pytest.raises(ValueError, match="channel_mult"):
        LiangUNet(1, 1, 96)
    assert LiangUNet(1, 1, 96, channel_mult=(1, 2), attention_resolutions=(48,), num_res_blocks=1).channel_mult == (1, 2)
