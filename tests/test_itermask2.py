"""IterMask2: the frequency mask, the training masks, tau, and the shrinking loop (stub networks)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from methods.itermask2 import IterMask2, high_pass_phase, masked_error_threshold, sample_training_masks
from methods.itermask2.frequency import low_frequency_disc
from methods.itermask2.masks import sample_square_cover, top_fraction_mask
from tests.conftest import make_tiny_slices


@pytest.mark.parametrize("size", [(64, 64), (33, 40)])
def test_disc_is_the_brute_force_disc_around_the_centre_index(size):
    h, w = size
    disc = low_frequency_disc(h, w, 15.0).numpy()
    expected = np.array([[math.hypot(i - h // 2, j - w // 2) < 15.0 for j in range(w)] for i in range(h)])
    assert np.array_equal(disc, expected)


def test_high_pass_keeps_phase_sets_unit_magnitude_inside_and_is_exact_outside():
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 4 - 3
    hp = high_pass_phase(x, 15.0)
    assert hp.shape == x.shape and hp.dtype == x.dtype
    before = torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1))
    after = torch.fft.fftshift(torch.fft.fft2(hp), dim=(-2, -1))
    inside = low_frequency_disc(64, 64, 15.0)
    assert inside.sum() > 600 and (~inside).sum() > 3000
    # inside: magnitude 1, same phase (compared as unit phasors, so +-pi wraps do not matter)
    assert torch.allclose(after.abs()[..., inside], torch.ones(1, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(after[..., inside], before[..., inside] / before.abs()[..., inside], atol=1e-9)
    # outside: the coefficients are untouched
    assert torch.allclose(after[..., ~inside], before[..., ~inside], atol=1e-9)
    # and the result is real: the disc is symmetric about the centre index
    spec = torch.where(inside, before / before.abs(), before)
    assert torch.fft.ifft2(torch.fft.ifftshift(spec, dim=(-2, -1))).imag.abs().max() < 1e-9


def test_training_squares_are_anchored_on_brain_rows_and_columns():
    # A one-pixel brain: every square has its corner there, so the union is the 16-px square.
    brain = np.zeros((240, 240), bool)
    brain[100, 50] = True
    cover = sample_square_cover(brain, np.random.default_rng(0))
    expected = np.zeros((240, 240), np.float32)
    expected[100:116, 50:66] = 1
    assert np.array_equal(cover, expected)


def test_training_masks_stay_in_the_brain_with_fractional_edges_and_a_plausible_coverage():
    yy, xx = np.mgrid[:128, :128]
    brain = torch.from_numpy(((yy - 64) ** 2 / 50**2 + (xx - 64) ** 2 / 40**2 <= 1).astype(np.float32))
    brains = brain[None].repeat(60, 1, 1)
    masks = sample_training_masks(brains, (128, 128), np.random.default_rng(1))
    assert masks.shape == (60, 1, 128, 128)
    assert masks.min() >= 0 and masks.max() <= 1 and masks[:, 0][:, brain == 0].abs().sum() == 0
    assert ((masks > 0) & (masks < 1)).any(), "area resizing from the 240 grid leaves fractional edges"
    coverage = masks[:, 0].sum((1, 2)) / brain.sum()
    assert 0.04 < float(coverage.median()) < 0.3  # the authors' sampler: a median of about 11-15 %


def test_tau_is_the_80th_percentile_of_the_masked_errors():
    gen = torch.Generator().manual_seed(0)
    errors = torch.rand(5, 1, 16, 16, generator=gen) + 0.01  # positive, like squared errors
    masks = (torch.rand(5, 1, 16, 16, generator=gen) < 0.3).float()
    masked = np.sort(errors[masks > 0].numpy().astype(np.float64))
    expected = masked[int(0.8 * masked.size) - 1]  # the authors' kthvalue, brute force
    assert masked_error_threshold(errors, masks, 80.0) == pytest.approx(expected)
    assert masked_error_threshold(errors, masks, 80.0) == pytest.approx(np.percentile(masked, 80), rel=0.02)
    assert masked_error_threshold(errors, masks, 50.0) < masked_error_threshold(errors, masks, 80.0)


def test_first_mask_is_the_top_fraction_of_the_brain():
    errors = torch.arange(100, dtype=torch.float32).reshape(1, 1, 10, 10) + 1
    brain = torch.zeros(1, 1, 10, 10)
    brain[..., :5, :] = 1  # 50 brain pixels, errors 1..50
    mask = top_fraction_mask(errors, brain, 0.6)
    assert mask.sum() == 30 and mask[..., 2:5, :].sum() == 30  # the 30 largest brain errors


class _Zero(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x[:, :1])


class _Shrinking(nn.Module):
    """net1 stub for one image: error 100 on a random pixel set that shrinks by ``factor`` per call."""

    def __init__(self, u: torch.Tensor, factor: float, freeze_after: int):
        super().__init__()
        self.u, self.factor, self.freeze_after, self.calls = u, factor, freeze_after, 0
        self.order = torch.randperm(u[0, 0].numel(), generator=torch.Generator().manual_seed(0))

    def keep(self, call: int) -> torch.Tensor:
        n = int(self.order.numel() * self.factor ** min(call, self.freeze_after))
        flat = torch.zeros(self.order.numel())
        flat[self.order[:n]] = 1
        return flat.reshape(self.u.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.u + 10.0 * self.keep(self.calls)


def _stub_method(max_iterations: int, factor: float, freeze_after: int):
    data = make_tiny_slices(n_train=1, n_val=0, n_test=1, size=32)
    test = data.split("test")
    method = IterMask2.from_profile("tiny", device="cpu", max_iterations=max_iterations)
    method.input_shape_ = (1, 32, 32)
    method._build()
    method.tau_, method.fitted_ = 1.0, True
    images = torch.from_numpy(np.asarray(test.images))
    u = method._to_units(images)
    method.net0, method.net1 = _Zero(), _Shrinking(u, factor, freeze_after)
    return method, images, torch.from_numpy(np.asarray(test.brain_masks)), u


def _check_never_grows(trace) -> dict[int, list[int]]:
    """Per image: M' inside M at every pass, so |M| never increases; returns |M| per pass."""
    sizes: dict[int, list[int]] = {}
    for active, before, after in trace:
        for row, image in enumerate(active):
            assert torch.all(after[row] <= before[row]), "M' must lie inside M"
            sizes.setdefault(int(image), []).append(int(before[row].sum()))
    for seq in sizes.values():
        assert seq == sorted(seq, reverse=True)
    return sizes


def test_mask_shrinks_until_the_one_percent_rule_and_the_map_is_the_last_residual():
    method, images, brains, u = _stub_method(max_iterations=10, factor=0.5, freeze_after=3)
    trace: list = []
    _, y, brain, passes, capped = method._refine(images, brains, trace)
    # passes 1-3 shrink M by about half; pass 4 leaves it unchanged: the 1 % rule stops there
    assert passes.tolist() == [4] and capped.tolist() == [False]
    sizes = _check_never_grows(trace)[0]
    assert sizes[0] > sizes[1] > sizes[2] > sizes[3] and int(trace[-1][2].sum()) == sizes[3]
    assert torch.allclose(y, method.net1.u + 10.0 * method.net1.keep(4))
    method.net1.calls = 0  # score() runs the same loop again
    maps = method.score(images, brains)
    expected = (10.0 / 6.0) ** 2 * method.net1.keep(4)[0, 0] * brains[0]
    assert torch.allclose(maps[0], expected, atol=1e-5)
    assert method.iterations_.tolist() == [4] and method.notes["iterations_per_score_call"][-1]["cap_hits"] == 0


def test_iteration_cap_stops_a_mask_that_keeps_shrinking_and_is_recorded():
    method, images, brains, _ = _stub_method(max_iterations=6, factor=0.8, freeze_after=100)
    trace: list = []
    *_, passes, capped = method._refine(images, brains, trace)
    assert passes.tolist() == [6] and capped.tolist() == [True] and len(trace) == 6
    sizes = _check_never_grows(trace)[0]
    assert all(b < 0.99 * a for a, b in zip(sizes, sizes[1:]))  # the 1 % rule never fired
    method.net1.calls = 0
    method.score(images, brains)
    note = method.notes["iterations_per_score_call"][-1]
    assert note["cap"] == 6 and note["cap_hits"] == 1 and note["histogram"] == {"6": 1}


def test_untrained_networks_never_grow_the_mask_either():
    data = make_tiny_slices(n_train=1, n_val=0, n_test=4, size=32)
    test = data.split("test")
    method = IterMask2.from_profile("tiny", device="cpu", max_iterations=8)
    method.input_shape_ = (1, 32, 32)
    method._build()
    for net in (method.net0, method.net1):  # make the zero-initialised heads produce something
        nn.init.normal_(net.head[-1].weight, std=0.3)
    method.tau_, method.fitted_ = 0.5, True
    trace: list = []
    with torch.no_grad():
        *_, passes, _ = method._refine(torch.from_numpy(np.asarray(test.images)), torch.from_numpy(np.asarray(test.brain_masks)), trace)
    assert len(trace) == passes.max() >= 1
    sizes = _check_never_grows(trace)
    assert [len(sizes[i]) for i in range(4)] == passes.tolist()


def test_fit_needs_the_validation_split():
    data = make_tiny_slices(n_train=4, n_val=0, n_test=1, size=32)
    method = IterMask2.from_profile("tiny", device="cpu")
    with pytest.raises(ValueError, match="validation split `val`"):
        method.fit(data.split("train"))
