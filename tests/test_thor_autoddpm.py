"""THOR and AutoDDPM: map arithmetic on hand-made maps, RePaint's known region, and the
method contract on tiny networks (fit, finite maps, save/load, notes)."""

from __future__ import annotations

import pytest
import torch

import numpy as np

from methods.autoddpm import AutoDDPM, binary_mask, per_image_quantile
from methods.base import UADMethod
from methods.thor import THOR
from methods.thor.maps import grey_closing, grey_dilation, harmonic_mean, soft_mask
from tests.conftest import make_tiny_slices


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny UNets: one thread avoids OpenMP spinning on a shared 2-core box
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def data():
    return make_tiny_slices(n_train=8, n_val=2, n_test=4, size=32)


def _blob(size: int = 41, half: int = 2) -> torch.Tensor:
    m = torch.zeros(1, 1, size, size)
    c = size // 2
    m[..., c - half : c + half + 1, c - half : c + half + 1] = 1.0
    return m


# ------------------------------------------------------------------ THOR maps
def test_harmonic_mean_of_equal_maps_is_the_map() -> None:
    m = torch.rand(2, 1, 8, 8) + 0.01
    assert torch.allclose(harmonic_mean([m, m, m]), m, atol=1e-6)


def test_harmonic_mean_zero_anywhere_gives_zero_and_matches_formula() -> None:
    a, b = torch.rand(1, 1, 4, 4) + 0.1, torch.rand(1, 1, 4, 4) + 0.1
    b[0, 0, 1, 2] = 0.0
    h = harmonic_mean([a, b])
    assert h[0, 0, 1, 2] == 0
    keep = b > 0
    assert torch.allclose(h[keep], (2 / (1 / a + 1 / b))[keep])
    assert torch.isfinite(h).all()
    assert torch.all(h <= torch.maximum(a, b) + 1e-6) and torch.all(h <= (a + b) / 2 + 1e-6)  # HM <= AM


def test_dilation_grows_a_blob_by_half_the_kernel() -> None:
    m = _blob(41, half=2)  # 5 x 5
    grown = grey_dilation(m, 13)
    assert int(grown.sum()) == (5 + 2 * 6) ** 2  # 6 px each side
    assert torch.equal(grey_dilation(m, 1), m)


def test_closing_fills_a_small_hole() -> None:
    m = _blob(41, half=8)
    m[..., 20, 20] = 0.0  # a one-pixel hole
    m[..., 18:21, 22:24] = 0.2  # a small dark gap
    closed = grey_closing(m, 13)
    assert closed[..., 20, 20].item() == 1.0 and closed[..., 18:21, 22:24].min().item() == 1.0
    assert torch.all(closed >= m)  # closing is extensive
    assert closed[..., 0, 0].item() == 0.0  # and does not spread into the background


def test_soft_mask_in_unit_range_and_covers_the_anomaly() -> None:
    m = _blob(41, half=3) * 0.9
    m[..., 5, 5] = 0.3  # isolated weak response
    mask = soft_mask(m, 13)
    assert mask.min() >= 0 and mask.max() <= 1
    assert torch.allclose(mask[..., 20, 20], torch.tensor(0.9))  # (0.9 + 0.9) / 2 inside the blob
    assert torch.allclose(mask[..., 20, 20 + 3 + 6], torch.tensor(0.45))  # dilated rim: (0.9 + 0) / 2
    assert mask[..., 20, 20 + 3 + 7].item() == 0.0
    assert torch.all(soft_mask(torch.full((1, 1, 9, 9), 5.0), 3) == 1.0)  # clipped


# ------------------------------------------------------------------ AutoDDPM mask
def test_autoddpm_mask_threshold_and_dilation() -> None:
    cmap = torch.zeros(2, 1, 16, 16)
    cmap[0, 0, 8, 8] = 0.14  # just above 0.13
    cmap[0, 0, 2, 2] = 0.13  # not above: stays out
    cmap[1, 0, 0, 0] = 0.5  # a corner pixel: the dilation is cut by the border
    mask = binary_mask(cmap, 0.13, 3)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert int(mask[0].sum()) == 9 and mask[0, 0, 7:10, 7:10].min() == 1
    assert mask[0, 0, 2, 2] == 0
    assert int(mask[1].sum()) == 4
    # negative threshold: the per-image 95th percentile
    ramp = torch.arange(100.0).view(1, 1, 10, 10) / 100
    assert int(binary_mask(ramp, -1, 1).sum()) == 5


def test_per_image_quantile_matches_numpy() -> None:
    x = torch.rand(3, 1, 7, 9, generator=torch.Generator().manual_seed(0))
    expected = [np.percentile(x[i].numpy(), 95) for i in range(3)]
    assert np.allclose(per_image_quantile(x, 0.95).flatten().numpy(), expected, atol=1e-6)


# ------------------------------------------------------------------ methods on tiny networks
def _fit(cls, data, **overrides):
    method = cls.from_profile("tiny", device="cpu", seed=0, score_batch_size=4, **overrides)
    return method.fit(data.split("train"))


def test_repaint_keeps_the_known_region(data) -> None:
    method = _fit(AutoDDPM, data, resample_steps=3, t_inpaint=3)
    g = torch.Generator().manual_seed(0)
    known = torch.rand(2, 1, 16, 16, generator=g) * 2 - 1
    mask = torch.zeros(2, 1, 16, 16)
    mask[..., 4:10, 5:12] = 1.0
    seen = []

    def on_step(t, u, x_prev, known_prev):
        seen.append((t, u))
        assert torch.equal(x_prev[mask == 0], known_prev[mask == 0])  # known region = the noised original
        if t > 0:
            assert not torch.equal(known_prev, known)  # ... noised to level t - 1

    with torch.no_grad():
        out = method.repaint(known, torch.zeros_like(known), mask, method.generator(2), on_step=on_step)
    assert len(seen) == (3 + 1) * 3
    assert torch.equal(out[mask == 0], known[mask == 0])  # the last step keeps the clean original
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("cls", [THOR, AutoDDPM])
def test_scores_finite_deterministic_and_round_trip(cls, data, tmp_path) -> None:
    method = _fit(cls, data)
    assert method.notes["perceptual"] == "ssim-substitute"
    test = data.split("test")
    maps = method.score(test.images, test.brain_masks)
    assert maps.shape == (len(test), 32, 32) and torch.isfinite(maps).all() and maps.min() >= 0
    assert torch.equal(method.score(test.images, test.brain_masks), maps)
    recon = method.reconstruct(test.images, test.brain_masks)
    assert recon.shape == test.images.shape and torch.isfinite(recon).all()
    method.save(tmp_path / cls.name)
    loaded = UADMethod.load(tmp_path / cls.name)
    assert loaded.notes["perceptual"] == "ssim-substitute"
    assert torch.equal(loaded.score(test.images, test.brain_masks), maps)


def test_thor_harmonisation_blends_towards_the_input(data) -> None:
    """With a mask that is all zeros the blend is the input itself, re-noised with the same noise."""
    method = _fit(THOR, data)
    x = method.prepare(torch.as_tensor(data.split("test").images[:2]))
    assert method.map_steps() == [4, 3, 2, 1, 0]
    with torch.no_grad():
        _, amap = method.harmonise(x, method.generator(2))
    assert amap.shape == (2, 1, 16, 16) and amap.min() >= 0 and amap.max() <= 1
    # the range fix: nothing in THOR's chain clamps the blend to [0, 1] in model space
    method.config.step_map_norm = "none"
    with torch.no_grad():
        x_hat, _ = method.harmonise(x, method.generator(2))
    assert float(x_hat.min()) < 0.0  # dark background survives (the authors' clamp would lift it to >= 0)


def test_inference_knobs_change_maps_not_training_key(data) -> None:
    method = _fit(THOR, data)
    key = method.training_key()
    test = data.split("test")
    a = method.score(test.images, test.brain_masks)
    method.with_inference_overrides(map_every=0, morph_kernel=1)
    assert method.training_key() == key
    assert not torch.equal(method.score(test.images, test.brain_masks), a)


# ------------------------------------------------------------------ one checkpoint for DDPM, THOR and AutoDDPM
def test_a_run_of_ddpm_thor_autoddpm_trains_one_network(tmp_path) -> None:
    import json
    from pathlib import Path

    from benchmarks.run import main
    from datasets.format import save_slices

    prepared = save_slices(make_tiny_slices(n_train=6, n_val=2, n_test=3, size=32), tmp_path / "tiny-set")
    out = tmp_path / "run"
    argv = ["--protocol", "S1", "--methods", "ddpm,thor,autoddpm", "--profile", "tiny", "--data", str(prepared), "--out", str(out), "--seeds", "0", "--no-progress"]
    assert main(argv) == 0
    records = {r["method"]: r for r in (json.loads(p.read_text()) for p in (out / "records").rglob("*.json"))}
    assert set(records) == {"ddpm", "thor", "autoddpm"} and {r["status"] for r in records.values()} == {"ok"}
    assert len({r["checkpoint"] for r in records.values()}) == 1  # one shared checkpoint ...
    assert len({r["training_key"] for r in records.values()}) == 1
    assert sorted(r["timings"]["reused_checkpoint"] for r in records.values()) == [False, True, True]  # ... trained once
    trained_by = {r["timings"]["checkpoint_trained_by"] for r in records.values()}
    assert len(trained_by) == 1 and trained_by <= {"ddpm", "thor", "autoddpm"}
    assert {r["training_family"] for r in records.values()} == {"pixel-ddpm"}
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["pixel-ddpm"]
    assert len([p for p in Path(records["thor"]["checkpoint"]).parent.iterdir() if not p.name.startswith(".")]) == 1  # dot files: locks
