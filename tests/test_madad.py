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
from methods.madad.vae import build_vae, load_pretrained_grey_vae
from tests.conftest import make_tiny_slices


# ---------------------------------------------------------------------------- schedule, eq. 2
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
def test_ddim_timesteps() -> None:
    assert ddim_timesteps(10, 10) == list(range(10, 0, -1))
    assert ddim_timesteps(10, 5) == [10, 8, 6, 4, 2]
    assert ddim_timesteps(10, 2) == [10, 5]


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
def test_latent_normalisation_gives_unit_variance_training_latents(tiny_data, norm: str) -> None:
    """The diffusion latents (posterior samples) of the training slices: per channel zero mean
    and unit std ("channel"), identity channel covariance ("whiten"), or unit std over all
    elements ("global"); decoding inverts it."""
    train, _ = tiny_data
    m = MADAD.from_profile("tiny", device="cpu", latent_norm=norm, epochs=0).fit(train)
    with torch.no_grad():
        dist = m.vae.encode(m._to_vae(torch.from_numpy(np.asarray(train.images)))).latent_dist
    sample = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(1))
    z = m._normalise(sample)
    if norm == "global":
        assert m.latent_mean_ is None
        assert z.std().item() == pytest.approx(1.0, abs=0.1)
    else:
        assert m.latent_scale_ == 1.0 and m.latent_mean_ is not None
        torch.testing.assert_close(z.mean((0, 2, 3)), torch.zeros(z.shape[1]), atol=0.1, rtol=0)
        flat = z.permute(1, 0, 2, 3).reshape(z.shape[1], -1)
        cov = torch.cov(flat)
        torch.testing.assert_close(cov.diagonal(), torch.ones(z.shape[1]), atol=0.15, rtol=0)
        if norm == "whiten":  # channels decorrelated too
            torch.testing.assert_close(cov, torch.eye(z.shape[1]), atol=0.15, rtol=0)
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
    assert (paper.schedule, paper.mask_loss, paper.lr, paper.epochs, paper.batch_size, paper.gamma) == ("linear", "bce", 5e-4, 300, 96, 0.2)
    assert (official.schedule, official.mask_loss, official.mask_loss_weight, official.gamma) == ("cosine", "mse", 1e-3, 0.25)
    assert (paper.image_size, paper.timesteps, paper.sigma, paper.ddim_steps) == (256, 10, 0.5, 10)
