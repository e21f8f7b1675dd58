"""The intensity floor: its map is the masked intensity (or its shifted negative), nothing else."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from methods.base import ConfigError, UADMethod
from methods.registry import create_method
from tests.conftest import make_tiny_slices


def _data(modality: str):
    data = make_tiny_slices(n_train=6, n_val=2, n_test=4, size=32, channels=4, seed=3)
    view = data.modality(modality)
    return view.split("train"), view.split("test")


@pytest.mark.parametrize("modality", ["FLAIR", "T2"])
def test_bright_map_is_the_masked_intensity(modality):
    train, test = _data(modality)
    method = create_method("intensity", "quick", device="cpu").fit(train)
    maps = method.score(test.images, test.brain_masks).numpy()
    expected = np.asarray(test.images)[:, 0] * (np.asarray(test.brain_masks) > 0)
    np.testing.assert_array_equal(maps, expected.astype(np.float32))
    assert method.notes["sign"] == {modality: "bright"}


@pytest.mark.parametrize("modality", ["T1", "T1CE"])
def test_dark_map_is_the_shifted_negative_intensity(modality):
    train, test = _data(modality)
    method = create_method("intensity", "quick", device="cpu").fit(train)
    brain = np.asarray(train.brain_masks) > 0
    reference = float(np.asarray(train.images)[:, 0][brain].max())
    maps = method.score(test.images, test.brain_masks).numpy()
    x = np.asarray(test.images)[:, 0]
    expected = np.maximum(reference - x, 0.0) * (np.asarray(test.brain_masks) > 0)
    np.testing.assert_allclose(maps, expected, rtol=0, atol=1e-7)
    assert method.notes["sign"] == {modality: "dark"} and method.notes["dark_reference"][modality] == pytest.approx(reference)
    # darker brain pixels score higher: the ranking inside the brain is the negative intensity
    inside = np.asarray(test.brain_masks) > 0
    a, b = x[inside], maps[inside]
    order = np.argsort(a, kind="stable")
    assert (np.diff(b[order]) <= 1e-7).all()


def test_sign_override_save_load_and_bad_sign(tmp_path):
    train, test = _data("T1")
    method = create_method("intensity", "paper", device="cpu", sign="bright").fit(train)
    maps = method.score(test.images, test.brain_masks)
    assert torch.equal(maps, torch.as_tensor(np.asarray(test.images)[:, 0]) * torch.as_tensor(np.asarray(test.brain_masks) > 0))
    method.save(tmp_path / "m")
    loaded = UADMethod.load(tmp_path / "m")
    assert torch.equal(loaded.score(test.images, test.brain_masks), maps)
    assert loaded.notes["sign"] == {"T1": "bright"}
    loaded.with_inference_overrides(sign="dark")  # an inference knob: no refit, notes follow
    assert not torch.equal(loaded.score(test.images, test.brain_masks), maps) and loaded.notes["sign"] == {"T1": "dark"}
    with pytest.raises(ConfigError, match="sign must be one of"):
        create_method("intensity", "paper", device="cpu", sign="up").fit(train).score(test.images, test.brain_masks)
