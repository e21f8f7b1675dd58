"""Cycl.UNet: the runner's paired view (fit gets A and B of the same slices, score gets A),
early failure without B, the training key, and the cycle map."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.run import main
from datasets.format import SliceSet, save_slices
from methods.base import ConfigError
from methods.cyclunet import CyclUNet, erode, intermediate_for
from tests.conftest import make_tiny_slices


def _tiny4() -> SliceSet:
    return make_tiny_slices(n_train=8, n_val=3, n_test=5, size=32, channels=4)


def _records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "records").rglob("*.json"))]


@pytest.fixture
def spy(monkeypatch):
    """Record what the runner hands CyclUNet.fit and CyclUNet.score."""
    seen: dict[str, list] = {"fit": [], "score": []}
    fit, score = CyclUNet._fit, CyclUNet.score

    def spy_fit(self, train, val):
        seen["fit"].append((list(train.modalities), np.array(train.images), train.table.copy(), val))
        return fit(self, train, val)

    def spy_score(self, images, brain_masks, progress=False):
        seen["score"].append(np.array(images))
        return score(self, images, brain_masks, progress)

    monkeypatch.setattr(CyclUNet, "_fit", spy_fit)
    monkeypatch.setattr(CyclUNet, "score", spy_score)
    return seen


def _run(data_dir: Path, out: Path, *extra: str) -> int:
    argv = ["--protocol", "S2", "--methods", "cyclunet", "--profile", "tiny", "--data", str(data_dir), "--out", str(out), "--modalities", "FLAIR", "--no-progress", *extra]
    return main(argv)


def test_runner_hands_fit_a_and_b_of_the_same_slices_and_score_a_only(tmp_path, spy):
    data = _tiny4()
    path = save_slices(data, tmp_path / "tiny4")
    out = tmp_path / "run"
    assert _run(path, out, "--variants", "cyclunet:intermediate_modality=T1") == 0
    records = _records(out)
    assert len(records) == 2 and {r["status"] for r in records} == {"ok"}

    (mods, images, table, val), (mods_t1, images_t1, _, _) = spy["fit"]
    assert mods == ["FLAIR", "T2"] and mods_t1 == ["FLAIR", "T1"]
    train_rows = np.flatnonzero(data.table["split"].to_numpy() == "train")
    assert table["subject_id"].tolist() == data.table["subject_id"].to_numpy()[train_rows].tolist()
    assert np.array_equal(images[:, 0], data.images[train_rows, 3])  # FLAIR
    assert np.array_equal(images[:, 1], data.images[train_rows, 2])  # T2 of the same slices
    assert np.array_equal(images_t1[:, 1], data.images[train_rows, 0])  # T1
    assert val is not None and list(val.modalities) == ["FLAIR", "T2"]

    test_rows = np.flatnonzero(data.table["split"].to_numpy() == "test")
    scored = spy["score"][0]
    assert scored.shape[1] == 1 and np.array_equal(scored[:, 0], data.images[test_rows, 3])

    default = next(r for r in records if r["variant"] == "default")
    other = next(r for r in records if r["variant"] != "default")
    assert default["data"]["training_modalities"] == ["FLAIR", "T2"]
    assert other["data"]["training_modalities"] == ["FLAIR", "T1"]
    assert default["training_key"] != other["training_key"], "B is part of the checkpoint key"
    assert default["notes"]["intermediate_modality"] == "T2"


def test_runner_fails_early_when_the_data_lack_the_intermediate_modality(tmp_path, spy):
    data = _tiny4()
    keep = [0, 1, 3]  # T1, T1CE, FLAIR: no T2
    no_t2 = SliceSet(np.ascontiguousarray(data.images[:, keep]), data.lesion_masks, data.brain_masks, data.table, ["T1", "T1CE", "FLAIR"], manifest={"name": "no-t2"})
    out = tmp_path / "run"
    _run(save_slices(no_t2, tmp_path / "no-t2"), out)
    (record,) = _records(out)
    assert record["status"] == "failed"
    assert "T2" in record["error"] and "cyclunet" in record["error"]
    assert spy["fit"] == [], "no training before the data are checked"


def test_fit_without_the_paired_view_is_a_clear_error():
    data = make_tiny_slices(n_train=4, n_val=1, n_test=1, size=32)  # one channel only
    with pytest.raises(ValueError, match=r"paired slices \[A, B\]"):
        CyclUNet.from_profile("tiny", device="cpu").fit(data.split("train"), data.split("val"))


def test_intermediate_modality_defaults_and_errors():
    assert intermediate_for("FLAIR", None) == "T2" and intermediate_for("T2", None) == "FLAIR"
    assert intermediate_for("T1", None) == "T2" and intermediate_for("T1CE", None) == "T1"
    assert intermediate_for("T1", "T1CE") == "T1CE"
    assert CyclUNet.from_profile("tiny").training_modalities("FLAIR") == ["FLAIR", "T2"]
    with pytest.raises(ConfigError, match="must differ"):
        intermediate_for("T2", "T2")
    with pytest.raises(ConfigError, match="no default"):
        intermediate_for("PD", None)


def test_erosion_matches_a_brute_force_disk():
    rng = np.random.default_rng(0)
    masks = (rng.random((2, 20, 20)) < 0.9).astype(np.float32)
    masks[:, 8:12, 8:12] = 1
    r = 2
    expected = np.ones_like(masks)
    for b in range(2):
        for i in range(20):
            for j in range(20):
                for di in range(-r, r + 1):
                    for dj in range(-r, r + 1):
                        inside = 0 <= i + di < 20 and 0 <= j + dj < 20  # beyond the border counts as brain
                        if di * di + dj * dj <= r * r and inside and masks[b, i + di, j + dj] == 0:
                            expected[b, i, j] = 0
    assert np.array_equal(erode(torch.from_numpy(masks), r).numpy(), expected)


def test_map_is_the_squared_cycle_residual_inside_the_eroded_brain():
    data = _tiny4()
    method = CyclUNet.from_profile("tiny", device="cpu", brain_erosion_radius=1)
    method.input_shape_ = (1, 32, 32)
    method._build()
    for net in (method.forward_net, method.backward_net):
        torch.nn.init.normal_(net.head[-1].weight, std=0.3)
    method.fitted_ = True
    test = data.modality("FLAIR").split("test")
    x, brain = torch.from_numpy(np.asarray(test.images)), torch.from_numpy(np.asarray(test.brain_masks))
    with torch.no_grad():
        u = 6 * x - 3
        cycle = (method.backward_net(method.forward_net(u)) + 3) / 6
    expected = ((x - cycle) ** 2)[:, 0] * erode(brain, 1)
    maps = method.score(x, brain)
    assert torch.allclose(maps, expected, atol=1e-6) and maps.abs().sum() > 0
