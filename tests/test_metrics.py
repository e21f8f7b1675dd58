"""protocols.metrics against brute-force references and scikit-learn.

The references below loop over every candidate threshold and compute Dice directly
from ``map >= t``; the vectorised metrics must agree to ~1e-12.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from protocols import metrics
from protocols.metrics import (
    GRIDS,
    TIE_TOL,
    MaxDice,
    dice_at_threshold,
    global_max_dice,
    per_image_dice,
    per_image_max_dice,
    pixel_auprc,
    pixel_auroc,
    resolve_grid,
    size_bucket,
    threshold_from_healthy,
)

TOL = 1e-12


# --------------------------------------------------------------------------- references


def ref_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    denom = int(pred.sum()) + int(truth.sum())
    return 0.0 if denom == 0 else 2.0 * int((pred & truth).sum()) / denom


def ref_image_dice(pred: np.ndarray, truth: np.ndarray, empty_gt: str) -> float:
    if truth.sum() == 0:
        if empty_gt == "exclude":
            return np.nan
        if empty_gt == "one_if_empty_pred":
            return 1.0 if pred.sum() == 0 else 0.0
        return 0.0
    return ref_dice(pred, truth)


def candidates(maps: np.ndarray, grid=None) -> list[float]:
    if grid is None:
        return sorted(set(np.asarray(maps, dtype=np.float64).ravel().tolist()))
    return sorted(set(resolve_grid(grid).tolist()))


def ref_global(maps: np.ndarray, masks: np.ndarray, grid=None) -> tuple[float, float]:
    m, y = np.asarray(maps, dtype=np.float64), np.asarray(masks) != 0
    best = (-1.0, np.nan)
    for t in candidates(maps, grid):
        d = ref_dice(m >= t, y)
        if d >= best[0]:  # ascending thresholds: ties go to the highest
            best = (d, t)
    return best


def ref_mean_image_dice(maps, masks, t, empty_gt) -> float:
    m, y = np.asarray(maps, dtype=np.float64), np.asarray(masks) != 0
    if m.ndim == 2:
        m, y = m[None], y[None]
    values = [ref_image_dice(m[i] >= t, y[i], empty_gt) for i in range(m.shape[0])]
    return float(np.nanmean(values))


def ref_per_image(maps, masks, grid=None, empty_gt="one_if_empty_pred") -> tuple[float, float, list]:
    ts = candidates(maps, grid)
    means = [ref_mean_image_dice(maps, masks, t, empty_gt) for t in ts]
    top = max(means)
    best = max(i for i, v in enumerate(means) if v >= top - TIE_TOL)
    return means[best], ts[best], means


def random_case(rng, n=4, size=8, levels=None, lesion_p=0.15):
    maps = rng.random((n, size, size))
    if levels:
        maps = np.round(maps * levels) / levels
    masks = (rng.random((n, size, size)) < lesion_p).astype(np.uint8)
    return maps, masks


# --------------------------------------------------------------------------- global Max Dice


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("levels", [None, 3, 10])
def test_global_max_dice_matches_brute_force(seed, levels):
    rng = np.random.default_rng(seed)
    maps, masks = random_case(rng, levels=levels)
    # correlate scores with the lesions so the optimum is not trivial
    maps = maps + 0.5 * masks * rng.random(masks.shape)
    if levels:
        maps = np.round(maps * levels) / levels
    dice, thr = global_max_dice(maps, masks)
    ref = ref_global(maps, masks)
    assert abs(dice - ref[0]) <= TOL
    assert thr == ref[1]
    assert abs(dice_at_threshold(maps, masks, thr) - dice) <= TOL


def test_global_max_dice_returns_namedtuple_and_float32_exact():
    rng = np.random.default_rng(1)
    maps = rng.random((3, 16, 16)).astype(np.float32)
    masks = rng.random((3, 16, 16)) < 0.2
    result = global_max_dice(maps, masks)
    assert isinstance(result, MaxDice)
    dice, thr = result
    ref = ref_global(maps, masks)
    assert dice == pytest.approx(ref[0], abs=TOL) and thr == ref[1]
    assert np.float32(thr) == thr  # the threshold is one of the map values


def test_global_max_dice_edge_cases():
    zeros = np.zeros((2, 4, 4), np.uint8)
    rng = np.random.default_rng(0)
    maps = rng.random((2, 4, 4))
    # all-zero masks: Dice 0, threshold = highest score (tie rule)
    assert global_max_dice(maps, zeros) == (0.0, float(maps.max()))
    # constant map: the only threshold predicts everything
    masks = zeros.copy()
    masks[0, :2] = 1
    dice, thr = global_max_dice(np.full((2, 4, 4), 0.3), masks)
    assert thr == 0.3 and dice == pytest.approx(2 * 8 / (32 + 8), abs=TOL)
    # perfect separation, heavy ties
    perfect = masks.astype(np.float64) * 5 + 1
    assert global_max_dice(perfect, masks) == (1.0, 6.0)
    # every pixel a lesion
    ones = np.ones((1, 3, 3))
    assert global_max_dice(rng.random((1, 3, 3)), ones).dice == 1.0
    # a single pixel
    assert global_max_dice(np.array([[0.2]]), np.array([[1]])) == (1.0, 0.2)
    with pytest.raises(ValueError, match="finite"):
        global_max_dice(np.array([np.nan, 1.0]), np.array([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        global_max_dice(np.zeros((2, 3)), np.zeros((3, 2)))


@pytest.mark.parametrize("grid", ["thor", "madad", "itermask2", [0.9, 0.1, 0.5, 0.5, 0.25]])
def test_global_grid_mode_matches_brute_force(grid):
    rng = np.random.default_rng(3)
    maps, masks = random_case(rng, n=3, size=10)
    maps = np.clip(maps * 0.6 + 0.4 * masks, 0, 1)
    dice, thr = global_max_dice(maps, masks, mode="grid", grid=grid)
    ref = ref_global(maps, masks, grid=grid)
    assert abs(dice - ref[0]) <= TOL and thr == ref[1]
    assert dice <= global_max_dice(maps, masks).dice + TOL  # exact is an upper bound


def test_grid_definitions_and_mode_errors():
    assert GRIDS["thor"].size == 101 and GRIDS["thor"][1] == pytest.approx(0.01)
    assert GRIDS["itermask2"].size == 10001 and GRIDS["itermask2"][1] == 1e-4
    assert GRIDS["madad"].size == 201
    maps, masks = np.zeros((2, 2)), np.zeros((2, 2))
    with pytest.raises(ValueError, match="grid"):
        global_max_dice(maps, masks, mode="grid")
    with pytest.raises(ValueError, match="named grids"):
        global_max_dice(maps, masks, mode="grid", grid="nope")
    with pytest.raises(ValueError, match="mode"):
        per_image_max_dice(maps, masks, mode="fast")
    with pytest.raises(ValueError, match="only used"):
        global_max_dice(maps, masks, grid="thor")


def test_torch_inputs_equal_numpy():
    rng = np.random.default_rng(5)
    maps, masks = random_case(rng)
    tm, ty = torch.from_numpy(maps.astype(np.float32)), torch.from_numpy(masks)
    m32 = maps.astype(np.float32)
    assert global_max_dice(tm, ty) == global_max_dice(m32, masks)
    assert per_image_max_dice(tm, ty) == per_image_max_dice(m32, masks)
    assert pixel_auroc(tm, ty) == pixel_auroc(m32, masks)
    assert pixel_auprc(tm, ty) == pixel_auprc(m32, masks)


# --------------------------------------------------------------------------- per-image Max Dice


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("levels", [None, 4, 20])
@pytest.mark.parametrize("empty_gt", ["one_if_empty_pred", "zero", "exclude"])
def test_per_image_max_dice_matches_brute_force(seed, levels, empty_gt):
    rng = np.random.default_rng(100 + seed)
    maps, masks = random_case(rng, n=5, size=6, levels=levels)
    masks[0] = 0  # one image with empty ground truth
    maps = maps + 0.4 * masks
    dice, thr = per_image_max_dice(maps, masks, empty_gt=empty_gt)
    ref_d, ref_t, _ = ref_per_image(maps, masks, empty_gt=empty_gt)
    assert abs(dice - ref_d) <= TOL
    assert thr == ref_t
    assert abs(dice_at_threshold(maps, masks, thr, per_image=True, empty_gt=empty_gt) - dice) <= TOL


@pytest.mark.parametrize("grid", ["thor", "itermask2", np.array([0.05, 0.5, 0.3, 0.3, 2.0])])
def test_per_image_grid_mode_matches_brute_force(grid):
    rng = np.random.default_rng(7)
    maps, masks = random_case(rng, n=4, size=6)
    masks[1] = 0
    maps = np.clip(0.7 * maps + 0.3 * masks, 0, 1)
    dice, thr = per_image_max_dice(maps, masks, mode="grid", grid=grid)
    ref_d, ref_t, _ = ref_per_image(maps, masks, grid=grid)
    assert abs(dice - ref_d) <= TOL and thr == ref_t


def test_per_image_whole_curve_matches_brute_force():
    """The difference-array curve itself (before the exact re-evaluation) is right."""
    rng = np.random.default_rng(11)
    maps, masks = random_case(rng, n=6, size=5, levels=6)
    masks[2] = 0
    scores, truth = maps.reshape(6, -1), masks.reshape(6, -1) != 0
    thresholds, steps = metrics._per_image_steps(scores, truth, None, "one_if_empty_pred")
    _, _, ref_means = ref_per_image(maps, masks)
    np.testing.assert_array_equal(thresholds, np.unique(maps))
    np.testing.assert_allclose(np.cumsum(steps) / 6, ref_means, rtol=0, atol=TOL)
    grid = np.array([0.0, 0.2, 0.5, 0.55, 1.0])
    _, grid_steps = metrics._per_image_steps(scores, truth, grid, "zero")
    _, _, ref_grid = ref_per_image(maps, masks, grid=grid, empty_gt="zero")
    np.testing.assert_allclose(np.cumsum(grid_steps) / 6, ref_grid, rtol=0, atol=TOL)


def test_per_image_chunks_agree(monkeypatch):
    rng = np.random.default_rng(12)
    maps, masks = random_case(rng, n=7, size=8, levels=30)
    maps = maps + 0.3 * masks
    whole = per_image_max_dice(maps, masks)
    monkeypatch.setattr(metrics, "_CHUNK_PIXELS", 100)  # one image per chunk
    assert per_image_max_dice(maps, masks) == whole
    assert abs(whole.dice - ref_per_image(maps, masks)[0]) <= TOL


def test_per_image_edge_cases():
    rng = np.random.default_rng(13)
    # single image (2-D input) equals the global Max Dice of that image
    m, y = rng.random((8, 8)), (rng.random((8, 8)) < 0.2)
    single = per_image_max_dice(m, y)
    assert single == global_max_dice(m, y)
    assert per_image_max_dice(m[None], y[None]) == single
    # every ground truth empty: best is an empty prediction everywhere -> 1 above the max score
    zeros = np.zeros((3, 4, 4))
    maps = rng.random((3, 4, 4))
    d, t = per_image_max_dice(maps, zeros, mode="grid", grid=[0.0, 2.0])
    assert (d, t) == (1.0, 2.0)
    assert per_image_max_dice(maps, zeros, empty_gt="zero").dice == 0.0
    with pytest.raises(ValueError, match="exclude"):
        per_image_max_dice(maps, zeros, empty_gt="exclude")
    with pytest.raises(ValueError, match="empty_gt"):
        per_image_max_dice(maps, zeros, empty_gt="ignore")
    # constant maps with mixed GT
    masks = np.zeros((2, 3, 3))
    masks[0, 0, 0] = 1
    d, t = per_image_max_dice(np.full((2, 3, 3), 0.5), masks)
    assert t == 0.5 and d == pytest.approx((2 / 10 + 0.0) / 2, abs=TOL)


def test_per_image_empty_gt_only_exact_candidates():
    """Exact mode with all-empty GT: only observed values are candidates, so the best is the max."""
    rng = np.random.default_rng(14)
    maps = rng.random((3, 4, 4))
    zeros = np.zeros((3, 4, 4))
    d, t = per_image_max_dice(maps, zeros)
    ref_d, ref_t, _ = ref_per_image(maps, zeros)
    assert abs(d - ref_d) <= TOL and t == ref_t
    # at the global max only one image predicts a pixel: the other two score 1
    assert d == pytest.approx(2 / 3, abs=TOL)


def test_per_image_dice_values():
    maps = np.array([[[0.9, 0.1], [0.1, 0.1]], [[0.1, 0.1], [0.1, 0.1]], [[0.8, 0.8], [0.1, 0.1]]])
    masks = np.array([[[1, 0], [0, 0]], [[0, 0], [0, 0]], [[1, 0], [0, 0]]])
    np.testing.assert_allclose(per_image_dice(maps, masks, 0.5), [1.0, 1.0, 2 / 3])
    np.testing.assert_allclose(per_image_dice(maps, masks, 0.5, empty_gt="zero"), [1.0, 0.0, 2 / 3])
    out = per_image_dice(maps, masks, 0.5, empty_gt="exclude")
    assert np.isnan(out[1]) and dice_at_threshold(maps, masks, 0.5, True, "exclude") == pytest.approx(5 / 6)
    assert dice_at_threshold(maps, masks, 0.5) == pytest.approx(2 * 2 / (3 + 2))
    assert dice_at_threshold(maps, np.zeros_like(masks), 0.95) == 0.0


# --------------------------------------------------------------------------- AUROC / AUPRC


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("levels", [None, 2, 7])
def test_auroc_auprc_match_sklearn(seed, levels):
    rng = np.random.default_rng(200 + seed)
    maps, masks = random_case(rng, n=3, size=12, levels=levels, lesion_p=0.1)
    maps = maps + 0.3 * masks * rng.random(masks.shape)
    y, s = masks.ravel(), maps.ravel()
    assert abs(pixel_auroc(maps, masks) - roc_auc_score(y, s)) <= TOL
    assert abs(pixel_auprc(maps, masks) - average_precision_score(y, s)) <= TOL


def test_auroc_auprc_edge_cases():
    masks = np.array([0, 1, 0, 1])
    assert pixel_auroc(np.full(4, 0.2), masks) == 0.5
    assert pixel_auprc(np.full(4, 0.2), masks) == 0.5
    assert pixel_auroc(np.array([0.0, 1.0, 0.0, 1.0]), masks) == 1.0
    assert pixel_auroc(np.array([1.0, 0.0, 1.0, 0.0]), masks) == 0.0
    assert np.isnan(pixel_auroc(np.arange(4.0), np.zeros(4)))
    assert np.isnan(pixel_auprc(np.arange(4.0), np.zeros(4)))
    assert np.isnan(pixel_auroc(np.arange(4.0), np.ones(4)))
    assert pixel_auprc(np.arange(4.0), np.ones(4)) == 1.0


# --------------------------------------------------------------------------- healthy threshold, buckets


@pytest.mark.parametrize("levels", [None, 5])
@pytest.mark.parametrize("fpr", [0.0, 0.01, 0.05, 0.3])
def test_threshold_from_healthy_is_the_exact_upper_quantile(levels, fpr):
    rng = np.random.default_rng(300)
    maps = rng.random((4, 10, 10))
    if levels:
        maps = np.round(maps * levels) / levels
    brain = np.zeros((4, 10, 10), bool)
    brain[:, 2:8, 1:9] = True
    maps[~brain] = 7.0  # outside the brain must not count
    t = threshold_from_healthy(maps, brain, fpr=fpr)
    inside = maps[brain]
    allowed = np.floor(fpr * inside.size + 1e-9)
    assert (inside >= t).sum() <= allowed
    lower = inside[inside < t]
    if lower.size:  # the next lower observed value would flag too many
        assert (inside >= lower.max()).sum() > allowed


def test_threshold_from_healthy_ties_and_no_mask():
    const = np.full((2, 5, 5), 0.4)
    t = threshold_from_healthy(const, fpr=0.05)
    assert t > 0.4 and t == np.nextafter(0.4, 1)
    assert threshold_from_healthy(np.arange(100.0), fpr=0.05) == 95.0
    with pytest.raises(ValueError):
        threshold_from_healthy(const, fpr=1.0)


def test_size_bucket_boundaries():
    areas = np.array([0, 3, 4, 71, 72, 570, 571, 10**6])
    s1 = size_bucket(areas, [3, 71, 570, np.inf], ["small", "medium", "large"])
    assert s1.tolist() == [None, None, "small", "small", "medium", "medium", "large", "large"]
    s2 = size_bucket([0, 199, 200, 799, 800, 5000], [0, 200, 800, np.inf], ["small", "medium", "large"], right=False)
    assert s2.tolist() == ["small", "small", "medium", "medium", "large", "large"]
    with pytest.raises(ValueError):
        size_bucket(areas, [3, 71], ["a", "b"])


@pytest.mark.parametrize("seed", range(3))
def test_float32_and_signed_zero_maps_match_brute_force(seed):
    rng = np.random.default_rng(400 + seed)
    maps, masks = random_case(rng, n=4, size=6, levels=5)
    maps = (maps - 0.4).astype(np.float32)
    maps[maps == 0] = -0.0  # -0.0 and 0.0 are one threshold
    maps[0, 0, :3] = [0.0, -0.0, 0.0]
    masks[0, 0, :3] = [1, 0, 1]
    d, t = global_max_dice(maps, masks)
    ref = ref_global(maps, masks)
    assert abs(d - ref[0]) <= TOL and t == ref[1]
    d, t = per_image_max_dice(maps, masks)
    ref_d, ref_t, _ = ref_per_image(maps, masks)
    assert abs(d - ref_d) <= TOL and t == ref_t
    assert abs(pixel_auroc(maps, masks) - roc_auc_score(masks.ravel(), maps.ravel())) <= TOL
