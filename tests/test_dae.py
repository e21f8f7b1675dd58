"""DAE (Kascenas et al.): network details, the coarse training noise, and the map.

References are brute force (numpy bilinear interpolation, window counts) or scipy
(``scipy.ndimage.median_filter``), never the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

import methods.dae.method as dae_method
from methods.base import ConfigError, UADMethod
from methods.dae import DAEConfig, DenoisingAutoencoder
from methods.dae.network import DAEUNet, WSConv2d, group_count
from methods.dae.ops import (
    add_coarse_noise,
    draw_coarse_noise,
    erode_foreground,
    masked_mse,
    median_filter,
    unit_ratio,
    upsample_grid,
)
from tests.conftest import make_tiny_slices


# ---------------------------------------------------------------- network
def test_group_count_is_the_authors_middle_divisor() -> None:
    assert [group_count(c) for c in (64, 128, 256, 512)] == [8, 16, 16, 32]
    assert group_count(1) == 1 and group_count(7) == 7  # divisors (1, 7): index 1


def test_ws_conv_standardises_each_filter() -> None:
    torch.manual_seed(0)
    conv = WSConv2d(3, 5, kernel_size=3)
    with torch.no_grad():
        conv.weight.mul_(4.0).add_(1.5)
    w = conv.weight.detach().double()
    centred = w - w.mean(dim=(1, 2, 3), keepdim=True)
    ref_w = centred / (centred.reshape(5, -1).std(dim=1, unbiased=True).view(-1, 1, 1, 1) + 1e-5)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    ref = F.conv2d(x, ref_w, conv.bias.detach().double())
    assert torch.allclose(conv.double()(x), ref, atol=1e-10)


def test_unet_layout() -> None:
    net = DAEUNet(1, (64, 128, 256, 512))
    convs = [m for m in net.modules() if isinstance(m, WSConv2d)]
    assert len(convs) == 2 * (4 + 3), "two weight-standardised convs per block, 4 down + 3 up blocks"
    assert all(c.kernel_size == (3, 3) and c.padding == (0, 0) for c in convs)  # padding is a reflect layer
    assert sum(isinstance(m, torch.nn.ReflectionPad2d) for m in net.modules()) == len(convs)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert [(n.num_groups, n.num_channels) for n in norms[:8:2]] == [(8, 64), (16, 128), (16, 256), (32, 512)]
    ups = [m for m in net.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [(u.in_channels, u.out_channels, u.kernel_size, u.stride) for u in ups] == [
        (512, 256, (2, 2), (2, 2)),
        (256, 128, (2, 2), (2, 2)),
        (128, 64, (2, 2), (2, 2)),
    ]
    assert type(net.head) is torch.nn.Conv2d and net.head.kernel_size == (1, 1) and net.head.out_channels == 1
    block = list(net.down[0])
    assert [type(m).__name__ for m in block[:4]] == ["ReflectionPad2d", "WSConv2d", "SiLU", "GroupNorm"]
    x = torch.randn(2, 1, 32, 32)
    assert net(x).shape == x.shape


# ---------------------------------------------------------------- noise
def _bilinear_aligned_reference(grid: np.ndarray, size: int) -> np.ndarray:
    """Brute-force bilinear interpolation of an r x r grid onto size x size, corners aligned."""
    r = grid.shape[-1]
    pos = np.arange(size) * (r - 1) / (size - 1)
    lo = np.minimum(np.floor(pos).astype(int), r - 2)
    t = pos - lo
    out = np.zeros(grid.shape[:-2] + (size, size))
    for i in range(size):
        for j in range(size):
            a, b, u, v = lo[i], lo[j], t[i], t[j]
            out[..., i, j] = (
                (1 - u) * (1 - v) * grid[..., a, b] + (1 - u) * v * grid[..., a, b + 1] + u * (1 - v) * grid[..., a + 1, b] + u * v * grid[..., a + 1, b + 1]
            )
    return out


def test_noise_is_the_grid_bilinearly_upsampled_with_aligned_corners() -> None:
    grid = np.random.default_rng(0).normal(size=(2, 1, 16, 16))
    ours = upsample_grid(torch.as_tensor(grid), (128, 128)).numpy()
    assert np.allclose(ours, _bilinear_aligned_reference(grid, 128), atol=1e-10)


def _high_frequency_share(noise: torch.Tensor, cutoff: float) -> float:
    power = torch.fft.fft2(noise.double()).abs().pow(2).mean(dim=(0, 1))
    k = torch.fft.fftfreq(noise.shape[-1]).abs() * noise.shape[-1]
    return float(power[torch.maximum(k[:, None], k[None, :]) > cutoff].sum() / power.sum())


def test_training_noise_has_the_grid_scale() -> None:
    """16 x 16 grid at 128 px: over 85 % of the power below 8 cycles per image (the grid's
    Nyquist); the same noise drawn on a twice finer grid keeps only half there. The cyclic
    shift does not change the power spectrum, so the check holds for the rolled noise."""
    g = torch.Generator().manual_seed(1)
    x = torch.zeros(48, 1, 128, 128)
    noise = add_coarse_noise(x, torch.ones(48, 1, 128, 128), torch.tensor([1.0]), 16, g)
    assert _high_frequency_share(noise, 8) < 0.15
    finer = add_coarse_noise(x, torch.ones(48, 1, 128, 128), torch.tensor([1.0]), 32, g)
    assert _high_frequency_share(finer, 8) > 0.4


def test_training_noise_std_matches_bilinear_weights() -> None:
    """Pixel variance = std^2 * mean over pixels of the summed squared bilinear weights."""
    r, size, std = 16, 128, 0.37
    basis = torch.eye(r * r, dtype=torch.float64).view(r * r, 1, r, r)
    weight_energy = float(upsample_grid(basis, (size, size)).pow(2).sum() / size**2)
    g = torch.Generator().manual_seed(2)
    noise = add_coarse_noise(torch.zeros(400, 1, size, size), torch.ones(400, 1, size, size), torch.tensor([std]), r, g)
    assert abs(float(noise.var()) / (std**2 * weight_energy) - 1) < 0.05
    assert abs(float(noise.mean())) < 0.01


def test_training_noise_only_inside_the_foreground() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.rand(64, 2, 32, 32) + 0.5
    fg = torch.zeros(64, 1, 32, 32)
    fg[:, :, 5:25, 8:30] = 1
    noisy = add_coarse_noise(x, fg, torch.tensor([0.2, 0.4]), 4, g)
    diff = noisy - x
    inside = fg.expand_as(x) == 1
    assert torch.all(diff[~inside] == 0)
    assert (diff[inside] != 0).float().mean() > 0.99
    # per-channel std: the second channel's noise is twice the first's
    ratio = float(diff[:, 1][inside[:, 1]].std() / diff[:, 0][inside[:, 0]].std())
    assert 1.7 < ratio < 2.3


def test_one_cyclic_shift_per_batch() -> None:
    shifts = []
    for seed in range(12):
        noise, shift = draw_coarse_noise(3, torch.tensor([1.0, 2.0]), (16, 16), 4, torch.Generator().manual_seed(seed))
        lattice = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(seed)) * torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)
        plain = upsample_grid(lattice, (16, 16))
        matches = [(dy, dx) for dy in range(16) for dx in range(16) if torch.allclose(torch.roll(plain, (dy, dx), dims=(-2, -1)), noise)]
        assert matches == [shift], "the whole batch is rolled by the one returned shift"
        shifts.append(shift)
    assert len(set(shifts)) >= 9, "shifts are random over the image"


def test_masked_mse_averages_over_every_element() -> None:
    pred, target = torch.ones(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)
    fg = torch.zeros(2, 1, 4, 4)
    fg[:, :, :2] = 1
    assert float(masked_mse(pred, target, fg)) == pytest.approx(0.5)


# ---------------------------------------------------------------- map post-processing
def test_median_filter_matches_scipy() -> None:
    x = torch.rand(2, 1, 17, 21, generator=torch.Generator().manual_seed(4))
    ours = median_filter(x, 5).numpy()
    ref = np.stack([ndimage.median_filter(x[i, 0].numpy(), size=5, mode="mirror") for i in range(2)])[:, None]
    assert np.array_equal(ours, ref)


def test_erosion_keeps_pixels_with_at_most_one_background_neighbour() -> None:
    rng = np.random.default_rng(5)
    mask = ndimage.binary_opening(rng.random((3, 20, 24)) > 0.3, iterations=1, structure=np.ones((1, 3, 3))).astype(np.float32)
    mask[:, :, :6] = 1  # touches the border: outside the image counts as background
    padded = np.pad(mask, ((0, 0), (2, 2), (2, 2)))
    counts = sum(padded[:, dy : dy + 20, dx : dx + 24] for dy in range(5) for dx in range(5))
    ref = counts >= 24
    ours = erode_foreground(torch.as_tensor(mask)[:, None], 5, 0.95)[:, 0].numpy() > 0
    assert np.array_equal(ours, ref)
    assert ours.any() and (ours != (mask > 0)).any()


@pytest.fixture(scope="module")
def fitted() -> tuple[DenoisingAutoencoder, object, object]:
    data = make_tiny_slices(n_train=8, n_val=4, n_test=4, size=32)
    method = DenoisingAutoencoder.from_profile("tiny", device="cpu")
    method.fit(data.split("train"), data.split("val"))
    return method, data.split("train"), data.split("test")


def test_map_is_the_median_of_the_residual_in_the_eroded_foreground(fitted) -> None:
    method, _, test = fitted
    images, brains = np.asarray(test.images), np.asarray(test.brain_masks)
    recon = method.reconstruct(images, brains).numpy()
    eroded = erode_foreground(torch.as_tensor(brains)[:, None].float())[:, 0].numpy()
    residual = np.abs(images - recon).mean(axis=1) * eroded
    ref = np.stack([ndimage.median_filter(r, size=5, mode="mirror") for r in residual]) * (brains > 0)
    maps = method.score(images, brains).numpy()
    assert np.allclose(maps, ref, atol=1e-6)
    # The median runs after masking (their order): the map is zero wherever most of the
    # 5 x 5 window lies outside the eroded foreground, in particular 3 px or more from it.
    method.config.apply_brain_mask = False
    raw = method.score(images, brains).numpy()
    method.config.apply_brain_mask = True
    near = ndimage.binary_dilation(eroded > 0, structure=np.ones((1, 5, 5)))
    assert np.all(raw[~near] == 0) and (raw[eroded > 0] > 0).mean() > 0.5


def test_fit_converts_the_noise_std_to_data_units(fitted, monkeypatch) -> None:
    method, train, _ = fitted
    ratio = unit_ratio(train.images, train.brain_masks)
    brain = np.asarray(train.images)[:, 0][np.asarray(train.brain_masks) > 0]
    assert ratio[0] == pytest.approx(np.percentile(brain, 99) / np.percentile(brain, 90))
    assert method.notes["noise_std_data_units"][0] == pytest.approx(0.2 * ratio[0], rel=1e-5)
    seen = []
    real = dae_method.add_coarse_noise
    monkeypatch.setattr(dae_method, "add_coarse_noise", lambda x, fg, std, grid, g: seen.append((std.clone(), grid)) or real(x, fg, std, grid, g))
    DenoisingAutoencoder.from_profile("tiny", device="cpu", noise_unit_ratio=2.5, iterations=2).fit(train)
    assert seen and all(torch.allclose(s, torch.tensor([0.5])) and grid == 4 for s, grid in seen)


def test_best_validation_checkpoint_and_round_trip(fitted, tmp_path) -> None:
    method, _, test = fitted
    assert method.notes["checkpoint"] == "best validation loss"
    assert method.notes["best_iteration"] % method.config.epoch_len == 0
    method.save(tmp_path / "dae")
    loaded = UADMethod.load(tmp_path / "dae")
    assert np.allclose(loaded.unit_ratio_, method.unit_ratio_)
    assert torch.equal(loaded.score(test.images, test.brain_masks), method.score(test.images, test.brain_masks))


def test_intensity_foreground_uses_their_threshold_in_data_units(fitted) -> None:
    method, _, _ = fitted
    m = DenoisingAutoencoder(DAEConfig(foreground="intensity"))
    m.unit_ratio_ = np.array([2.0])
    x = torch.tensor([[[[0.0, 0.019], [0.021, 1.0]]]])
    assert m._foreground(x, torch.ones(1, 2, 2))[0, 0].tolist() == [[0.0, 0.0], [1.0, 1.0]]


def test_bad_config_is_named() -> None:
    data = make_tiny_slices(n_train=4, n_val=0, n_test=2, size=32)
    with pytest.raises(ConfigError, match="foreground"):
        DenoisingAutoencoder.from_profile("tiny", device="cpu", foreground="skull").fit(data.split("train"))
    with pytest.raises(ConfigError, match="divisible by 8"):
        DenoisingAutoencoder.from_profile("tiny", device="cpu", image_size=36).fit(data.split("train"))
