"""Parity of AutoDDPM's coarse map, mask and stitched image with the authors' code (ci-ber/autoDDPM).

``fixtures/parity/autoddpm_stages.npz``: two brain-like 128 x 128 phantoms ``x`` in [0, 1], a
fixed coarse reconstruction ``x_rec``, the raw LPIPS map their code computed for the pair
(random-weight LPIPS-SqueezeNet, float16), and what their ``get_autoDDPM_anomaly`` returned
as ``x_res_orig`` (coarse map), ``mask`` (thresholded, cv2-dilated 3 x 3) and ``stitch``, for
the published fixed threshold 0.13 and for the per-image 95th-percentile fallback (-1).

Our ``AutoDDPM.detect`` runs with its two network stages replaced (``coarse`` returns the
fixture's ``x_rec``; ``repaint`` returns its start image, the stitch), so the comparison
covers our real coarse-map, threshold, dilation and stitching code; the perceptual
network is fed the same raw map (LPIPS itself: ``test_parity_lpips.py``).
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from methods.autoddpm import AutoDDPM
from tests.parity_helpers import FixedMap, f32, load_fixture

#: coarse map: float32 both sides; ours adds 1e-8 to the 95th-percentile divisor
ATOL = 1e-5





def _detect(fx: dict[str, np.ndarray], threshold: float) -> dict[str, torch.Tensor]:
    method = AutoDDPM.from_profile("paper", mask_threshold=threshold, mask_dilation=3, residual_quantile=0.95, inpaint_start="stitch", data_range=(0.0, 1.0))  # the authors map [0, 1] data by 2x - 1
    fixed = FixedMap(f32(fx["perceptual"]))
    x_rec = f32(fx["x_rec"]) * 2 - 1  # model space; coarse map and mask are invariant to the data scale
    method.perceptual_distance = lambda: fixed
    method.coarse = lambda x, generator: x_rec.clone()
    method.repaint = lambda known, start, mask, generator, on_step=None: start
    return method.detect(f32(fx["x"]) * 2 - 1, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("tag", ["fixed", "q95"])
def test_coarse_map_mask_and_stitch_match_authors(tag: str) -> None:
    fx = load_fixture("autoddpm_stages")
    out = _detect(fx, float(fx[f"{tag}_threshold"]))

    ref_map = fx[f"{tag}_coarse_map"]
    assert float(ref_map.max()) > 0.5
    err = float(np.abs(out["coarse_map"].numpy() - ref_map).max())
    assert err < ATOL, f"coarse map differs from the authors' by {err:.2e} (tolerance {ATOL})"

    ref_mask = fx[f"{tag}_mask"].astype(np.float32)
    assert 0.01 < float(ref_mask.mean()) < 0.5, "fixture mask is degenerate"
    ours_mask = out["mask"].numpy()
    assert np.array_equal(ours_mask, ref_mask), f"mask differs from the authors' at {int((ours_mask != ref_mask).sum())} pixels"

    stitch = (out["stitch"].numpy() + 1) * 0.5  # back to the authors' [0, 1] data range
    err = float(np.abs(stitch - fx[f"{tag}_stitch"]).max())
    assert err < 1e-6, f"stitched image differs from the authors' by {err:.2e}"
