"""Shared diffusion building blocks: simplex noise, schedules, closed-form steps, base class."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from methods.common.backbone import build_unet, check_backbone, load_unet_checkpoint
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


def test_scale_timestep_counts_noising_steps() -> None:
    # index t has had t + 1 noising steps: 351 of 1000 -> 35.1 of 100 -> index 34
    assert [scale_timestep(t, 1000, 100) for t in (350, 250, 499, 200, 50, 0, 999)] == [34, 24, 49, 19, 4, 0, 99]
    with pytest.raises(ValueError):
        scale_timestep(1000, 1000, 100)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_respaced_schedule_keeps_the_published_noise_levels(kind: str) -> None:
    full = make_schedule(kind, 1000, 1e-4, 0.02)
    short = make_schedule(kind, 100, 1e-4, 0.02, respace_from=1000)
    for t in (350, 300, 250, 200, 150, 50, 499):  # every timestep a quick profile scales
        s = scale_timestep(t, 1000, 100)
        assert abs(float(full.alphas_cumprod[t]) - float(short.alphas_cumprod[s])) < 0.005, t
    # exact at the kept indices
    torch.testing.assert_close(short.alphas_cumprod, full.alphas_cumprod[9::10], rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- backbone
def test_build_unet_shapes_and_checks() -> None:
    net = build_unet(in_channels=2, out_channels=2, channels=(8, 16), attention_levels=(False, True), num_head_channels=8, norm_num_groups=8)
    out = net(torch.randn(2, 2, 16, 16), torch.tensor([0, 5]))
    assert out.shape == (2, 2, 16, 16)
    with pytest.raises(ValueError, match="norm_num_groups"):
        check_backbone((12, 16), (False, True), 8, 8)
    with pytest.raises(ValueError, match="num_head_channels"):
        check_backbone((8, 16), (False, True), 32, 8)


@pytest.mark.parametrize("head_channels", [8, 16])
def test_sdpa_attention_computes_the_matrix_attention(head_channels: int) -> None:
    """use_flash_attention (PyTorch SDPA) is the same network: same state dict, same outputs
    and gradients to float rounding, with one or several heads per attention layer."""
    kw = dict(in_channels=1, out_channels=1, channels=(8, 16, 16), attention_levels=(False, True, True), num_head_channels=head_channels, norm_num_groups=8)
    torch.manual_seed(0)
    matrix = build_unet(**kw)
    with torch.no_grad():  # MONAI zero-initialises the output layer: give every weight a value
        for param in matrix.parameters():
            param.normal_(0.0, 0.3)  # large enough that the attention is far from uniform
    sdpa = build_unet(**kw, use_flash_attention=True)
    assert list(sdpa.state_dict()) == list(matrix.state_dict())
    sdpa.load_state_dict(matrix.state_dict())
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([0, 4, 9])
    out_m, out_s = matrix(x, t), sdpa(x, t)
    assert out_m.abs().max() > 0.5
    torch.testing.assert_close(out_s, out_m, rtol=1e-5, atol=1e-5)
    out_m.square().sum().backward()
    out_s.square().sum().backward()
    for (name, p_m), p_s in zip(matrix.named_parameters(), sdpa.parameters()):
        torch.testing.assert_close(p_s.grad, p_m.grad, rtol=1e-3, atol=1e-5, msg=name)


PAPER_UNET = dict(channels=(128, 256, 256), attention_levels=(False, True, True), num_res_blocks=1, num_head_channels=256, norm_num_groups=32)


def test_paper_unet_has_the_authors_parameter_count() -> None:
    # the authors' MONAI-Generative UNet: no projection after attention (MONAI's include_fc=False)
    assert sum(p.numel() for p in build_unet(**PAPER_UNET).parameters()) == 18_040_449
    assert sum(p.numel() for p in build_unet(**PAPER_UNET, include_fc=True).parameters()) == 18_500_993
    assert PixelDiffusionConfig().include_fc is False


def _old_layout(state: dict) -> dict:
    """A MONAI state dict renamed to the MONAI-Generative layout the authors' checkpoints use."""
    old = {}
    for k, v in state.items():
        if ".attn.to_" in k:  # attention blocks: <block>.attn.to_q.weight -> <block>.to_q.weight
            old[k.replace(".attn.to_", ".to_")] = v
        elif "postconv" in k:  # upsampler convolutions were called conv
            old[k.replace("postconv", "conv")] = v
        else:
            old[k] = v
    for k in [k for k in state if k.endswith(".attn.to_q.weight")]:  # the never-applied projection
        block = k[: -len(".attn.to_q.weight")]
        width = state[k].shape[0]
        old[f"{block}.proj_attn.weight"], old[f"{block}.proj_attn.bias"] = torch.randn(width, width), torch.randn(width)
    return old


@pytest.mark.parametrize("wrapped", [False, True])
def test_authors_checkpoint_in_the_old_layout_loads_and_scores_identically(tmp_path, wrapped: bool) -> None:
    small = dict(channels=(8, 16), attention_levels=(False, True), num_head_channels=8, norm_num_groups=8)
    torch.manual_seed(0)
    source = build_unet(**small).eval()
    with torch.no_grad():  # MONAI zero-initialises the output convolution: randomise everything
        for p in source.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    old = _old_layout(source.state_dict())
    assert set(old) != set(source.state_dict())  # really the other layout
    # ci-ber saves {"model_weights": DDPM-wrapper state dict (keys "unet.")}
    blob = {"model_weights": {f"unet.{k}": v for k, v in old.items()}, "epoch": 3} if wrapped else old
    torch.save(blob, tmp_path / "best_model.pt")
    target = build_unet(**small).eval()
    load_unet_checkpoint(target, tmp_path / "best_model.pt")
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([1, 7])
    with torch.no_grad():
        expected = source(x, t)
        assert float(expected.abs().mean()) > 0.1
        torch.testing.assert_close(target(x, t), expected, atol=0, rtol=0)
    bad = build_unet(channels=(8, 24), attention_levels=(False, True), num_head_channels=8, norm_num_groups=8)
    with pytest.raises(ValueError, match="best_model.pt"):
        load_unet_checkpoint(bad, tmp_path / "best_model.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_unet_checkpoint(target, tmp_path / "missing.pt")


def test_fit_with_unet_checkpoint_scores_the_given_weights_without_training(tmp_path) -> None:
    from methods.ddpm import DDPM
    from tests.conftest import make_tiny_slices

    data = make_tiny_slices(n_train=4, n_val=0, n_test=2, size=16)
    donor = DDPM.from_profile("tiny", device="cpu", image_size=None)
    donor.input_shape_ = (1, 16, 16)
    donor._build()
    torch.save({"model_weights": {f"unet.{k}": v for k, v in _old_layout(donor.model.state_dict()).items()}}, tmp_path / "w.pt")
    method = DDPM.from_profile("tiny", device="cpu", image_size=None, unet_checkpoint=str(tmp_path / "w.pt")).fit(data.split("train"))
    assert method.notes["train_steps"] == 0
    for k, v in donor.model.state_dict().items():
        assert torch.equal(method.model.state_dict()[k], v), k


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
    method = _Plain(PixelDiffusionConfig(device="cpu", clip_denoised=False, image_size=None, data_range=(0.0, 1.0)))
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
    x = torch.rand(2, 1, 32, 32) * 3.0  # S2-like units: far above 1
    with pytest.raises(RuntimeError, match="data range"):
        method.prepare(x)  # the range is learned in fit, never assumed
    method.record_data_range(x.numpy())
    assert method.data_range == (float(x.min()), float(x.max()))
    y = method.prepare(x)
    assert y.shape == (2, 1, 16, 16)
    assert float(y.min()) >= -1 - 1e-5 and float(y.max()) <= 1 + 1e-5
    torch.testing.assert_close(method.to_data(method.to_model(x)), x)
    torch.testing.assert_close(method.to_model(torch.tensor([float(x.min()), float(x.max())])), torch.tensor([-1.0, 1.0]))
    # a residual of 0.2 in data units reads 0.2 in the map, at the input resolution
    shifted = method.to_model(method.to_data(y) + 0.2)
    residual = method.residual_map(y, shifted, (32, 32))
    assert residual.shape == (2, 32, 32)
    torch.testing.assert_close(residual, torch.full_like(residual, 0.2), atol=1e-5, rtol=0)
    # a fixed range overrides the recorded one: (0, 1) is the authors' 2x - 1
    fixed = _Plain(PixelDiffusionConfig(device="cpu", data_range=(0.0, 1.0)))
    torch.testing.assert_close(fixed.to_model(torch.tensor([0.0, 0.5, 2.0])), torch.tensor([-1.0, 0.0, 3.0]))


# ----------------------------------------------------------------------------- augmentation
def _params(angle=0.0, sx=0.0, sy=0.0, scale=1.0, flip=False):
    from methods.common.augment import AffineParams

    as1 = lambda v: torch.tensor([float(v)], dtype=torch.float64)  # noqa: E731
    return AffineParams(as1(angle), as1(sx), as1(sy), as1(scale), torch.tensor([flip]))


def test_augmentation_geometry_matches_exact_pixel_operations() -> None:
    from methods.common.augment import apply_affine_flip

    x = torch.rand(1, 1, 8, 8, generator=_gen(0)) * 3.0  # any units: no clipping
    assert torch.equal(apply_affine_flip(x, _params()), x)
    # positive angles turn counter-clockwise on screen, as torchvision's RandomAffine
    torch.testing.assert_close(apply_affine_flip(x, _params(angle=90.0)), torch.rot90(x, 1, (-2, -1)))
    shifted = apply_affine_flip(x, _params(sx=2.0, sy=1.0))  # +x right, +y down, fill 0
    assert torch.equal(shifted[..., 1:, 2:], x[..., :-1, :-2])
    assert float(shifted[..., :1, :].abs().sum()) == 0.0 and float(shifted[..., :, :2].abs().sum()) == 0.0
    assert torch.equal(apply_affine_flip(x, _params(flip=True)), x.flip(-1))
    # zoom in by 2 about the centre: the central 4 x 4 block fills the image (nearest)
    zoom = apply_affine_flip(x, _params(scale=2.0))
    torch.testing.assert_close(zoom[..., ::2, ::2], x[..., 2:6, 2:6])


def test_augmentation_draws_torchvision_ranges() -> None:
    from methods.common.augment import draw_params

    p = draw_params(4000, (128, 128), _gen(1))
    assert float(p.angle.abs().max()) <= 10.0 and float(p.angle.abs().max()) > 9.9
    assert float(p.shift_x.abs().max()) <= 13.0 and torch.equal(p.shift_x, p.shift_x.round())
    assert 0.9 <= float(p.scale.min()) and float(p.scale.max()) <= 1.1
    assert abs(float(p.flip.float().mean()) - 0.5) < 0.03


# ----------------------------------------------------------------------------- per-slice noise
def test_slice_noise_depends_on_the_slice_index_not_the_batch() -> None:
    from methods.common.noise import SliceGenerators, gaussian_noise

    like = torch.zeros(4, 1, 8, 8)
    whole = gaussian_noise(like, SliceGenerators(7, range(0, 4), "cpu"))
    parts = torch.cat([gaussian_noise(like[:1], SliceGenerators(7, range(i, i + 1), "cpu")) for i in range(4)])
    assert torch.equal(whole, parts)  # slice i gets its noise whatever its batch
    assert not torch.equal(whole[0], whole[1])  # ... and not the noise of position 0 of every batch
    assert not torch.equal(whole, gaussian_noise(like, SliceGenerators(8, range(0, 4), "cpu")))  # seed matters


def test_simplex_per_slice_is_one_batched_draw_equal_to_single_draws() -> None:
    from methods.common.noise import SliceGenerators
    from methods.common.simplex import simplex_field

    like = torch.zeros(3, 2, 16, 16)
    whole = simplex_field(like, SliceGenerators(5, range(10, 13), "cpu"), frequency=8.0)
    parts = torch.cat([simplex_field(like[:1], SliceGenerators(5, range(i, i + 1), "cpu"), frequency=8.0) for i in range(10, 13)])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole[0], whole[1]) and not torch.equal(whole[0, 0], whole[0, 1])


def test_identical_slices_at_different_indices_get_different_noise() -> None:
    from methods.ddpm import DDPM
    from tests.conftest import make_tiny_slices

    data = make_tiny_slices(n_train=4, n_val=0, n_test=1, size=16)
    method = DDPM.from_profile("tiny", device="cpu", image_size=None, epochs=1).fit(data.split("train"))
    image, brain = data.images[:1], data.brain_masks[:1]
    twice = method.with_inference_overrides(score_batch_size=1).score(np.repeat(image, 2, 0), np.repeat(brain, 2, 0))
    assert not torch.equal(twice[0], twice[1])  # reseeding per batch would repeat the noise
    assert torch.equal(method.score(image, brain)[0], twice[0])  # slice 0 of any scored set


# ----------------------------------------------------------------------------- training set-up
def test_paper_budget_in_optimiser_steps() -> None:
    from methods.common.diffusion import THOR_STEPS, paper_steps

    assert THOR_STEPS == paper_steps(1500, 464, 16) == 43_500
    c = PixelDiffusionConfig()
    assert (c.max_steps, c.batch_size, c.augment, c.keep_best, c.val_every, c.val_t) == (43_500, 16, True, True, 1450, 350)


def _tiny_train(**overrides):
    from methods.ddpm import DDPM
    from tests.conftest import make_tiny_slices

    data = make_tiny_slices(n_train=6, n_val=2, n_test=0, size=16)
    method = DDPM.from_profile("tiny", device="cpu", image_size=None, **overrides)
    return method, data.split("train"), data.split("val")


def test_training_runs_max_steps_and_records_both_budgets() -> None:
    method, train, _ = _tiny_train(max_steps=5, batch_size=4, val_every=None)
    steps = []
    original = method.training_loss
    method.training_loss = lambda x0, g: (steps.append(1), original(x0, g))[1]  # type: ignore[method-assign]
    method.fit(train)
    assert len(steps) == 5  # 5 optimiser steps over 3 epochs of 2 batches
    assert method.notes["train_steps"] == 5 and method.notes["train_epochs"] == 2.5


def test_keep_best_restores_the_best_validation_weights() -> None:
    method, train, val = _tiny_train(max_steps=6, batch_size=4, val_every=2)
    losses, snapshots = iter([3.0, 1.0, 2.0]), []

    def fake_validation(_val):
        snapshots.append({k: v.clone() for k, v in method.model.state_dict().items()})
        return next(losses)

    method.validation_loss = fake_validation  # type: ignore[method-assign]
    method.fit(train, val)
    assert len(snapshots) == 3 and method.notes["best_val_step"] == 4
    for k, v in method.model.state_dict().items():
        assert torch.equal(v, snapshots[1][k]), k
    assert [s for s, _ in method.notes["val_history"]] == [2, 4, 6]


def test_validation_is_a_full_reconstruction_from_val_t() -> None:
    method, train, val = _tiny_train(max_steps=2, batch_size=4, val_every=1, val_t=3)
    method.fit(train, val)
    method.nfe = 0
    loss = method.validation_loss(val)
    assert method.nfe == 4 * 1  # steps 3..0 for one batch of 2 slices
    assert loss == method.validation_loss(val) and loss > 0  # fixed noise: reproducible
    method.config.val_slices, method.nfe = 1, 0
    one = method.validation_loss(val)  # the first slice only (evenly spaced subset of 1)
    assert method.nfe == 4 and one != loss


def test_ema_weights_are_used_after_training() -> None:
    init, train, _ = _tiny_train(max_steps=4, batch_size=4, val_every=None, augment=False)
    init.input_shape_ = (1, 16, 16)
    torch.manual_seed(init.config.seed)  # as fit() seeds before building
    init._build()
    start = {k: v.clone() for k, v in init.model.state_dict().items()}

    def drift(**kw) -> float:
        method, _, _ = _tiny_train(max_steps=4, batch_size=4, val_every=None, augment=False, lr=1e-2, **kw)
        method.fit(train)
        return sum(float((method.model.state_dict()[k].float() - v.float()).abs().sum()) for k, v in start.items())

    plain, no_decay, slow = drift(), drift(ema_decay=0.0), drift(ema_decay=0.99)
    assert abs(no_decay - plain) < 1e-3 * plain  # decay 0: the EMA is the trained weights
    assert slow < 0.1 * plain  # decay 0.99 over 4 steps stays near the start


def test_training_timesteps_respect_train_t_max() -> None:
    method, _, _ = _tiny_train(train_t_max=3)
    t = method.training_timesteps(5000, _gen(0), torch.device("cpu"))
    assert int(t.max()) == 2 and int(t.min()) == 0
