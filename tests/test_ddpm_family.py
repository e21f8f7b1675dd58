"""DDPM, AnoDDPM and pDDPM: pDDPM's patch grid, noise types, profiles, fit/score/save/load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from methods.base import UADMethod
from methods.common.schedules import scale_timestep
from methods.pddpm import PDDPM, grid_starts, patch_grid
from methods.registry import create_method, get_method_class
from tests.conftest import make_tiny_slices

FAMILY = ("ddpm", "anoddpm", "pddpm")


# ----------------------------------------------------------------------------- pDDPM grid
@pytest.mark.parametrize("size,patch", [(128, 48), (96, 48), (64, 24), (16, 6), (100, 48), (32, 32), (33, 8)])
def test_pddpm_patches_tile_the_image_exactly_once(size: int, patch: int) -> None:
    boxes, owners = patch_grid(size, size, patch)
    assert owners.shape == (len(boxes), size, size)
    assert torch.equal(owners.sum(0), torch.ones(size, size))  # every pixel owned exactly once
    for (y0, y1, x0, x1), own in zip(boxes, owners):
        assert y1 - y0 == patch and x1 - x0 == patch  # every noised patch is a full square
        assert 0 <= y0 and y1 <= size and 0 <= x0 and x1 <= size
        inside = torch.zeros(size, size)
        inside[y0:y1, x0:x1] = 1
        assert torch.all(own <= inside)  # a patch only owns pixels it covers
    assert grid_starts(128, 48) == [0, 48, 80]


class _RecordingModel(nn.Module):
    """x0 prediction = the index of the call (a constant image), and records the inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        return torch.full_like(x, float(len(self.inputs) - 1))


class _PatchIndexModel(nn.Module):
    """x0 prediction = the patch index of each input row (rows are patch-major, ``batch`` per patch)."""

    def __init__(self, batch: int) -> None:
        super().__init__()
        self.batch, self.inputs = batch, []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        index = torch.arange(x.shape[0], dtype=x.dtype) // self.batch
        return index.view(-1, 1, 1, 1).expand_as(x).clone()


def test_pddpm_noises_one_patch_at_a_time_and_stitches_from_owners() -> None:
    method = PDDPM.from_profile("tiny", device="cpu", clip_denoised=False)
    method.input_shape_ = (1, 16, 16)
    method.model = _PatchIndexModel(batch=2)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    method.nfe = 0
    x_hat = method.restore(x, torch.Generator().manual_seed(0))
    boxes, owners = method.grid()
    assert len(method.model.inputs) == 1 and len(boxes) == 9  # all patches in one pass of 9 x 2 inputs
    assert method.nfe == 9  # still nine network evaluations per slice
    inputs = method.model.inputs[0].view(9, 2, 1, 16, 16)
    for k, ((y0, y1, x0, x1), x_in) in enumerate(zip(boxes, inputs)):
        outside = torch.ones(16, 16, dtype=torch.bool)
        outside[y0:y1, x0:x1] = False
        assert torch.equal(x_in[..., outside], x[..., outside])  # the rest stays clean
        assert not torch.allclose(x_in[..., ~outside], x[..., ~outside])  # the patch is noised
    expected = sum(k * owners[k] for k in range(len(boxes)))
    assert torch.equal(x_hat, expected.expand_as(x_hat))


def _sequential_restore(method: PDDPM, x: torch.Tensor, t: int, generator) -> torch.Tensor:
    """The patch loop one network pass per patch (the reference for the batched pass)."""
    boxes, owners = method.grid()
    x_hat = torch.zeros_like(x)
    for k, (y0, y1, xa, xb) in enumerate(boxes):
        box = torch.zeros_like(x[:1, :1])
        box[..., y0:y1, xa:xb] = 1.0
        x_t = method.noise_to(x, t, method.sample_noise(x, generator))
        x_hat = x_hat + owners[k] * method.denoise_one_pass(box * x_t + (1 - box) * x, t)
    return x_hat


@pytest.mark.parametrize("noise", ["simplex", "gaussian"])
def test_pddpm_batched_patch_pass_equals_the_sequential_loop(noise: str) -> None:
    torch.manual_seed(0)
    method = PDDPM.from_profile("tiny", device="cpu", noise=noise)
    method.input_shape_ = (1, 16, 16)
    method.data_range_ = (0.0, 1.0)
    method._build()
    with torch.no_grad():  # MONAI zero-initialises the output layer: give every weight a value
        for param in method.model.parameters():
            param.normal_(0.0, 0.2)
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    gens = lambda: method.generator(3)  # noqa: E731  (per-slice generators, seeded alike)
    with torch.no_grad():
        batched = method.restore_at(x, 5, gens())
        sequential = _sequential_restore(method, x, 5, gens())
    assert torch.allclose(batched, sequential, atol=1e-5), float((batched - sequential).abs().max())
    assert batched.abs().min() > 0 or batched.std() > 1e-3  # the network's output is not a constant


def test_pddpm_training_draws_one_patch_per_slice_as_the_per_sample_loop() -> None:
    """Patch choice on the device draws the same patches (same generator stream) as the old list loop."""
    method = PDDPM.from_profile("tiny", device="cpu")
    method.input_shape_ = (1, 16, 16)
    method.model = _RecordingModel()
    x0 = torch.rand(5, 1, 16, 16) * 2 - 1
    method.training_loss(x0, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    boxes, _ = method.grid()
    pick = torch.randint(0, len(boxes), (5,), generator=gen).tolist()
    t = torch.randint(0, method.T, (5,), generator=gen)
    x_t = method.schedule.q_sample(x0, t, method.training_noise(x0, gen))
    expected = x0.clone()
    for i, k in enumerate(pick):
        y0, y1, xa, xb = boxes[k]
        expected[i, :, y0:y1, xa:xb] = x_t[i, :, y0:y1, xa:xb]
    assert torch.equal(method.model.inputs[0], expected)


def test_pddpm_training_loss_sees_only_the_patch() -> None:
    method = PDDPM.from_profile("tiny", device="cpu")
    method.input_shape_ = (1, 16, 16)
    method.model = _RecordingModel()
    x0 = torch.rand(4, 1, 16, 16) * 2 - 1
    method.training_loss(x0, torch.Generator().manual_seed(0))
    x_in = method.model.inputs[0]
    changed = (x_in != x0).flatten(1).sum(1)
    assert torch.all(changed > 0) and torch.all(changed <= 6 * 6)  # one 6x6 patch per slice


# ----------------------------------------------------------------------------- noise types
@pytest.mark.parametrize("name", ["anoddpm", "pddpm"])
def test_simplex_noise_has_the_authors_amplitude_by_default(name: str) -> None:
    method = create_method(name, "paper", device="cpu")
    x0 = torch.zeros(32, 1, 128, 128)
    noise = method.training_noise(x0, torch.Generator().manual_seed(0))
    # the authors' raw fields (octaves 6, persistence 0.8, frequency 64, 128 x 128), not unit
    # variance: mean per-image std 0.49 (AnoDDPM's 3D simplex.py), 0.575 (pDDPM's 2D generate_noise.py)
    std = noise.flatten(1).std(1)
    assert abs(float(std.mean()) - {"anoddpm": 0.49, "pddpm": 0.575}[name]) < 0.04
    neighbour = torch.corrcoef(torch.stack([noise[..., :-1].flatten(), noise[..., 1:].flatten()]))[0, 1]
    assert neighbour > 0.5  # spatially correlated, unlike Gaussian noise
    unit = create_method(name, "paper", device="cpu", simplex_amplitude="unit").training_noise(x0[:4], torch.Generator().manual_seed(0))
    assert torch.allclose(unit.flatten(1).std(1), torch.ones(4), atol=1e-4)  # the named option: unit variance
    with pytest.raises(Exception, match="simplex_amplitude"):
        create_method(name, "paper", device="cpu", simplex_amplitude="loud").validate_config()


def test_anoddpm_trains_as_wyatt() -> None:
    c = get_method_class("anoddpm").from_profile("paper").config
    assert (c.train_t_max, c.ema_decay, c.t_start) == (800, 0.9999, 250)


# ----------------------------------------------------------------------------- profiles
@pytest.mark.parametrize("name", ["ddpm", "anoddpm", "pddpm", "thor", "autoddpm"])
def test_every_profile_is_a_valid_config(name: str) -> None:
    cls = get_method_class(name)
    for profile in cls.profiles:
        method = cls.from_profile(profile, device="cpu")
        method.input_shape_ = (1, 128, 128)
        method.validate_config()
        c = method.config
        assert 0 <= c.val_t < c.num_train_timesteps and (c.train_t_max or c.num_train_timesteps) <= c.num_train_timesteps


@pytest.mark.parametrize("name,t_paper", [("ddpm", 350), ("anoddpm", 250), ("pddpm", 499)])
def test_paper_defaults_and_quick_scaling(name: str, t_paper: int) -> None:
    cls = get_method_class(name)
    paper = cls.from_profile("paper").config
    assert paper.t_start == t_paper and paper.num_train_timesteps == 1000 and paper.image_size == 128
    assert paper.channels == (128, 256, 256) and paper.num_head_channels == 256
    quick = cls.from_profile("quick").config
    assert quick.t_start == scale_timestep(t_paper, 1000, quick.num_train_timesteps)
    assert (paper.schedule, paper.prediction_type, paper.loss) == (quick.schedule, quick.prediction_type, quick.loss)
    # the same noise level at the (scaled) start step: the quick schedule is respaced from T = 1000
    abar = [m.schedule.alphas_cumprod[m.config.t_start] for m in (create_method(name, p) for p in ("paper", "quick"))]
    assert abs(float(abar[0]) - float(abar[1])) < 0.005
    if name == "pddpm":
        assert (paper.schedule, paper.prediction_type, paper.loss, paper.patch_size) == ("cosine", "sample", "l1", 48)
        assert quick.patch_size * paper.image_size == paper.patch_size * quick.image_size  # patch scales with resolution
        # simplex noise, as the authors' config and ci-ber's 128 x 128 one; frequency scaled with the resolution
        assert (paper.noise, quick.noise) == ("simplex", "simplex")
        assert quick.simplex_frequency * paper.image_size == paper.simplex_frequency * quick.image_size
    else:
        assert (paper.schedule, paper.prediction_type, paper.loss) == ("linear", "epsilon", "l2")


# ----------------------------------------------------------------------------- fit / score / save / load
@pytest.fixture(scope="module")
def tiny_data():
    return make_tiny_slices(n_train=8, n_val=0, n_test=3, size=32)


@pytest.mark.parametrize("name", FAMILY)
def test_fit_score_save_load_round_trip(name: str, tiny_data, tmp_path) -> None:
    train, test = tiny_data.split("train"), tiny_data.split("test")
    method = create_method(name, "tiny", device="cpu", score_batch_size=4)
    method.fit(train)
    maps = method.score(test.images, test.brain_masks)
    assert maps.shape == (3, 32, 32) and torch.isfinite(maps).all() and float(maps.max()) > 0
    c = method.config
    expected_nfe = len(patch_grid(16, 16, c.patch_size)[0]) if name == "pddpm" else c.t_start + 1
    assert method.nfe == expected_nfe
    method.save(tmp_path / name)
    loaded = UADMethod.load(tmp_path / name)
    assert torch.equal(loaded.score(test.images, test.brain_masks), maps)
    recon = loaded.reconstruct(test.images, test.brain_masks)
    assert recon.shape == test.images.shape and torch.isfinite(recon).all()


# ----------------------------------------------------------------------------- S2 units
class _OracleDenoiser(nn.Module):
    """Knows the clean images (model space): returns the true noise (epsilon) or x0 (sample) for any x_t."""

    def __init__(self, x0: torch.Tensor, abar: torch.Tensor, prediction_type: str) -> None:
        super().__init__()
        self.x0, self.abar, self.prediction_type = x0, abar, prediction_type

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x0 = self.x0.repeat(x.shape[0] // self.x0.shape[0], 1, 1, 1)  # pDDPM stacks its patch inputs along the batch
        if self.prediction_type == "sample":
            return x0
        a = self.abar[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()


def _oracle(name: str, train, images: torch.Tensor, **overrides):
    method = create_method(name, "tiny", device="cpu", score_batch_size=len(images), **overrides)
    method.input_shape_ = tuple(train.images.shape[1:])
    method.record_data_range(train.images)
    method._build()
    method.model = _OracleDenoiser(method.prepare(images), method.schedule.alphas_cumprod, method.config.prediction_type)
    method.fitted_ = True
    return method


@pytest.mark.parametrize("name", ["ddpm", "anoddpm", "pddpm", "thor", "autoddpm"])
def test_s2_units_above_one_give_zero_residual_with_an_oracle_denoiser(name: str) -> None:
    data = make_tiny_slices(n_train=6, n_val=0, n_test=0, size=32)
    train = data.split("train")
    train.images[:] = train.images * 4.5  # S2 units: brain intensities up to about 3
    images = torch.as_tensor(train.images[:3])
    assert float(images.max()) > 2.5
    brains = torch.as_tensor(train.brain_masks[:3])
    maps = _oracle(name, train, images).score(images, brains)
    assert float(maps.max()) < 1e-3, name  # a perfect denoiser restores every healthy voxel
    if name in ("ddpm", "anoddpm", "pddpm"):  # residual maps: the old [0, 1] assumption clips S2 voxels
        clipped = _oracle(name, train, images, data_range=(0.0, 1.0)).score(images, brains)
        assert float(clipped.max()) > 1.0


def test_fit_records_the_training_range_and_load_restores_it(tmp_path) -> None:
    data = make_tiny_slices(n_train=6, n_val=0, n_test=0, size=32)
    train = data.split("train")
    train.images[:] = train.images * 4.5
    method = create_method("ddpm", "tiny", device="cpu").fit(train)
    assert method.data_range == (float(train.images.min()), float(train.images.max()))
    method.save(tmp_path / "m")
    assert UADMethod.load(tmp_path / "m").data_range == method.data_range


# ----------------------------------------------------------------------------- shared training
@pytest.mark.parametrize("profile", ["paper", "quick", "tiny"])
def test_ddpm_thor_autoddpm_share_one_training_key(profile: str) -> None:
    keys = {name: create_method(name, profile, device="cpu").training_key() for name in ("ddpm", "thor", "autoddpm", "anoddpm", "pddpm", "ae")}
    assert keys["ddpm"] == keys["thor"] == keys["autoddpm"]
    assert len({keys[n] for n in ("ddpm", "anoddpm", "pddpm", "ae")}) == 4  # different training: different keys
    assert create_method("thor", profile, device="cpu", seed=1).training_key() != keys["thor"]
    assert create_method("autoddpm", profile, device="cpu", t_recon=3).training_key() == keys["autoddpm"]  # inference knob
    assert create_method("autoddpm", profile, device="cpu", max_steps=28_971).training_key() != keys["autoddpm"]


def test_a_sibling_loads_the_shared_checkpoint(tmp_path) -> None:
    data = make_tiny_slices(n_train=4, n_val=0, n_test=2, size=16)
    ddpm = create_method("ddpm", "tiny", device="cpu").fit(data.split("train"))
    ddpm.save(tmp_path / "shared")
    thor_config = get_method_class("thor").config_for("tiny", device="cpu")
    thor = get_method_class("thor").load(tmp_path / "shared", config=thor_config)
    assert thor.name == "thor" and thor.data_range == ddpm.data_range and thor.config.t_harmonization == (3, 2, 1)
    with pytest.raises(ValueError, match="trains differently"):
        get_method_class("thor").load(tmp_path / "shared", config=get_method_class("thor").config_for("tiny", lr=0.5))
    for k, v in ddpm.model.state_dict().items():
        assert torch.equal(thor.model.state_dict()[k], v)
    with pytest.raises(ValueError, match="holds method 'ddpm'"):
        get_method_class("anoddpm").load(tmp_path / "shared")
