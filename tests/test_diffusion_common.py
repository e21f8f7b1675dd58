"""Shared diffusion building blocks: simplex noise, schedules, closed-form steps, base class."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from methods.common.backbone import build_unet, check_backbone
from methods.common.diffusion import PixelDiffusionConfig, PixelDiffusionMethod
from methods.common.schedules import make_schedule, scale_timestep
from methods.common.simplex import simplex_noise


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _high_freq_fraction(noise: torch.Tensor, cutoff: float = 0.1) -> float:
    """Fraction of spectral power above ``cutoff`` cycles/pixel."""
    power = torch.fft.rfft2(noise).abs() ** 2
    h, w = noise.shape[-2:]
    fy = torch.fft.fftfreq(h).abs().view(-1, 1)
    fx = torch.fft.rfftfreq(w).view(1, -1)
    radius = (fx**2 + fy**2).sqrt()
    return float(power[..., radius > cutoff].sum() / power.sum())


# ----------------------------------------------------------------------------- simplex noise
def test_simplex_shape_and_unit_statistics() -> None:
    noise = simplex_noise((4, 2, 64, 48), generator=_gen(0))
    assert noise.shape == (4, 2, 64, 48) and noise.dtype == torch.float32
    flat = noise.flatten(2)
    assert torch.allclose(flat.mean(-1), torch.zeros(4, 2), atol=1e-5)
    assert torch.allclose(flat.std(-1), torch.ones(4, 2), atol=1e-4)
    assert torch.isfinite(noise).all()


def test_simplex_reproducible_per_seed_and_independent_per_sample() -> None:
    a = simplex_noise((3, 1, 32, 32), generator=_gen(7))
    b = simplex_noise((3, 1, 32, 32), generator=_gen(7))
    c = simplex_noise((3, 1, 32, 32), generator=_gen(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # every sample of a batch gets its own noise (the authors repeat one image over the batch)
    corr = torch.corrcoef(a.flatten(1))
    assert corr[0, 1].abs() < 0.5 and corr[0, 2].abs() < 0.5


def test_simplex_is_spatially_smooth_unlike_white_noise() -> None:
    noise = simplex_noise((4, 1, 64, 64), octaves=1, frequency=16, generator=_gen(1))
    neighbour = torch.corrcoef(torch.stack([noise[..., :, :-1].flatten(), noise[..., :, 1:].flatten()]))[0, 1]
    assert neighbour > 0.9


def test_simplex_octave_structure() -> None:
    shape = (4, 1, 64, 64)
    one = simplex_noise(shape, octaves=1, persistence=0.8, frequency=32, generator=_gen(2))
    six_low = simplex_noise(shape, octaves=6, persistence=0.5, frequency=32, generator=_gen(2))
    six = simplex_noise(shape, octaves=6, persistence=0.8, frequency=32, generator=_gen(2))
    # finer octaves add high-frequency power; a higher persistence weights them more
    hf_one, hf_low, hf_six = (_high_freq_fraction(n) for n in (one, six_low, six))
    assert hf_one < hf_low < hf_six
    assert hf_six > 3 * hf_one
    # the coarsest octave sets the scale: a 32-pixel period is much smoother than an 8-pixel one
    coarse = simplex_noise(shape, octaves=1, frequency=32, generator=_gen(3))
    fine = simplex_noise(shape, octaves=1, frequency=8, generator=_gen(3))
    assert _high_freq_fraction(coarse, 0.05) < _high_freq_fraction(fine, 0.05)


def test_simplex_raw_scale_without_normalisation() -> None:
    raw = simplex_noise((2, 1, 64, 64), normalise=False, generator=_gen(4))
    assert 0.05 < float(raw.std()) < 2.0 and float(raw.abs().max()) < 4.0


# ----------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("kind,diffusers_name", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_schedules_match_diffusers(kind: str, diffusers_name: str) -> None:
    from diffusers import DDPMScheduler

    ours = make_schedule(kind, 1000, 1e-4, 0.02)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule=diffusers_name)
    assert ours.T == 1000
    torch.testing.assert_close(ours.betas, ref.betas.float(), atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod.float(), atol=1e-6, rtol=1e-5)


def test_eps_and_x0_parameterisations_invert_each_other() -> None:
    s = make_schedule("linear", 1000)
    g = _gen(0)
    x0, eps = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)
    t = torch.tensor([0, 350, 999])
    x_t = s.q_sample(x0, t, eps)
    torch.testing.assert_close(s.predict_x0(x_t, t, eps, "epsilon"), x0, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(s.predict_eps(x_t, t, x0, "sample"), eps, atol=1e-3, rtol=1e-3)
    assert torch.equal(s.predict_x0(x_t, t, x0, "sample"), x0)


def test_posterior_step_matches_diffusers_step() -> None:
    from diffusers import DDPMScheduler

    s = make_schedule("linear", 1000)
    ref = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    g = _gen(1)
    x_t, eps = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g)
    for t in (0, 1, 250, 999):
        expected = ref.step(eps, t, x_t, generator=_gen(5)).prev_sample
        noise = torch.randn(x_t.shape, generator=_gen(5)) if t > 0 else None
        ours = s.posterior_step(s.predict_x0(x_t, t, eps, "epsilon"), x_t, t, noise)
        torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_scale_timestep() -> None:
    assert [scale_timestep(t, 1000, 100) for t in (350, 250, 499)] == [35, 25, 50]


# ----------------------------------------------------------------------------- backbone
def test_build_unet_shapes_and_checks() -> None:
    net = build_unet(in_channels=2, out_channels=2, channels=(8, 16), attention_levels=(False, True), num_head_channels=8, norm_num_groups=8)
    out = net(torch.randn(2, 2, 16, 16), torch.tensor([0, 5]))
    assert out.shape == (2, 2, 16, 16)
    with pytest.raises(ValueError, match="norm_num_groups"):
        check_backbone((12, 16), (False, True), 8, 8)
    with pytest.raises(ValueError, match="num_head_channels"):
        check_backbone((8, 16), (False, True), 32, 8)


# ----------------------------------------------------------------------------- base class
class _Oracle(nn.Module):
    """Predicts the exact noise of a known x0: eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""

    def __init__(self, x0: torch.Tensor, abar: torch.Tensor) -> None:
        super().__init__()
        self.x0, self.abar = x0, abar
        self.calls = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        a = self.abar[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * self.x0) / (1 - a).sqrt()


class _Plain(PixelDiffusionMethod):
    name = "_plain_test"


def _oracle_method(x0: torch.Tensor) -> _Plain:
    method = _Plain(PixelDiffusionConfig(device="cpu", clip_denoised=False, image_size=None))
    method.model = _Oracle(x0, method.schedule.alphas_cumprod)
    return method


def test_partial_noising_and_one_reverse_step_match_closed_form_posterior_mean() -> None:
    g = _gen(3)
    x0 = torch.rand(2, 1, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    method = _oracle_method(x0)
    t = 350
    x_t = method.noise_to(x0, t, noise)

    betas = make_schedule("linear", 1000).betas.double()
    abar = torch.cumprod(1 - betas, 0)
    a_t, a_prev, b_t = abar[t], abar[t - 1], betas[t]
    torch.testing.assert_close(x_t.double(), a_t.sqrt() * x0.double() + (1 - a_t).sqrt() * noise.double(), atol=1e-5, rtol=1e-5)
    # q(x_{t-1} | x_t, x0) mean, Ho et al. eq. 7
    mean = (a_prev.sqrt() * b_t / (1 - a_t)) * x0.double() + ((1 - b_t).sqrt() * (1 - a_prev) / (1 - a_t)) * x_t.double()

    x_prev, x0_pred = method.reverse_step(x_t, t, noise_fn=lambda like, gen: torch.zeros_like(like))
    torch.testing.assert_close(x0_pred, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x_prev.double(), mean, atol=1e-5, rtol=1e-5)


def test_reverse_chain_counts_steps_and_returns_clean_data_with_an_oracle() -> None:
    x0 = torch.rand(2, 1, 8, 8, generator=_gen(4)) * 2 - 1
    method = _oracle_method(x0)
    x_t = method.noise_to(x0, 20, torch.randn(x0.shape, generator=_gen(5)))
    out = method.reverse_chain(x_t, 20, 0, generator=_gen(6))
    assert method.model.calls == 21  # steps 20..0
    torch.testing.assert_close(out, x0, atol=1e-3, rtol=1e-3)
    method.model.calls = 0
    method.reverse_chain(x_t, 20, 11, generator=_gen(6))
    assert method.model.calls == 10
    with pytest.raises(ValueError):
        method.reverse_chain(x_t, 1000)


def test_units_and_resampling() -> None:
    method = _Plain(PixelDiffusionConfig(device="cpu", image_size=16))
    x = torch.rand(2, 1, 32, 32)
    y = method.prepare(x)
    assert y.shape == (2, 1, 16, 16)
    assert float(y.min()) >= -1 - 1e-5 and float(y.max()) <= 1 + 1e-5
    torch.testing.assert_close(method.to_data(method.to_model(x)), x)
    # a residual of 0.2 in data units reads 0.2 in the map, at the input resolution
    shifted = method.to_model(method.to_data(y) + 0.2)
    residual = method.residual_map(y, shifted, (32, 32))
    assert residual.shape == (2, 32, 32)
    torch.testing.assert_close(residual, torch.full_like(residual, 0.2), atol=1e-5, rtol=0)
