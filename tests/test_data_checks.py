"""A prepared set is checked when it is loaded, before any training: bad contents fail with a
message naming the folder, and the fingerprint follows the arrays, not the manifest."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from datasets.format import DatasetFormatError, load_slices, remove_stale_temporaries, save_slices
from tests.conftest import make_tiny_slices


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    return save_slices(make_tiny_slices(n_train=6, n_val=2, n_test=4, size=16, channels=2), tmp_path / "set")


def _edit(path: Path, name: str, change) -> None:
    array = np.load(path / name)
    change(array)
    np.save(path / name, array)


@pytest.mark.parametrize(
    "name, change, message",
    [
        ("images.npy", lambda a: a.__setitem__((3, 0, 8, 8), np.nan), "NaN or infinite"),
        ("lesion_masks.npy", lambda a: a.__setitem__((9, 8, 8), 2), "only 0 and 1"),
        ("brain_masks.npy", lambda a: a.__setitem__(4, 0), "empty brain mask (first: row 4)"),
        ("lesion_masks.npy", lambda a: a.__setitem__((1, 8, 8), 1), "training slice(s) carry lesion pixels (first: row 1)"),
        ("images.npy", lambda a: a.__setitem__((slice(None), 1), 0.5), "channel 'T1CE' is constant inside the brain"),
    ],
)
def test_bad_contents_fail_at_load_naming_the_set(prepared: Path, name: str, change, message: str) -> None:
    _edit(prepared, name, change)
    with pytest.raises(DatasetFormatError, match=str(prepared)) as exc:
        load_slices(prepared)
    assert message in str(exc.value)


def test_swapped_modality_names_are_caught(prepared: Path) -> None:
    manifest_path = prepared / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["modalities"] == ["T1", "T1CE"]
    images = np.load(prepared / "images.npy")
    images[:, 1] *= 3.0  # make the two contrasts distinguishable, as real ones are
    np.save(prepared / "images.npy", images)
    fresh = save_slices(load_slices(prepared, check=False), prepared.parent / "fresh-set")
    manifest = json.loads((fresh / "manifest.json").read_text())
    manifest["modalities"] = ["T1CE", "T1"]
    (fresh / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetFormatError, match="reordered"):
        load_slices(fresh)


def test_a_manifest_that_is_no_object_is_refused(prepared: Path) -> None:
    (prepared / "manifest.json").write_text("[1, 2]")
    with pytest.raises(DatasetFormatError, match="must hold a JSON object, got a list"):
        load_slices(prepared)


def test_fingerprint_follows_the_arrays_not_the_manifest(prepared: Path) -> None:
    before = load_slices(prepared).fingerprint()
    assert load_slices(prepared).split("train").fingerprint() != before
    _edit(prepared, "images.npy", lambda a: a.__setitem__((10, 0, 8, 8), a[10, 0, 8, 8] + 0.25))  # the manifest is unchanged
    assert load_slices(prepared, check=False).fingerprint() != before


def test_stale_temporaries_of_an_interrupted_write_are_removed(tmp_path: Path) -> None:
    target = tmp_path / "embedded-v2"
    stale, fresh = tmp_path / ".embedded-v2.abc.tmp", tmp_path / ".embedded-v2.def.tmp"
    for folder in (stale, fresh):
        folder.mkdir()
        (folder / "images.npy").write_bytes(b"x" * 10)
    old = time.time() - 7 * 3600
    os.utime(stale, (old, old))
    assert remove_stale_temporaries(target) == [stale]
    assert not stale.exists() and fresh.exists()  # a write in progress elsewhere is left alone
