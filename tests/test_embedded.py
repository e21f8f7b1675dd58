"""The embedded data set: determinism, format, masks, lesion sizes and contrasts, caching.

Builds are small (32^2 or 64^2, a handful of slices); the template stack is built once per
process and cached, so the whole file runs in a few seconds.
"""

from __future__ import annotations

import numpy as np
import pytest

from datasets.embedded import anatomy as anat
from datasets.embedded import build as embedded_build
from datasets.embedded.augment import AugmentConfig, sample_channels, sample_coordinates
from datasets.embedded.build import (
    BUILDER_VERSION, axial_position, build_embedded, load_embedded, render_slice, slice_streams,
)
from datasets.embedded.contrasts import MODALITIES
from datasets.embedded.lesions import SIZE_CLASSES, area_scale, s1_bucket, s2_bucket

SMALL = dict(resolution=32, n_train=6, n_val=2, n_test=5)
# Pinned: the same bytes on every CPU (stable_math replaces NumPy's SIMD-dispatched
# transcendentals). A change here is a change of the data: bump BUILDER_VERSION.
SMALL_FINGERPRINT = "d4fc526daf7d5659"
DEFAULT_FINGERPRINT = "5f33b74b4d443146"  # load_embedded().fingerprint() (what records carry), default sizes


@pytest.fixture(scope="module")
def small():
    return build_embedded(seed=0, **SMALL)


def test_modalities_shapes_dtypes_and_table(small):
    n = SMALL["n_train"] + SMALL["n_val"] + SMALL["n_test"]
    assert small.modalities == ["T1", "T1CE", "T2", "FLAIR"] == list(MODALITIES)
    assert small.images.shape == (n, 4, 32, 32) and small.images.dtype == np.float32
    assert small.lesion_masks.shape == small.brain_masks.shape == (n, 32, 32)
    assert small.lesion_masks.dtype == small.brain_masks.dtype == np.uint8
    assert list(small.table["split"]) == ["train"] * 6 + ["val"] * 2 + ["test"] * 5
    assert small.table["subject_id"].is_unique
    assert small.table["subject_id"].str.match(r"mni-z\d{3}-").all()
    assert np.isfinite(small.images).all()
    assert small.images.min() >= 0.0 and small.images.max() <= 1.0
    # background is exactly 0 in every modality
    assert not (small.images * (1 - small.brain_masks[:, None])).any()
    manifest = small.manifest
    assert manifest["name"] == "embedded" and manifest["builder_version"] == BUILDER_VERSION
    assert {s["key"] for s in manifest["sources"]} == {"t1", "gm", "wm"}
    assert all(len(s["sha256"]) == 64 for s in manifest["sources"])
    assert "McGill" in manifest["licence"] and manifest["fingerprint"]


def test_masks_binary_and_lesions_inside_brain(small):
    for masks in (small.lesion_masks, small.brain_masks):
        assert set(np.unique(masks)) <= {0, 1}
    assert not (small.lesion_masks & (1 - small.brain_masks)).any()
    assert (small.brain_masks.reshape(len(small), -1).sum(1) > 0.2 * 32 * 32).all()
    areas = small.lesion_masks.reshape(len(small), -1).sum(1)
    np.testing.assert_array_equal(areas, small.table["lesion_area"].to_numpy())


def test_healthy_splits_lesion_free_and_test_slices_all_lesioned(small):
    split = small.table["split"].to_numpy()
    assert not small.lesion_masks[split != "test"].any()
    assert (small.table.loc[split == "test", "lesion_area"] > 0).all()


def test_deterministic_for_a_seed_even_from_scratch(small):
    for cached in (anat.load_anatomy, anat.base_stack):
        cached.cache_clear()
    again = build_embedded(seed=0, **SMALL)
    np.testing.assert_array_equal(small.images, again.images)
    np.testing.assert_array_equal(small.lesion_masks, again.lesion_masks)
    np.testing.assert_array_equal(small.brain_masks, again.brain_masks)
    assert small.manifest["fingerprint"] == again.manifest["fingerprint"]
    assert small.table.equals(again.table)


def test_seeds_and_splits_differ(small):
    other = build_embedded(seed=1, **SMALL)
    assert not np.array_equal(small.images, other.images)
    assert small.manifest["fingerprint"] != other.manifest["fingerprint"]
    # no slice of one split repeats a slice (or an axial position) of another
    train, test = small.split("train"), small.split("test")
    for image in test.images:
        assert all(np.abs(image - t).max() > 0.05 for t in train.images)
    z = {split: {axial_position(0, split, k) for k in range(20)} for split in ("train", "val", "test")}
    assert not (z["train"] & z["test"]) and not (z["train"] & z["val"])


def test_prefix_stable_slices():
    """A split's first slices do not depend on how many are built (per-slice seeds)."""
    a = build_embedded(seed=3, resolution=32, n_train=2, n_val=0, n_test=2)
    b = build_embedded(seed=3, resolution=32, n_train=4, n_val=1, n_test=3)
    np.testing.assert_array_equal(a.split("train").images, b.split("train").images[:2])
    np.testing.assert_array_equal(a.split("test").lesion_masks, b.split("test").lesion_masks[:2])


def test_size_classes_cover_every_bucket_of_both_protocols():
    s1 = {s1_bucket(a) for c in SIZE_CLASSES for a in (c.lo, c.hi)}
    s2 = {s2_bucket(a) for c in SIZE_CLASSES for a in (c.lo, c.hi)}
    assert s1 == s2 == {"small", "medium", "large"}
    for c in SIZE_CLASSES:  # each class sits inside one bucket of each protocol
        assert s1_bucket(c.lo) == s1_bucket(c.hi) and s2_bucket(c.lo) == s2_bucket(c.hi)
        assert c.lo <= c.target[0] < c.target[1] <= c.hi


def test_lesion_areas_hit_their_class_at_128():
    """At the default resolution each test slice's lesion lands in its class, so the default
    96-slice test set (classes cycle) has >= 19 slices in each of the five classes."""
    data = build_embedded(seed=0, resolution=128, n_train=0, n_val=0, n_test=10)
    by_name = {c.name: c for c in SIZE_CLASSES}
    for _, row in data.table.iterrows():
        cls = by_name[row["size_class"]]
        assert cls.lo <= row["lesion_area"] <= cls.hi, row.to_dict()
    assert set(data.table["s1_bucket"]) == {"small", "medium", "large"}
    assert set(data.table["s2_bucket"]) == {"small", "medium", "large"}


def _tissue_means(resolution: int, k: int) -> dict[str, dict[str, float]]:
    """Mean intensity per modality over nearly pure CSF / GM / WM pixels of a healthy slice."""
    anatomy = anat.load_anatomy(resolution)
    rendered = render_slice(anatomy, 0, "train", k, lesion=False)
    # the geometry stream is independent of the others, so this is the same sampling grid
    coords = sample_coordinates(slice_streams(0, "train", k)["geometry"], anatomy, axial_position(0, "train", k), AugmentConfig())
    channels = sample_channels(anatomy, coords)
    inside = rendered.brain_mask > 0
    out = {}
    for c, name in enumerate(MODALITIES):
        image = rendered.images[c]
        out[name] = {t: float(image[inside & (channels[t] > 0.7)].mean()) for t in ("csf", "gm", "wm")}
    return out


def test_tissue_ordering_of_contrasts():
    # two slices at the level of the lateral ventricles, where pure CSF pixels exist
    ks = [k for k in range(40) if 78 <= axial_position(0, "train", k) <= 98][:2]
    for k in ks:
        m = _tissue_means(64, k)
        assert m["T1"]["csf"] < m["T1"]["gm"] < m["T1"]["wm"]
        assert m["T1CE"]["csf"] < m["T1CE"]["wm"]
        assert m["T2"]["wm"] < m["T2"]["gm"] < m["T2"]["csf"]
        assert m["FLAIR"]["csf"] < m["FLAIR"]["wm"] < m["FLAIR"]["gm"]


def test_lesion_contrast_sign_per_modality():
    anatomy = anat.load_anatomy(64)
    for k in range(5):  # one slice per size class
        painted = render_slice(anatomy, 0, "test", k, lesion=True)
        plain = render_slice(anatomy, 0, "test", k, lesion=True, paint_lesion=False)
        np.testing.assert_array_equal(painted.lesion_mask, plain.lesion_mask)
        inside = painted.lesion_mask > 0
        diff = {name: painted.images[c][inside] - plain.images[c][inside] for c, name in enumerate(MODALITIES)}
        assert diff["T1"].mean() < 0, k
        assert diff["T2"].mean() > 0, k
        assert diff["FLAIR"].mean() > 0, k
        assert np.percentile(diff["T1CE"], 90) > 0, k  # enhancing rim (or solid enhancement)
        # only the lesion's neighbourhood changes, apart from the renormalisation
        outside = ~(np.asarray(painted.lesion_mask, bool))
        assert np.abs(painted.images[:, outside] - plain.images[:, outside]).mean() < 0.05


def test_area_scale_for_other_resolutions():
    assert area_scale(128) == 1.0 and area_scale(64) == 0.25


def test_cache_is_reused_and_env_var_respected(tmp_path, monkeypatch):
    monkeypatch.setenv("UAD_BENCH_CACHE", str(tmp_path))
    first = load_embedded(seed=2, resolution=32, n_train=3, n_val=1, n_test=2)
    path = tmp_path / embedded_build.cache_name(2, 32, 3, 1, 2)
    assert path.is_dir() and first.manifest["path"] == str(path.resolve())
    assert f"v{BUILDER_VERSION}" in path.name and "seed2" in path.name

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt although the cache was valid")

    monkeypatch.setattr(embedded_build, "build_embedded", no_build)
    second = load_embedded(seed=2, resolution=32, n_train=3, n_val=1, n_test=2)
    np.testing.assert_array_equal(np.asarray(first.images), np.asarray(second.images))
    assert second.fingerprint() == first.fingerprint()


def test_broken_cache_is_rebuilt(tmp_path):
    first = load_embedded(seed=0, resolution=32, n_train=2, n_val=1, n_test=1, cache_dir=tmp_path)
    path = tmp_path / embedded_build.cache_name(0, 32, 2, 1, 1)
    (path / "images.npy").unlink()
    again = load_embedded(seed=0, resolution=32, n_train=2, n_val=1, n_test=1, cache_dir=tmp_path)
    np.testing.assert_array_equal(np.asarray(first.images), np.asarray(again.images))


def test_built_set_matches_cached_set(small, tmp_path):
    loaded = load_embedded(seed=0, cache_dir=tmp_path, **SMALL)
    np.testing.assert_array_equal(small.images, np.asarray(loaded.images))
    assert loaded.manifest["fingerprint"] == small.manifest["fingerprint"]
    assert list(loaded.table["subject_id"]) == list(small.table["subject_id"])


def test_fingerprint_is_pinned(small):
    assert small.manifest["fingerprint"] == SMALL_FINGERPRINT


def test_same_bytes_without_numpy_simd_kernels():
    """Rebuild in a process whose NumPy may use no dispatched SIMD kernel (and, on x86,
    OpenBLAS's oldest kernels): the fingerprint must not move."""
    import os
    import platform
    import subprocess
    import sys
    from pathlib import Path

    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__

    available = [f for f in __cpu_dispatch__ if __cpu_features__.get(f)]
    if not available:
        pytest.skip("this NumPy dispatches no SIMD kernel on this CPU: nothing to switch off")
    env = dict(os.environ, NPY_DISABLE_CPU_FEATURES=" ".join(available))
    if platform.machine().lower() in ("x86_64", "amd64"):
        env["OPENBLAS_CORETYPE"] = "Prescott"
    code = (
        "from datasets.embedded.build import build_embedded; "
        f"print(build_embedded(seed=0, **{SMALL!r}).manifest['fingerprint'])"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == SMALL_FINGERPRINT


def test_default_set_fingerprint_when_cached():
    """The default set's pinned fingerprint, checked when the cache holds it (building it
    here would take a minute)."""
    path = embedded_build.cache_root() / embedded_build.cache_name(0, 128, 320, 48, 96)
    if not path.is_dir():
        pytest.skip(f"{path} not built; run `python -m datasets.embedded` to check the default set too")
    assert load_embedded().fingerprint() == DEFAULT_FINGERPRINT


def test_stable_math_matches_numpy_to_a_few_ulps():
    from datasets.embedded import stable_math as sm

    rng = np.random.default_rng(0)
    x = rng.uniform(-40.0, 40.0, 20000)
    p = np.exp(rng.uniform(-60.0, 5.0, 20000))

    def ulps(a, b):
        return float(np.max(np.abs(a - b) / np.spacing(np.abs(b))))

    assert ulps(sm.exp(x), np.exp(x)) <= 4
    assert ulps(sm.log(p), np.log(p)) <= 4
    assert ulps(sm.tanh(x / 10), np.tanh(x / 10)) <= 4 and ulps(sm.tanh(x * 1e-9), np.tanh(x * 1e-9)) <= 4
    assert ulps(sm.logistic(x), 1.0 / (1.0 + np.exp(-x))) <= 8
    q = rng.uniform(0.0, 1.0, 20000)
    assert ulps(sm.power(q, 1.13), q**1.13) <= 32
    np.testing.assert_array_equal(sm.power(np.array([0.0, 1.0]), 0.9), [0.0, 1.0])
    assert sm.log(np.array([0.0]))[0] == -np.inf and sm.exp(0.0) == 1.0 and sm.tanh(0.0) == 0.0
