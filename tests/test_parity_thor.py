"""Parity of THOR's map arithmetic with the authors' code (ci-ber/THOR_DDPM ``model_zoo/ddpm.py``).

``fixtures/parity/thor_maps.npz`` holds, for two brain-like 128 x 128 phantoms ``x`` (zero
background) and three pseudo-healthy estimates ``x0_hat`` each, the raw per-pixel LPIPS map
their code computed (random-weight LPIPS-SqueezeNet, stored as float16) and the outputs of
their ``get_anomaly_mask`` (step map), ``get_region_anomaly_mask`` (soft mask, k = 13) and
``scipy.stats.hmean`` over the step maps. Our ``THOR.step_map`` is fed the same raw
perceptual map (the LPIPS network itself is covered by ``test_parity_lpips.py``; the
authors feed it ``4x - 3``, we ``2x - 1``, a documented departure), so what is compared is
everything after LPIPS: Gaussian smoothing (sigma 2), clip, residual product, per-image max
normalisation, grey closing + dilation, averaging, and the harmonic mean.
"""

from __future__ import annotations


import numpy as np
import torch

from methods.thor import THOR
from methods.thor.maps import harmonic_mean, soft_mask
from tests.parity_helpers import FixedMap, f32, load_fixture

#: float32 arithmetic on both sides; scipy and torch sum the Gaussian taps in different
#: orders, and the step map divides by a per-image maximum
ATOL = 2e-5





def _thor(fx: dict[str, np.ndarray]) -> THOR:
    return THOR.from_profile("paper", morph_kernel=int(fx["morph_kernel"]), perceptual_sigma=float(fx["sigma"]), step_map_norm="max", data_range=(0.0, 1.0))  # the authors map [0, 1] data by 2x - 1


def _our_step_maps(fx: dict[str, np.ndarray]) -> list[torch.Tensor]:
    thor = _thor(fx)
    x = f32(fx["x"]) * 2 - 1  # model space; the maps are invariant to the data scale
    maps = []
    for s in range(fx["x0_hat"].shape[0]):
        fixed = FixedMap(f32(fx["perceptual"][s]))
        thor.perceptual_distance = lambda fixed=fixed: fixed  # instance override: no LPIPS weights needed
        maps.append(thor.step_map(f32(fx["x0_hat"][s]) * 2 - 1, x))
    return maps


def test_step_maps_match_authors() -> None:
    fx = load_fixture("thor_maps")
    maps = _our_step_maps(fx)
    for s, m in enumerate(maps):
        ref = fx["step_maps"][s]
        assert float(ref.max()) > 0.99 and float((ref > 0.05).mean()) > 0.005, "fixture step map is degenerate"
        err = float(np.abs(m.numpy() - ref).max())
        assert err < ATOL, f"step map {s} differs from the authors' by {err:.2e} (tolerance {ATOL})"


def test_soft_masks_match_authors() -> None:
    """Fed the authors' own step maps, so this isolates the morphology (closing + dilation, k = 13)."""
    fx = load_fixture("thor_maps")
    k = int(fx["morph_kernel"])
    for s in range(fx["step_maps"].shape[0]):
        ours = soft_mask(f32(fx["step_maps"][s]), k).numpy()
        ref = fx["soft_masks"][s]
        assert float(ref.max()) > 0.5
        err = float(np.abs(ours - ref).max())
        assert err < 1e-6, f"soft mask {s} differs from the authors' by {err:.2e}"


def test_harmonic_mean_of_step_maps_matches_authors() -> None:
    fx = load_fixture("thor_maps")
    ours = harmonic_mean(_our_step_maps(fx)).numpy()
    ref = fx["hmean"]
    assert float(ref.max()) > 0.3
    err = float(np.abs(ours - ref).max())
    assert err < ATOL, f"harmonic mean differs from the authors' by {err:.2e}"

