"""Parity of our offline LPIPS (``methods.common.perceptual.LPIPSDistance``) with the ``lpips`` package.

Both networks get identical random weights from one seeded rule (``seeded_weights``,
keyed by torchvision trunk names and ``lin<k>``), so the comparison covers the network
definitions: trunk architecture and slicing, input scaling layer, channel normalisation,
linear heads, spatial upsampling and the sum over layers.

* ``fixtures/parity/lpips_random.npz``: inputs and the ``lpips`` package's spatial output
  (``LPIPS(pretrained=False, pnet_rand=True, spatial=True)``, ``normalize=False``) for the
  ``squeeze``, ``alex`` and ``vgg`` trunks, generated once (see the fixtures README); runs
  everywhere.
* the live test builds the ``lpips`` network itself; skipped when ``lpips`` (and the
  torchvision it imports) cannot be imported.

Tolerance: ``1e-4`` of the map's maximum (float32; the trunks are the same convolutions).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from methods.common.perceptual import LPIPSDistance
from tests.parity_helpers import load_fixture

RTOL = 1e-4
NETS = ("squeeze", "alex", "vgg")



def seeded_weights(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic random weights by key: trunk ``features.*`` sorted (He-scaled weights, small
    biases), then ``lin<k>.weight`` in order (non-negative, as trained LPIPS heads). The
    fixture was made with the same rule."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    trunk = sorted(k for k in shapes if k.startswith("features."))
    lins = sorted((k for k in shapes if k.startswith("lin")), key=lambda k: int(k[3:].split(".")[0]))
    for k in trunk:
        shape = shapes[k]
        if k.endswith("weight"):
            out[k] = torch.randn(shape, generator=g) * math.sqrt(2.0 / math.prod(shape[1:]))
        else:
            out[k] = 0.01 * torch.randn(shape, generator=g)
    for k in lins:
        out[k] = torch.rand(shapes[k], generator=g) / shapes[k][1]
    return out


def ours_with_seeded_weights(net: str) -> LPIPSDistance:
    dist = LPIPSDistance(net)
    shapes = {f"features.{k}": tuple(v.shape) for k, v in dist.features.state_dict().items()}
    shapes.update({f"lin{i}.weight": tuple(lin.weight.shape) for i, lin in enumerate(dist.lins)})
    w = seeded_weights(shapes)
    dist.features.load_state_dict({k[len("features.") :]: v for k, v in w.items() if k.startswith("features.")})
    with torch.no_grad():
        for i, lin in enumerate(dist.lins):
            lin.weight.copy_(w[f"lin{i}.weight"])
    return dist.eval()


def _check(ours: torch.Tensor, ref: np.ndarray, what: str) -> None:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    scale = float(np.abs(ref).max())
    assert scale > 0
    err = float((ours - torch.from_numpy(ref)).abs().max())
    assert err <= RTOL * scale, f"{what}: LPIPS differs from the lpips package by {err:.2e} (max {scale:.2e})"


@pytest.mark.parametrize("net", NETS)
def test_lpips_matches_package_fixture(net: str) -> None:
    fx = load_fixture("lpips_random")
    x, y = (torch.from_numpy(fx[k].astype(np.float32)) for k in ("x", "y"))
    with torch.no_grad():
        ours = ours_with_seeded_weights(net)(x, y)
    _check(ours, fx[f"out_{net}"], f"fixture {net}")


def _import_lpips():
    try:
        import lpips  # noqa: F401  (imports torchvision, which may not load beside this torch)
    except Exception as exc:  # ImportError, or torchvision's operator registration failing
        pytest.skip(f"lpips package not importable: {exc.__class__.__name__}: {exc}")
    return lpips


@pytest.mark.parametrize("net", NETS)
def test_lpips_matches_package_live(net: str) -> None:
    lpips = _import_lpips()
    theirs = lpips.LPIPS(pretrained=False, net=net, pnet_rand=True, spatial=True, lpips=True, verbose=False).eval()
    ours = ours_with_seeded_weights(net)
    sd = theirs.state_dict()
    for k in sd:
        m = re.match(r"^net\.slice\d+\.(\d+)\.(.*)$", k)
        if m:
            sd[k] = ours.features.state_dict()[f"{m.group(1)}.{m.group(2)}"]
        m = re.match(r"^lins?\.?(\d+)\.model\.\d+\.weight$", k)
        if m:
            sd[k] = ours.lins[int(m.group(1))].weight.detach()
    theirs.load_state_dict(sd)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 1, 64, 64, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(2, 1, 64, 64, generator=g)).clamp(-1, 1)
    with torch.no_grad():
        ref = theirs(x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1), normalize=False).numpy()
        _check(ours(x, y), ref, f"live {net}")
