"""Parity of the pixel-diffusion backbone with the authors' UNet (ci-ber/THOR_DDPM ``net_utils``).

The fixture ``fixtures/parity/backbone.npz`` holds a seeded random state dict of the
authors' MONAI-Generative ``DiffusionModelUNet`` copy (old key layout, float16), fixed
inputs and timesteps, and the authors' network output (see ``fixtures/parity/README.md``).
Our ``build_unet`` must load that state dict (MONAI's ``load_old_state_dict``) and give the
same output; the authors' attention blocks never apply their output projection, so this
only holds with ``include_fc=False``.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from methods.common.backbone import build_unet
from tests.parity_helpers import load_fixture

#: float32 on CPU, same weights: only summation order differs (SDPA vs baddbmm attention)
ATOL = 1e-4



def authors_state_dict(fx: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The authors' (MONAI-Generative layout) state dict stored in a fixture, as float32 tensors."""
    return {k[len("sd/") :]: torch.from_numpy(v.astype(np.float32)) for k, v in fx.items() if k.startswith("sd/")}


#: the fixture network: THOR's layout at a small width (parity of the definition needs no size)
SMALL = {"channels": (16, 32, 32), "attention_levels": (False, True, True), "num_res_blocks": 1, "num_head_channels": 16, "norm_num_groups": 16}


def load_authors_weights(net: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load an authors' checkpoint into our MONAI UNet; every tensor of ours must come from it."""
    net.load_old_state_dict(dict(state))  # pops from its argument: pass a copy
    # MONAI renames keys (attention, upsampler); check by value that nothing kept its init
    theirs = list(state.values())
    for k, v in net.state_dict().items():
        assert any(v.shape == s.shape and torch.equal(v, s) for s in theirs), f"our {k} was not loaded from the authors' state dict"


@pytest.mark.parametrize("flash", [False, True], ids=["matrix-attention", "sdpa-attention"])
def test_backbone_output_matches_authors_unet(flash: bool) -> None:
    fx = load_fixture("backbone")
    net = build_unet(in_channels=1, out_channels=1, use_flash_attention=flash, **SMALL).eval()
    load_authors_weights(net, authors_state_dict(fx))
    x = torch.from_numpy(fx["x"].astype(np.float32))
    t = torch.from_numpy(fx["timesteps"]).long()
    with torch.no_grad():
        out = net(x, t).numpy()
    ref = fx["out"]
    assert out.shape == ref.shape
    assert float(np.abs(ref).std()) > 0.05, "fixture output is degenerate"
    err = float(np.abs(out - ref).max())
    assert err < ATOL, f"backbone differs from the authors' UNet by {err:.2e} (tolerance {ATOL})"


def test_paper_backbone_parameter_count() -> None:
    """THOR / AutoDDPM / DDPM paper config: 18,040,449 parameters, as the authors' network
    without its never-used attention projections (18,500,993 with them)."""
    net = build_unet(in_channels=1, out_channels=1)
    n = sum(p.numel() for p in net.parameters())
    assert n == 18_040_449, n


@pytest.mark.parametrize("key", ["down_blocks.1.attentions.0.proj_attn.weight"])
def test_fixture_carries_the_unused_projection(key: str) -> None:
    """The fixture really is the authors' layout (projection stored, random, never applied)."""
    sd = authors_state_dict(load_fixture("backbone"))
    assert key in sd and float(sd[key].abs().mean()) > 0.01
