"""MAD-AD: the pieces that carry the method (eqs. 2, 6, 7, 8), the training masks, the VAE
adaptation, and the method-level contract (save/load, ablation knobs without retraining).
Tiny networks on tiny data; the whole file runs in well under a minute on one core."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from methods.base import UADMethod
from methods.madad import MADAD, PROFILES
from methods.madad.anomaly import clip_scale, gaussian_blur, image_diff_map
from methods.madad.augment import augment
from methods.madad.forward import alphas_cumprod, masked_q_sample
from methods.madad.masking import block_brain_mask, latent_brain_mask, restrict_to_brain, sample_patch_masks
from methods.madad.sampler import ddim_sigma, ddim_timesteps, masked_ddim, masked_ddim_step
from methods.madad.unet import MaskedDenoiser
from methods.madad.vae import build_vae, load_pretrained_grey_vae
from tests.conftest import make_tiny_slices


# ---------------------------------------------------------------------------- schedule, eq. 2
def test_cosine_schedule_pinned_to_the_authors_values() -> None:
    """squaredcos_cap_v2 for T = 10 (farzad-bz/MAD-AD diffusion_x0/gaussian_diffusion.py,
    betas_for_alpha_bar), abar[1..10] computed once from their formula and pinned."""
    pinned = [0.9720927371, 0.8987059206, 0.7869105112, 0.6474782111, 0.4938435904,
              0.3408096398, 0.2031214741, 0.09404561268, 0.02409172414, 2.409172414e-05]
    abar = alphas_cumprod("cosine", 10)
    assert float(abar[0]) == 1.0
    torch.testing.assert_close(abar[1:], torch.tensor(pinned, dtype=torch.float64), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_is_decreasing_from_one(kind: str) -> None:
    abar = alphas_cumprod(kind, 10)
    assert abar.shape == (11,) and abar[0] == 1
    assert torch.all(abar[1:] < abar[:-1]) and abar[-1] < 0.01 and abar[1] > 0.8


def test_forward_keeps_unmasked_latents_exactly_and_matches_closed_form() -> None:
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(4, 4, 8, 8, generator=g)
    noise = torch.randn(4, 4, 8, 8, generator=g)
    mask = (torch.rand(4, 1, 8, 8, generator=g) > 0.5).float()
    t = torch.tensor([1, 4, 7, 10])
    abar = alphas_cumprod("cosine", 10)
    z_t = masked_q_sample(z0, t, mask, noise, abar)
    keep = mask.expand_as(z0) == 0
    assert torch.equal(z_t[keep], z0[keep])  # bit-for-bit
    for i in range(4):
        a = float(abar[t[i]])
        expected = math.sqrt(a) * z0[i] + math.sqrt(1 - a) * noise[i]
        sel = mask[i].expand_as(z0[i]) == 1
        torch.testing.assert_close(z_t[i][sel], expected[sel], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- training masks
def test_mask_ratio_and_patch_size_statistics() -> None:
    g = torch.Generator().manual_seed(0)
    fractions, ratios, sizes = [], [], []
    for _ in range(300):
        masks, r, ps = sample_patch_masks(8, (32, 32), g, (0.0, 0.4), (1, 2, 4, 8), None, "sample")
        fractions.append(masks.mean((1, 2, 3)))
        ratios.append(r)
        sizes.append(ps)
    fractions, ratios, sizes = torch.cat(fractions), torch.cat(ratios), torch.cat(sizes)
    assert ratios.min() >= 0 and ratios.max() <= 0.4
    # round(r * n) patches: at most half a patch above r (16 patches of 8 x 8 on 32 x 32)
    assert fractions.min() >= 0 and fractions.max() <= 0.4 + 0.5 / 16 + 1e-6
    assert abs(float(fractions.mean()) - 0.2) < 0.01  # unbiased: round(r * n_patches) patches
    assert abs(float(ratios.mean()) - 0.2) < 0.01
    for axis in range(2):
        counts = torch.bincount(sizes[:, axis], minlength=9)
        assert all(counts[s] > 0.2 * len(sizes) for s in (1, 2, 4, 8))  # uniform by default: ~25 % each
    # a patch-size draw really makes patches: p_y x p_x blocks are constant
    masks, _, ps = sample_patch_masks(1, (32, 32), g, (0.3, 0.3), (8,), None, "batch")
    blocks = masks[0, 0].view(4, 8, 4, 8)
    assert torch.all(blocks.amax((1, 3)) == blocks.amin((1, 3)))
    assert float(masks.mean()) == pytest.approx(round(0.3 * 16) / 16)


def test_patch_size_probabilities_are_followed() -> None:
    g = torch.Generator().manual_seed(1)
    sizes = torch.cat([sample_patch_masks(1, (16, 16), g, patch_size_probs=(0.2, 0.3, 0.3, 0.2))[2] for _ in range(2000)])
    freq = torch.bincount(sizes[:, 0], minlength=9)[[1, 2, 4, 8]].float() / len(sizes)
    torch.testing.assert_close(freq, torch.tensor([0.2, 0.3, 0.3, 0.2]), atol=0.04, rtol=0)


def test_brain_restriction_rules() -> None:
    brain = torch.zeros(2, 64, 64)
    brain[:, 16:48, 16:48] = 1
    lat = latent_brain_mask(brain, (16, 16))
    assert lat[0, 0, 4:12, 4:12].all() and lat.sum() == 2 * 64
    blk = block_brain_mask(brain, (16, 16), block=2, min_fraction=0.9)
    assert blk.sum() == 2 * 64
    ones = torch.ones(2, 1, 16, 16)
    out = restrict_to_brain(ones, brain, "latent_mask", 0.5, 2, 0.9)
    assert torch.equal(out, lat) and torch.equal(restrict_to_brain(ones, brain, "none", 0.5, 2, 0.9), ones)


# ---------------------------------------------------------------------------- masked DDIM, eqs. 6-7
def test_ddim_timesteps_official_and_even_spacing() -> None:
    # the authors' space_timesteps(10, "ddimK"): 0-based indices range(0, 10, stride) = our t - 1
    assert ddim_timesteps(10, 10) == list(range(10, 0, -1))
    assert ddim_timesteps(10, 5) == [9, 7, 5, 3, 1]
    assert ddim_timesteps(10, 2) == [6, 1]
    assert ddim_timesteps(10, 1) == [1]  # their loop stops at stride 9; stride 10 keeps index 0
    assert ddim_timesteps(10, 4) == [10, 7, 4, 1]
    with pytest.raises(ValueError, match="integer stride"):
        ddim_timesteps(10, 7)
    even = {k: ddim_timesteps(10, k, "even") for k in (1, 2, 5, 10)}
    assert even == {1: [10], 2: [10, 5], 5: [10, 8, 6, 4, 2], 10: list(range(10, 0, -1))}
    with pytest.raises(Exception, match="integer stride"):
        MADAD.from_profile("tiny", ddim_steps=7)._check_config()
    MADAD.from_profile("tiny", ddim_steps=7, ddim_spacing="even")._check_config()


@pytest.mark.parametrize("steps, visited", [(1, [1]), (2, [6, 1]), (5, [9, 7, 5, 3, 1]), (10, list(range(10, 0, -1)))])
def test_sampler_visits_the_official_timesteps_and_feeds_t_minus_1(steps: int, visited: list[int], monkeypatch) -> None:
    """The sampler feeds the network ``t - 1`` at each visited ``t`` and uses ``abar_t`` and,
    as ``abar_prev``, the next visited timestep (``abar_0 = 1`` last)."""
    import methods.madad.sampler as sampler

    abar = alphas_cumprod("cosine", 10)
    fed, used = [], []
    real_step = sampler.masked_ddim_step
    monkeypatch.setattr(sampler, "masked_ddim_step", lambda *a: used.append((a[3], a[4])) or real_step(*a))

    def denoiser(z, t_index):
        fed.append(int(t_index[0]))
        return torch.zeros_like(z), torch.full_like(z[:, :1], 5.0)

    masked_ddim(denoiser, torch.randn(2, 4, 4, 4), abar, steps, 0.0, 0.5)
    assert fed == [t - 1 for t in visited]
    assert used == [(float(abar[t]), float(abar[u])) for t, u in zip(visited, visited[1:] + [0])]


def test_one_masked_ddim_step_against_hand_computation() -> None:
    g = torch.Generator().manual_seed(0)
    z_t, z0_hat, noise = (torch.randn(2, 4, 4, 4, generator=g) for _ in range(3))
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, :2] = 1
    a_t, a_prev, eta = 0.3, 0.7, 0.5
    out = masked_ddim_step(z_t, z0_hat, mask, a_t, a_prev, eta, noise)
    # by hand, element by element
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
    for idx in [(0, 0, 0, 0), (1, 3, 1, 2), (0, 2, 2, 1), (1, 1, 3, 3)]:
        zt, z0, n = float(z_t[idx]), float(z0_hat[idx]), float(noise[idx])
        eps = (zt - math.sqrt(a_t) * z0) / math.sqrt(1 - a_t)  # eq. 7
        upd = math.sqrt(a_prev) * z0 + math.sqrt(1 - a_prev - sigma**2) * eps + sigma * n  # eq. 6
        expected = upd if idx[2] < 2 else zt
        assert float(out[idx]) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert ddim_sigma(a_t, a_prev, eta) == pytest.approx(sigma)
    # final step (abar_prev = 1) returns z0_hat inside the mask
    last = masked_ddim_step(z_t, z0_hat, mask, a_t, 1.0, eta, noise)
    torch.testing.assert_close(last[:, :, :2], z0_hat[:, :, :2], rtol=1e-5, atol=1e-5)


def test_sigma0_sampler_is_deterministic_and_keeps_mask0_regions() -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 4, 8, 8, generator=g)
    logits = torch.full((2, 1, 8, 8), -5.0)
    logits[:, :, 2:5, 3:7] = 5.0

    def denoiser(z, t):
        return target, logits

    z_T = torch.randn(2, 4, 8, 8, generator=g)
    abar = alphas_cumprod("linear", 10)
    a = masked_ddim(denoiser, z_T, abar, 10, 0.0, 0.5)
    b = masked_ddim(denoiser, z_T, abar, 10, 0.0, 0.5)
    assert torch.equal(a.z0, b.z0)
    outside = (logits < 0).expand_as(z_T)
    assert torch.equal(a.z0[outside], z_T[outside])
    torch.testing.assert_close(a.z0[~outside], target[~outside])  # a constant z0~ is reached exactly
    assert torch.allclose(a.mean_mask, torch.sigmoid(logits))


# ---------------------------------------------------------------------------- eq. 8 and helpers
def test_map_clip_and_smoothing() -> None:
    d = torch.tensor([0.0, 0.1, 0.2, 0.5])
    torch.testing.assert_close(clip_scale(d, 0.2), torch.tensor([0.0, 0.5, 1.0, 1.0]))
    assert torch.equal(clip_scale(d, None), d)
    x = torch.zeros(1, 1, 21, 21)
    x[0, 0, 10, 10] = 1
    blurred = gaussian_blur(x, 2.0)
    assert float(blurred.sum()) == pytest.approx(1.0, abs=1e-5) and blurred.argmax() == 10 * 21 + 10
    m = image_diff_map(torch.ones(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), 0.2, 0.0)
    assert torch.all(m == 1)


def test_augmentation_off_is_identity_and_on_keeps_shapes() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    brain = torch.ones(3, 16, 16)
    assert augment(x, brain, g, 0.0)[0] is x
    y, b = augment(x, brain, g, 1.0, 5.0, 2.0, 0.1, 0.1)
    assert y.shape == x.shape and b.shape == brain.shape and torch.isfinite(y).all()


def _dot(y: int, x: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    img = torch.full((1, 1, size, size), -1.0)
    img[0, 0, y, x] = 1.0
    return img, torch.ones(1, size, size)


def test_augmentation_is_albumentations_fixed_shift_and_rotation() -> None:
    """Scalar arguments are fixed values: translate_px=3 moves every pixel by (+3, +3);
    rotate=90 maps (x, y) -> (y - c + c, -(x - c) + c) with c = 15.5 (albumentations'
    matrix [[cos, sin], [-sin, cos]] about the centre, y pointing down)."""
    g = torch.Generator().manual_seed(0)
    img, brain = _dot(10, 20)
    shifted, b = augment(img, brain, g, 1.0, 0.0, 3.0)
    assert shifted[0, 0].argmax() == 13 * 32 + 23 and float(shifted.max()) == pytest.approx(1.0, abs=1e-5)
    assert float(b[0, :3].sum()) == 0 and float(b[0, 3:, 3:].min()) == 1  # the mask moves too
    rotated, _ = augment(img, brain, g, 1.0, 90.0, 0.0)
    assert rotated[0, 0].argmax() == 11 * 32 + 10  # (x=20, y=10) -> (x=10, y=11)


def test_augmentation_brightness_is_additive_and_contrast_multiplicative() -> None:
    g = torch.Generator().manual_seed(3)
    x01 = torch.rand(64, 1, 8, 8) * 0.8 + 0.1
    brain = torch.ones(64, 8, 8)
    brain[:, 0] = 0
    y, _ = augment(x01 * 2 - 1, brain, g, 0.5, 0.0, 0.0, 0.1, 0.1)
    y01 = (y + 1) / 2
    assert torch.all(y01[:, :, 0] == 0)  # background reset to 0
    inside = brain.bool().unsqueeze(1)
    alphas, betas = [], []
    for i in range(64):  # y = alpha x + beta exactly inside the brain
        a = torch.stack([x01[i][inside[i]], torch.ones(int(inside[i].sum()))], 1)
        sol = torch.linalg.lstsq(a, y01[i][inside[i]].unsqueeze(1)).solution[:, 0]
        torch.testing.assert_close(a @ sol, y01[i][inside[i]], atol=1e-5, rtol=0)
        alphas.append(float(sol[0]))
        betas.append(float(sol[1]))
    alphas, betas = torch.tensor(alphas), torch.tensor(betas)
    assert (alphas - 1).abs().max() <= 0.1 + 1e-4 and betas.abs().max() <= 0.1 + 1e-4
    assert betas.abs().max() > 0.05 and betas.min() < 0 < betas.max()  # additive, both signs
    untouched = ((betas.abs() < 1e-5) & ((alphas - 1).abs() < 1e-5)).float().mean()
    assert float(untouched) == pytest.approx(0.5, abs=0.2)  # p = 0.5


# ---------------------------------------------------------------------------- VAE adaptation
def _small_rgb_vae():
    torch.manual_seed(0)
    arch = {"block_out_channels": [8, 16], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 4, "sample_size": 16}
    return build_vae(arch, in_channels=3).eval()


@pytest.mark.parametrize("as_file", [False, True])
def test_rgb_to_grey_adaptation_preserves_grey_reconstruction(tmp_path, as_file: bool) -> None:
    rgb = _small_rgb_vae()
    with torch.no_grad():  # make conv_out channels differ so averaging is really tested
        rgb.decoder.conv_out.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    rgb.save_pretrained(tmp_path / "vae")
    path = tmp_path / "vae" / "diffusion_pytorch_model.safetensors" if as_file else tmp_path / "vae"
    grey = load_pretrained_grey_vae(path).eval()
    assert grey.config.in_channels == 1 and grey.config.out_channels == 1
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        z_rgb = rgb.encode(x.repeat(1, 3, 1, 1)).latent_dist.mean
        z_grey = grey.encode(x).latent_dist.mean
        torch.testing.assert_close(z_grey, z_rgb, rtol=1e-4, atol=1e-5)  # summed conv_in: exact
        expected = rgb.decode(z_rgb).sample.mean(1, keepdim=True)
        torch.testing.assert_close(grey.decode(z_grey).sample, expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- the method
@pytest.fixture(scope="module")
def tiny_data():
    data = make_tiny_slices(n_train=16, n_val=2, n_test=4, size=32)
    return data.split("train"), data.split("test")


@pytest.fixture(scope="module")
def fitted(tiny_data) -> MADAD:
    train, _ = tiny_data
    return MADAD.from_profile("tiny", device="cpu", score_batch_size=3).fit(train)


def test_notes_and_training_key(fitted: MADAD) -> None:
    assert fitted.notes["vae_source"] == "trained-from-scratch"
    assert fitted.latent_scale_ > 0
    key = fitted.training_key()
    assert MADAD.from_profile("tiny", ddim_steps=2, gamma=None, sigma=0.1, anomaly_source="mean_mask").training_key() == key
    assert MADAD.from_profile("tiny", mask_loss_weight=0.5).training_key() != key


@pytest.mark.parametrize("norm", ["channel", "global", "whiten"])
def test_latent_normalisation_is_fitted_on_brain_cells(tiny_data, norm: str) -> None:
    """The diffusion latents (posterior samples) of the training slices, inside the brain
    (latent cells >= 50 % brain, the only cells that get noised): per channel zero mean and
    unit std ("channel"), identity channel covariance ("whiten"), or unit std over all
    elements ("global"); decoding inverts it."""
    from methods.madad.masking import latent_brain_mask

    train, _ = tiny_data
    m = MADAD.from_profile("tiny", device="cpu", latent_norm=norm, epochs=1).fit(train)
    with torch.no_grad():
        dist = m.vae.encode(m._to_vae(torch.from_numpy(np.asarray(train.images)))).latent_dist
    # the posterior sample the fit drew (its seed), so the statistics are those of the fit itself
    sample = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(m.config.seed))
    z = m._normalise(sample)
    cells = latent_brain_mask(torch.from_numpy(np.asarray(train.brain_masks)), m._latent_hw).bool()
    assert 0.2 < float(cells.float().mean()) < 0.8  # a real restriction: background cells exist
    inside = z.permute(1, 0, 2, 3)[:, cells.permute(1, 0, 2, 3)[0]]  # C x n_brain_cells
    if norm == "global":
        assert m.latent_mean_ is None
        assert inside.std().item() == pytest.approx(1.0, abs=1e-3)
    else:
        assert m.latent_scale_ == 1.0 and m.latent_mean_ is not None
        torch.testing.assert_close(inside.mean(1), torch.zeros(z.shape[1]), atol=1e-3, rtol=0)
        cov = torch.cov(inside)
        torch.testing.assert_close(cov.diagonal(), torch.ones(z.shape[1]), atol=2e-3, rtol=0)
        if norm == "whiten":  # channels decorrelated too
            torch.testing.assert_close(cov, torch.eye(z.shape[1]), atol=2e-3, rtol=0)
    torch.testing.assert_close(m._denormalise(z), sample, atol=1e-4, rtol=1e-4)


def test_fit_is_reproducible_whatever_the_global_rng_state(fitted: MADAD, tiny_data) -> None:
    """Same config and seed -> same maps: ``fit`` seeds everything it draws."""
    train, test = tiny_data
    reference = fitted.score(test.images, test.brain_masks)
    torch.manual_seed(12345)
    np.random.seed(12345)
    again = MADAD.from_profile("tiny", device="cpu", score_batch_size=3).fit(train)
    assert torch.equal(again.score(test.images, test.brain_masks), reference)
    other_seed = MADAD.from_profile("tiny", device="cpu", score_batch_size=3, seed=1).fit(train)
    assert not torch.equal(other_seed.score(test.images, test.brain_masks), reference)


def test_save_load_round_trip_gives_identical_maps(fitted: MADAD, tiny_data, tmp_path) -> None:
    _, test = tiny_data
    maps = fitted.score(test.images, test.brain_masks)
    fitted.save(tmp_path / "m")
    loaded = UADMethod.load(tmp_path / "m")
    assert torch.equal(loaded.score(test.images, test.brain_masks), maps)
    assert torch.equal(fitted.score(test.images, test.brain_masks), maps)  # reproducible with sigma > 0


def test_ablation_knobs_change_maps_without_retraining(fitted: MADAD, tiny_data) -> None:
    _, test = tiny_data
    base = dict(fitted.config.__dict__)
    weights = {k: v.clone() for k, v in fitted.denoiser.state_dict().items()}
    # The tiny model's mask head sits near p = 0.5 and its errors exceed gamma = 0.2, so the
    # reference setting lowers the threshold (masks active) and widens the clip.
    start = {"mask_threshold": 0.3, "gamma": 2.0}
    try:
        fitted.with_inference_overrides(**start)
        ref = fitted.score(test.images, test.brain_masks)
        for knob in ({"ddim_steps": 2}, {"ddim_steps": 5}, {"gamma": None}, {"gamma": 0.2}, {"sigma": 0.0}, {"mask_threshold": 0.9},
                     {"smoothing_sigma": 0.0}, {"map_reference": "vae_reconstruction"}, {"inference_start": "posterior_mean"}):
            fitted.with_inference_overrides(**knob)
            other = fitted.score(test.images, test.brain_masks)
            assert not torch.equal(other, ref), f"{knob} did not change the maps"
            fitted.config = type(fitted.config)(**base)
            fitted.with_inference_overrides(**start)
    finally:
        fitted.config = type(fitted.config)(**base)
    assert all(torch.equal(v, fitted.denoiser.state_dict()[k]) for k, v in weights.items())


@pytest.mark.parametrize("source", ["image_diff", "latent_diff", "mean_mask"])
def test_anomaly_sources_give_finite_maps(fitted: MADAD, tiny_data, source: str) -> None:
    _, test = tiny_data
    base = dict(fitted.config.__dict__)
    try:
        fitted.with_inference_overrides(anomaly_source=source, sigma=0.0, mask_threshold=0.3)  # tiny model: p ~ 0.48
        maps = fitted.score(test.images, test.brain_masks)
        assert maps.shape == (len(test), 32, 32) and torch.isfinite(maps).all() and maps.max() > 0
        assert torch.equal(maps, fitted.score(test.images, test.brain_masks))
    finally:
        fitted.config = type(fitted.config)(**base)


def test_reconstruction_and_batch_invariance(fitted: MADAD, tiny_data) -> None:
    _, test = tiny_data
    recon = fitted.reconstruct(test.images, test.brain_masks)
    assert recon.shape == test.images.shape and torch.isfinite(recon).all()
    maps = fitted.score(test.images, test.brain_masks)
    fitted.config.score_batch_size = 1
    try:
        torch.testing.assert_close(fitted.score(test.images, test.brain_masks), maps, atol=1e-5, rtol=1e-4)
    finally:
        fitted.config.score_batch_size = 3


def test_fit_with_a_pretrained_vae_path(tiny_data, tmp_path) -> None:
    train, test = tiny_data
    torch.manual_seed(0)
    arch = {"block_out_channels": [16, 32], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 8, "sample_size": 32}
    build_vae(arch, in_channels=3).save_pretrained(tmp_path / "sd-vae")
    m = MADAD.from_profile("tiny", device="cpu", vae_path=str(tmp_path / "sd-vae"), vae_finetune_epochs=1, epochs=1).fit(train)
    assert m.notes["vae_source"] == f"pretrained:{tmp_path / 'sd-vae'}+finetune"
    assert m.latent_scale_ == pytest.approx(0.18215)
    maps = m.score(test.images, test.brain_masks)
    m.save(tmp_path / "m")
    assert torch.equal(UADMethod.load(tmp_path / "m").score(test.images, test.brain_masks), maps)


def test_profiles_are_overrides_of_one_config() -> None:
    assert set(PROFILES) >= {"paper", "quick", "official", "official-quick"}
    for name in PROFILES:
        m = MADAD.from_profile(name)
        m._check_config()
    paper, official = MADAD.from_profile("paper").config, MADAD.from_profile("official").config
    assert (paper.schedule, paper.mask_loss, paper.lr, paper.epochs, paper.batch_size, paper.gamma) == ("cosine", "bce", 5e-4, 300, 96, 0.2)
    assert (official.schedule, official.mask_loss, official.mask_loss_weight, official.gamma) == ("cosine", "mse", 1e-3, 0.25)
    assert (paper.image_size, paper.timesteps, paper.sigma, paper.ddim_steps, paper.ddim_spacing) == (256, 10, 0.5, 10, "official")
    # the current authors' code, one version: no EMA, no brain mask on the map, no SiLU in
    # the mask head, fixed-value augmentation, best-validation-MSE checkpoint
    assert (official.ema_decay, official.apply_brain_mask, official.mask_head_silu, official.checkpoint) == (0.0, False, False, "best_val_mse")
    assert (official.aug_p, official.aug_rotate_deg, official.aug_translate_px, official.aug_brightness, official.aug_contrast) == (0.5, 5.0, 8.0, 0.1, 0.1)
    for name in ("official-quick", "official-tiny"):
        q = MADAD.from_profile(name).config
        assert (q.ema_decay, q.apply_brain_mask, q.mask_head_silu, q.checkpoint) == (0.0, False, False, "best_val_mse")
    assert paper.amp and paper.train_amp  # bf16 autocast on CUDA by default (ignored on the CPU)


def test_official_mask_head_is_norm_zero_conv_without_silu() -> None:
    head = MADAD.from_profile("official-tiny")._make_denoiser(4).mask_head
    assert [type(m).__name__ for m in head] == ["GroupNorm", "Conv2d"]
    assert not head[1].weight.detach().any() and not head[1].bias.detach().any()
    ours = MADAD.from_profile("tiny")._make_denoiser(4).mask_head
    assert [type(m).__name__ for m in ours] == ["GroupNorm", "SiLU", "Conv2d"]


# ---------------------------------------------------------------------------- authors' VAE (LDM key layout)
def _diffusers_to_ldm(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """Test helper: rename a diffusers AutoencoderKL state dict to the original LDM layout
    (the one of the authors' kl-f8 VAE), attention projections as 1x1 convolutions."""
    out = {}
    for key, value in state.items():
        k = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        for side, blocks in (("encoder", "down_blocks"), ("decoder", "up_blocks")):
            for i in range(levels):
                j = i if side == "encoder" else levels - 1 - i
                name = "down" if side == "encoder" else "up"
                k = k.replace(f"{side}.{blocks}.{i}.resnets.", f"{side}.{name}.{j}.block.")
                k = k.replace(f"{side}.{blocks}.{i}.downsamplers.0.", f"{side}.{name}.{j}.downsample.")
                k = k.replace(f"{side}.{blocks}.{i}.upsamplers.0.", f"{side}.{name}.{j}.upsample.")
        for r in (0, 1):
            k = k.replace(f"mid_block.resnets.{r}.", f"mid.block_{r + 1}.")
        if "mid_block.attentions.0." in k:
            k = k.replace("mid_block.attentions.0.", "mid.attn_1.")
            k = k.replace("group_norm", "norm").replace("to_q", "q").replace("to_k", "k").replace("to_v", "v").replace("to_out.0", "proj_out")
            if value.ndim == 2:
                value = value[:, :, None, None]
        out[k] = value.clone()
    return out


def test_one_channel_vae_in_ldm_key_layout_loads_unchanged(tmp_path) -> None:
    torch.manual_seed(0)
    arch = {"block_out_channels": [32, 64], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 32, "sample_size": 32}
    vae = build_vae(arch, in_channels=1).eval()
    ldm = _diffusers_to_ldm(vae.state_dict(), 2)
    assert "encoder.down.0.block.0.conv1.weight" in ldm and "decoder.up.1.block.0.conv1.weight" in ldm and "quant_conv.weight" in ldm
    assert ldm["encoder.mid.attn_1.q.weight"].ndim == 4
    ldm["loss.logvar"] = torch.zeros(())  # LDM checkpoints carry their training loss; ignored
    torch.save(ldm, tmp_path / "vae.pt")
    torch.save({"state_dict": {f"first_stage_model.{k}": v for k, v in ldm.items()}}, tmp_path / "model.ckpt")
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    for path in (tmp_path / "vae.pt", tmp_path / "model.ckpt"):
        loaded = load_pretrained_grey_vae(path).eval()
        assert loaded.config.in_channels == 1 and list(loaded.config.block_out_channels) == [32, 64]
        with torch.no_grad():
            z, z_ref = loaded.encode(x).latent_dist.mean, vae.encode(x).latent_dist.mean
            assert torch.equal(z, z_ref)
            assert torch.equal(loaded.decode(z).sample, vae.decode(z_ref).sample)
    torch.save(vae, tmp_path / "module.pt")  # a pickled module, as the authors publish it
    with pytest.raises(ValueError, match="pickled module"):
        load_pretrained_grey_vae(tmp_path / "module.pt")


# ---------------------------------------------------------------------------- bugs the suite must catch
def test_cpu_results_pinned(tiny_data) -> None:
    """Maps of a tiny fit with the settings that existed before the GPU-ready training path
    (schedule linear, whitening over all cells; 10 steps, where both spacings agree), pinned
    from the code before that change: moving draws and read-outs to the device must not
    change CPU results beyond float tolerance."""
    train, test = tiny_data
    m = MADAD.from_profile("tiny", device="cpu", score_batch_size=3, schedule="linear", latent_norm_region="all").fit(train)
    maps = m.score(test.images, test.brain_masks)
    assert m.notes["denoiser_final_loss"] == pytest.approx(1.658292829990387, rel=1e-5)
    assert float(maps.sum()) == pytest.approx(1825.761962890625, rel=1e-4)
    assert float(maps[1, 10, 12]) == pytest.approx(0.8444194197654724, rel=1e-4)
    m.with_inference_overrides(sigma=0.0, mask_threshold=0.3, gamma=2.0)
    maps = m.score(test.images, test.brain_masks)
    assert float(maps.sum()) == pytest.approx(437.4245300292969, rel=1e-4)
    assert float(maps[2, 15, 15]) == pytest.approx(0.45999377965927124, rel=1e-4)


class _StubDenoiser(torch.nn.Module):
    """Predicts ``z0 = 0`` and noises (mask logit +30) only the cells of ``region``."""

    def __init__(self, region: torch.Tensor) -> None:
        super().__init__()
        self.region = region

    def forward(self, z: torch.Tensor, t_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = torch.where(self.region.to(z.device), 30.0, -30.0).expand(z.shape[0], 1, *z.shape[2:])
        return torch.zeros_like(z), logits.to(z.dtype)


def test_a_denoiser_that_masks_nothing_returns_the_vae_reconstruction(fitted: MADAD, tiny_data) -> None:
    """Under a non-identity whitening, nothing masked -> z0~ = z_T -> the restoration is
    D(E(x)) exactly: decoding undoes the latent normalisation."""
    _, test = tiny_data
    assert not torch.allclose(fitted.latent_matrix_, torch.eye(fitted.latent_matrix_.shape[0]), atol=0.05)
    assert fitted.latent_mean_.abs().max() > 0.05
    real, base = fitted.denoiser, dict(fitted.config.__dict__)
    try:
        fitted.denoiser = _StubDenoiser(torch.zeros(1, 1, *fitted._latent_hw, dtype=torch.bool))
        fitted.with_inference_overrides(inference_start="posterior_mean")
        x = torch.from_numpy(np.asarray(test.images))
        with torch.no_grad():
            r = fitted._restore(x)
            expected = fitted.vae.decode(fitted.vae.encode(fitted._to_vae(x)).latent_dist.mean).sample
        assert torch.equal(r["out"].z0, r["z_T"])
        torch.testing.assert_close(r["restored"], expected, atol=2e-5, rtol=1e-5)
    finally:
        fitted.denoiser, fitted.config = real, type(fitted.config)(**base)


def test_bf16_autocast_keeps_the_ddim_state_in_fp32(fitted: MADAD, tiny_data) -> None:
    """Under autocast(bfloat16) only the networks run in bf16: z_T is the float32
    normalisation of the encoder's output and cells outside the mask stay bit-exact."""
    _, test = tiny_data
    real, base = fitted.denoiser, dict(fitted.config.__dict__)
    region = torch.zeros(1, 1, *fitted._latent_hw, dtype=torch.bool)
    region[..., 4:9, 5:11] = True
    try:
        fitted.denoiser = _StubDenoiser(region)
        fitted.with_inference_overrides(inference_start="posterior_mean", sigma=0.5)
        x = torch.from_numpy(np.asarray(test.images))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            r = fitted._restore(x)
            mean = fitted.vae.encode(fitted._to_vae(x)).latent_dist.mean
        expected = fitted._normalise(mean.float())  # outside autocast: float32 throughout
        z0 = r["out"].z0
        assert r["z_T"].dtype == torch.float32 and z0.dtype == torch.float32
        assert torch.equal(r["z_T"], expected)
        outside = ~region.expand_as(z0)
        assert torch.equal(z0[outside], r["z_T"][outside])
        torch.testing.assert_close(z0[~outside], torch.zeros_like(z0[~outside]))  # masked: reached z0~ = 0
    finally:
        fitted.denoiser, fitted.config = real, type(fitted.config)(**base)


def test_training_and_sampling_feed_the_same_index_for_the_same_noise_level(tiny_data, monkeypatch) -> None:
    """Training noises with abar[t], t ~ U{1..T}, and feeds t - 1; the sampler feeds t - 1
    when it uses abar[t]. Both must agree, or the network is asked about a noise level it
    never saw."""
    import methods.madad.method as method_module
    import methods.madad.sampler as sampler

    train, test = tiny_data
    drawn, fed, used = [], [], []
    real_q, real_forward, real_step = method_module.masked_q_sample, MaskedDenoiser.forward, sampler.masked_ddim_step
    monkeypatch.setattr(method_module, "masked_q_sample", lambda z0, t, *a: drawn.append(t.clone()) or real_q(z0, t, *a))
    monkeypatch.setattr(MaskedDenoiser, "forward", lambda self, z, t: fed.append(t.clone()) or real_forward(self, z, t))
    m = MADAD.from_profile("tiny", device="cpu", epochs=6, vae_epochs=1, score_batch_size=4).fit(train)
    T = m.config.timesteps
    t_train = torch.cat(drawn)
    assert len(fed) == len(drawn) and torch.equal(torch.cat(fed), t_train - 1)
    assert int(t_train.min()) >= 1 and int(t_train.max()) == T  # U{1..T}: never clean, T reached
    assert len(set(t_train.tolist())) >= T - 1
    fed.clear()
    monkeypatch.setattr(sampler, "masked_ddim_step", lambda *a: used.append(a[3]) or real_step(*a))
    m.with_inference_overrides(ddim_steps=5)
    m.score(test.images[:4], test.brain_masks[:4])
    steps = [int(t[0]) for t in fed]
    assert steps == [t - 1 for t in ddim_timesteps(T, 5)]
    assert used == [float(m.abar[i + 1]) for i in steps]  # sampling: index i <-> abar[i + 1], as in training


def test_a_short_training_run_teaches_the_mask_head_which_cells_are_noised() -> None:
    """A few dozen steps of eq. 5 on synthetic latents: the mask head gives noised cells a
    higher probability than clean ones (an inverted mask target reverses this)."""
    torch.manual_seed(0)
    m = MADAD.from_profile("tiny", device="cpu", mask_ratio_max=0.6, image_size=16)  # 8 x 8 latents
    m.abar = alphas_cumprod("cosine", m.config.timesteps)
    m.latent_scale_ = 1.0
    m._set_latent_affine(None, None)
    model = m._make_denoiser(4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    hw = m._latent_hw
    yy, xx = torch.meshgrid(torch.arange(hw[0]), torch.arange(hw[1]), indexing="ij")

    def latents(b: int) -> torch.Tensor:  # smooth content: noise is what stands out
        phase = torch.rand(b, 4, 1, 1, generator=gen) * 6.28
        return torch.sin(xx / 2.0 + phase) * torch.cos(yy / 3.0 + phase)

    allowed = torch.ones(8, 1, *hw)
    for _ in range(60):
        loss, _, _ = m._denoiser_loss(model, latents(8), allowed, gen, gen, 0.6, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        from methods.madad.forward import masked_q_sample

        z0 = latents(16)
        masks = (torch.rand(16, 1, *hw, generator=gen) < 0.3).float()
        t = torch.full((16,), 7)
        z_t = masked_q_sample(z0, t, masks, torch.randn(z0.shape, generator=gen), m.abar)
        p = torch.sigmoid(model(z_t, t - 1)[1])
    assert float(p[masks == 1].mean()) > float(p[masks == 0].mean()) + 0.05


def test_official_checkpoint_is_the_best_validation_mse(monkeypatch) -> None:
    """Validation every epoch here (epoch 0 excluded, as the authors'); the weights kept are
    those of the epoch with the lowest validation MSE, not the last ones."""
    data = make_tiny_slices(n_train=16, n_val=4, n_test=2, size=32)
    train, val = data.split("train"), data.split("val")
    scores, snapshots = iter([0.5, 0.1, 0.3]), []
    real = MADAD._validation_mse

    def scripted(self, model, val_set):
        assert real(self, model, val_set) == real(self, model, val_set)  # same draws at every validation
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(scores)

    monkeypatch.setattr(MADAD, "_validation_mse", scripted)
    m = MADAD.from_profile("official-tiny", device="cpu", epochs=4, vae_epochs=1).fit(train, val)
    assert len(snapshots) == 3 and (m.notes["checkpoint_epoch"], m.notes["best_val_mse"]) == (2, 0.1)
    final = m.denoiser.state_dict()
    assert all(torch.equal(final[k], v) for k, v in snapshots[1].items())
    assert not all(torch.equal(final[k], v) for k, v in snapshots[2].items())
    with pytest.raises(Exception, match="validation"):
        MADAD.from_profile("official-tiny", device="cpu").fit(train)


# ---------------------------------------------------------------------------- CUDA (skipped without it)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_training_and_scoring_keep_fp32_latents(tiny_data) -> None:
    train, test = tiny_data
    m = MADAD.from_profile("tiny", device="cuda", score_batch_size=3).fit(train)
    assert m.config.amp and m.config.train_amp and torch.backends.cuda.matmul.allow_tf32
    x = torch.from_numpy(np.asarray(test.images)).cuda()
    with torch.no_grad(), m._autocast(torch.device("cuda")):
        r = m._restore(x)
    assert r["z_T"].dtype == torch.float32 and r["out"].z0.dtype == torch.float32
    maps = m.score(test.images, test.brain_masks)
    assert torch.isfinite(maps).all()
    m.config.score_batch_size = 1
    torch.testing.assert_close(m.score(test.images, test.brain_masks), maps, atol=2e-2, rtol=0)
