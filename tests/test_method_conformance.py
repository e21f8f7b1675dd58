"""One conformance test for every registered method (built-in and plugins), in the spirit of
scikit-learn's ``check_estimator``: fit on tiny healthy data, then check the score contract
and the save/load round trip. A new method gets it for free.

Methods run with their ``tiny`` profile when they define one (the same algorithm at a size
that trains in seconds), else ``quick``. A method that trains on more modalities than it
scores (``training_modalities``) gets four-channel data and, as from the runner, a paired
view for ``fit`` and the scored modality alone for ``score``.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.execute import paired_split
from methods.base import UADMethod
from methods.registry import get_method_class, list_methods
from tests.conftest import make_tiny_slices


def _tiny(name: str) -> UADMethod:
    cls = get_method_class(name)
    profile = "tiny" if "tiny" in cls.profiles else "quick"
    return cls.from_profile(profile, device="cpu", seed=0, score_batch_size=3)


@pytest.mark.parametrize("name", list_methods())
def test_method_conformance(name: str, tmp_path) -> None:
    method = _tiny(name)
    modalities = method.training_modalities("FLAIR")
    if modalities == ["FLAIR"]:
        data = make_tiny_slices(n_train=8, n_val=2, n_test=4, size=32)
        train, val, test = data.split("train"), data.split("val"), data.split("test")
    else:
        data = make_tiny_slices(n_train=8, n_val=2, n_test=4, size=32, channels=4)
        train, val = paired_split(data, modalities, "train"), paired_split(data, modalities, "val")
        test = data.modality("FLAIR").split("test")
    assert method.fit(train, val) is method, "fit must return self"

    maps = method.score(test.images, test.brain_masks)
    assert maps.shape == (len(test), 32, 32)
    assert maps.dtype == torch.float32
    assert torch.isfinite(maps).all()
    outside = torch.as_tensor(test.brain_masks) == 0
    assert torch.all(maps[outside] == 0), "maps are zero outside the brain by default"
    assert torch.equal(method.score(test.images, test.brain_masks), maps), "scoring must be deterministic"
    if method.batch_invariant:
        method.config.score_batch_size = 1
        assert torch.allclose(method.score(test.images, test.brain_masks), maps, atol=1e-5), "batching changed the maps"
        method.config.score_batch_size = 3

    method.save(tmp_path / name)
    loaded = UADMethod.load(tmp_path / name)
    assert type(loaded) is type(method)
    assert torch.allclose(loaded.score(test.images, test.brain_masks), maps, atol=1e-6), "a loaded method scores identically"

    if method.can_reconstruct:
        recon = method.reconstruct(test.images, test.brain_masks)
        assert recon.shape == test.images.shape and torch.isfinite(recon).all()
