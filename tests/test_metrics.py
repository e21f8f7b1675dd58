"""protocols.metrics against brute-force references and scikit-learn.

The references below loop over every candidate threshold and compute Dice directly from
the prediction rule. Our exact rule: ``map >= t`` over every distinct score and one value
above the maximum, ties to the highest threshold. The peers' rules are written here from
their evaluators' definitions (independently of ``PEER_GRIDS``):

- THOR: np.linspace(0, 1, 101), ``map > t``, pooled 2tp / (P + G + 1e-6), first maximum;
- IterMask2: k / 10000 for k = 0..99, ``map > t``, mean per-image 2tp / (P + G), first maximum;
- MAD-AD: np.linspace(0, 1, 201), ``map > t``, mean per-image 2tp / (P + G + 1e-6), first maximum;
- THOR and MAD-AD binarise in place (``p[p > t] = 1; p[p < 1] = 0``): a score >= 1 is
  always predicted; they ran numpy 1.x, so a float32 map meets float32(t).

The vectorised metrics must agree to ~1e-12 in value and exactly in the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from protocols import metrics
from protocols.metrics import (
    EXACT_RULE,
    GRIDS,
    PEER_GRIDS,
    TIE_TOL,
    MaxDice,
    PeerGrid,
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
EMPTY_GT = ("one_if_empty_pred", "zero", "exclude")


# --------------------------------------------------------------------------- references


@dataclass(frozen=True)
class Ref:
    """A threshold rule written from the peers' definitions (module docstring)."""

    thresholds: tuple
    strict: bool
    eps: float
    lowest: bool
    saturate: float | None
    float32_compare: bool


PEERS = {
    "thor": Ref(tuple(np.linspace(0, 1, 101)), True, 1e-6, True, 1.0, True),
    "itermask2": Ref(tuple(k / 10000 for k in range(100)), True, 0.0, True, None, False),
    "itermask2_fine": Ref(tuple(k / 10000 for k in range(10001)), True, 0.0, True, None, False),
    "madad": Ref(tuple(np.linspace(0, 1, 201)), True, 1e-6, True, 1.0, True),
}


def ref_pred(m: np.ndarray, t: float, ref: Ref | None) -> np.ndarray:
    """Prediction at threshold t: ours (map >= t in float64) or a peer rule."""
    if ref is None:
        return m.astype(np.float64) >= t
    if ref.float32_compare and m.dtype == np.float32:
        pred = m > np.float32(t)  # float32 against float32, as numpy 1.x did
    else:
        pred = m.astype(np.float64) > t if ref.strict else m.astype(np.float64) >= t
    if ref.saturate is not None:
        pred = pred | (m >= ref.saturate)
    return pred


def ref_dice(pred: np.ndarray, truth: np.ndarray, eps: float = 0.0) -> float:
    denom = int(pred.sum()) + int(truth.sum()) + eps
    return 0.0 if denom == 0 else 2.0 * int((pred & truth).sum()) / denom


def ref_image_dice(pred: np.ndarray, truth: np.ndarray, empty_gt: str, eps: float = 0.0) -> float:
    if truth.sum() == 0:
        if empty_gt == "exclude":
            return np.nan
        if empty_gt == "one_if_empty_pred":
            return 1.0 if pred.sum() == 0 else 0.0
        return 0.0
    return ref_dice(pred, truth, eps)


def exact_candidates(maps: np.ndarray) -> list[float]:
    values = sorted(set(np.asarray(maps, dtype=np.float64).ravel().tolist()))
    return values + [float(np.nextafter(values[-1], np.inf))]  # "predict nothing"


def candidates(maps: np.ndarray, grid=None) -> list[float]:
    """Exact candidates, or a custom array grid's values (our rule)."""
    if grid is None:
        return exact_candidates(maps)
    return sorted(set(np.asarray(grid, dtype=np.float64).ravel().tolist()))


def _choose(values: list[float], lowest: bool, tol: float = 0.0) -> int:
    top = max(values)
    tied = [i for i, v in enumerate(values) if v >= top - tol]
    return tied[0] if lowest else tied[-1]


def ref_global_curve(maps, masks, ref: Ref | None = None, grid=None) -> tuple[list, list]:
    m, y = np.asarray(maps), np.asarray(masks) != 0
    ts = list(ref.thresholds) if ref is not None else candidates(maps, grid)
    return ts, [ref_dice(ref_pred(m, t, ref), y, ref.eps if ref else 0.0) for t in ts]


def ref_global(maps, masks, grid=None, ref: Ref | None = None) -> tuple[float, float]:
    ts, ds = ref_global_curve(maps, masks, ref, grid)
    k = _choose(ds, lowest=ref is not None and ref.lowest)
    return ds[k], ts[k]


def ref_mean_image_dice(maps, masks, t, empty_gt, ref: Ref | None = None) -> float:
    m, y = np.asarray(maps), np.asarray(masks) != 0
    if m.ndim == 2:
        m, y = m[None], y[None]
    eps = ref.eps if ref else 0.0
    values = [ref_image_dice(ref_pred(m[i], t, ref), y[i], empty_gt, eps) for i in range(m.shape[0])]
    return float(np.nanmean(values))


def ref_per_image(maps, masks, grid=None, empty_gt="one_if_empty_pred", ref: Ref | None = None) -> tuple[float, float, list]:
    ts = list(ref.thresholds) if ref is not None else candidates(maps, grid)
    means = [ref_mean_image_dice(maps, masks, t, empty_gt, ref) for t in ts]
    k = _choose(means, lowest=ref is not None and ref.lowest, tol=TIE_TOL)
    return means[k], ts[k], means


def random_case(rng, n=4, size=8, levels=None, lesion_p=0.15):
    maps = rng.random((n, size, size))
    if levels:
        maps = np.round(maps * levels) / levels
    masks = (rng.random((n, size, size)) < lesion_p).astype(np.uint8)
    return maps, masks


def peer_case(kind: str, seed: int, n: int = 4, size: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Maps that make each rule matter: ties on grid values, negatives, scores >= 1, float32, empty GT."""
    rng = np.random.default_rng(seed)
    masks = (rng.random((n, size, size)) < 0.2).astype(np.uint8)
    masks[0] = 0  # one image without lesion pixels
    base = rng.random((n, size, size)) * 0.7 + 0.3 * masks * rng.random((n, size, size))
    if kind == "random":
        return base, masks
    if kind == "tied":  # every score on the 1/100 and 1/200 grids: strict vs >= decides
        return np.round(base * 20) / 20, masks
    if kind == "negative":
        return base - 0.5, masks
    if kind == "above_one":  # scores >= 1 (some exactly 1): saturation at t = 1 decides
        maps = np.round(base * 2.4, 1)
        maps[1, 0, :3] = 1.0
        return maps, masks
    if kind == "float32_tied":  # float32(k / 100): above k / 100 in float64 for some k
        return (np.round(base * 100) / 100).astype(np.float32), masks
    if kind == "small":  # IterMask2's range [0, 0.0099]: k / 10000 ties
        return np.round(base * 0.012 * 10000) / 10000, masks
    if kind == "empty":
        return base, np.zeros_like(masks)
    raise ValueError(kind)


PEER_KINDS = ("random", "tied", "negative", "above_one", "float32_tied", "small", "empty")


# --------------------------------------------------------------------------- peer grids


def test_peer_grid_definitions_match_the_peers():
    for name, ref in PEERS.items():
        grid = PEER_GRIDS[name]
        np.testing.assert_array_equal(grid.values, np.asarray(ref.thresholds))
        assert (grid.strict, grid.eps, grid.tie == "lowest", grid.saturate_at, grid.compare_in_map_dtype) == (
            ref.strict, ref.eps, ref.lowest, ref.saturate, ref.float32_compare
        ), name
        np.testing.assert_array_equal(GRIDS[name], grid.values)
    assert GRIDS["itermask2"].size == 100 and GRIDS["itermask2"][-1] == 0.0099  # IterMask2's loop: range(100)
    assert GRIDS["itermask2_fine"].size == 10001 and GRIDS["thor"].size == 101 and GRIDS["madad"].size == 201
    assert {PEER_GRIDS[k].empty_gt for k in ("thor", "itermask2", "madad")} == {"zero", "nan_if_empty_pred", "one_if_empty_pred"}
    for grid in PEER_GRIDS.values():
        assert grid.source and "/" in grid.source  # repo and file named
        assert grid.describe()["n_thresholds"] == grid.values.size


@pytest.mark.parametrize("name", ["thor", "itermask2", "madad"])
@pytest.mark.parametrize("kind", PEER_KINDS)
def test_global_peer_grids_match_brute_force(name, kind):
    ref = PEERS[name]
    for seed in range(3):
        maps, masks = peer_case(kind, seed)
        ts, ds = ref_global_curve(maps, masks, ref)
        thresholds, curve = metrics._global_curve(maps, masks != 0, PEER_GRIDS[name])
        np.testing.assert_array_equal(thresholds, ts)
        np.testing.assert_allclose(curve, ds, rtol=0, atol=TOL)
        dice, thr = global_max_dice(maps, masks, mode="grid", grid=name)
        ref_d, ref_t = ref_global(maps, masks, ref=ref)
        assert abs(dice - ref_d) <= TOL and thr == ref_t, (kind, seed)
        assert abs(dice_at_threshold(maps, masks, thr, rule=name) - dice) <= TOL


@pytest.mark.parametrize("name", ["thor", "itermask2", "madad"])
@pytest.mark.parametrize("kind", PEER_KINDS)
@pytest.mark.parametrize("empty_gt", ["one_if_empty_pred", "zero"])
def test_per_image_peer_grids_match_brute_force(name, kind, empty_gt):
    ref = PEERS[name]
    for seed in range(2):
        maps, masks = peer_case(kind, 10 + seed)
        if kind == "empty" and empty_gt == "exclude":
            continue
        ref_d, ref_t, means = ref_per_image(maps, masks, empty_gt=empty_gt, ref=ref)
        _, steps = metrics._per_image_steps(maps.reshape(4, -1), (masks != 0).reshape(4, -1), PEER_GRIDS[name], empty_gt)
        np.testing.assert_allclose(np.cumsum(steps) / 4, means, rtol=0, atol=TOL)
        dice, thr = per_image_max_dice(maps, masks, mode="grid", grid=name, empty_gt=empty_gt)
        assert abs(dice - ref_d) <= TOL and thr == ref_t, (kind, seed)
        at = per_image_dice(maps, masks, thr, empty_gt, rule=name)
        assert abs(at.mean() - dice) <= TOL


@pytest.mark.parametrize("name", ["thor", "madad", "itermask2"])
def test_per_image_peer_grids_exclude_rule(name):
    maps, masks = peer_case("tied", 21)
    ref_d, ref_t, _ = ref_per_image(maps, masks, empty_gt="exclude", ref=PEERS[name])
    assert per_image_max_dice(maps, masks, mode="grid", grid=name, empty_gt="exclude") == pytest.approx((ref_d, ref_t), abs=TOL)
    assert per_image_max_dice(maps, masks, mode="grid", grid=name, empty_gt="exclude").threshold == ref_t


def test_itermask2_fine_grid_matches_brute_force():
    ref = PEERS["itermask2_fine"]
    maps, masks = peer_case("tied", 5, n=3, size=4)
    assert global_max_dice(maps, masks, mode="grid", grid="itermask2_fine") == pytest.approx(ref_global(maps, masks, ref=ref), abs=TOL)
    assert global_max_dice(maps, masks, mode="grid", grid="itermask2_fine").threshold == ref_global(maps, masks, ref=ref)[1]
    d, t = per_image_max_dice(maps, masks, mode="grid", grid="itermask2_fine")
    ref_d, ref_t, _ = ref_per_image(maps, masks, ref=ref)
    assert abs(d - ref_d) <= TOL and t == ref_t


def test_peer_rules_by_hand():
    """Small cases whose answer follows from the rules alone."""
    maps = np.array([[0.5, 0.5, 0.2, 0.0]])
    masks = np.array([[1, 1, 0, 0]])
    # THOR: 0.5 > t for t < 0.5; the lowest t that drops 0.2 is 0.2 itself (strict)
    assert global_max_dice(maps, masks, mode="grid", grid="thor") == (4 / (4 + 1e-6), 0.2)
    assert global_max_dice(maps, masks) == (1.0, 0.5)  # ours: map >= 0.5
    # a score of exactly 1 is predicted at t = 1 by THOR / MAD-AD, not by IterMask2's rule
    ones = np.array([[1.0, 1.0, 0.2]])
    lesion = np.array([[1, 1, 0]])
    thor = dict(zip(GRIDS["thor"], metrics._global_curve(ones, lesion != 0, PEER_GRIDS["thor"])[1]))
    assert thor[1.0] == pytest.approx(1.0, abs=1e-6)
    plain = PeerGrid("plain", tuple(GRIDS["thor"].tolist()), strict=True, eps=1e-6, tie="lowest")
    assert dict(zip(GRIDS["thor"], metrics._global_curve(ones, lesion != 0, plain)[1]))[1.0] == 0.0
    # float32 maps meet float32 thresholds: float32(0.05) > 0.05, so it is not > float32(0.05)
    f32 = np.array([[np.float32(0.05), 0.0]], dtype=np.float32)
    assert dice_at_threshold(f32, np.array([[1, 0]]), 0.05, rule="thor") == 0.0
    assert dice_at_threshold(f32.astype(np.float64), np.array([[1, 0]]), 0.05, rule="thor") == pytest.approx(1.0, abs=1e-6)
    # IterMask2's grid stops at 0.0099: a map in [0, 1] is thresholded at most at 0.0099
    wide = np.array([[[0.9, 0.005, 0.0]], [[0.8, 0.0, 0.0]]])
    both = np.array([[[1, 0, 0]], [[1, 0, 0]]])
    assert per_image_max_dice(wide, both, mode="grid", grid="itermask2") == (1.0, 0.005)


# --------------------------------------------------------------------------- exact is an upper bound


def test_exact_is_an_upper_bound_of_every_grid():
    kinds = ("random", "tied", "empty", "negative", "above_one", "float32_tied", "small")
    for seed in range(4):
        for kind in kinds:
            maps, masks = peer_case(kind, 100 + seed)
            exact = global_max_dice(maps, masks)
            for name in PEER_GRIDS:
                assert exact.dice >= global_max_dice(maps, masks, mode="grid", grid=name).dice - TOL, (kind, name)
            for empty_gt in EMPTY_GT:
                if empty_gt == "exclude" and kind == "empty":
                    continue
                exact = per_image_max_dice(maps, masks, empty_gt=empty_gt)
                ref_d, ref_t, _ = ref_per_image(maps, masks, empty_gt=empty_gt)
                assert abs(exact.dice - ref_d) <= TOL and exact.threshold == ref_t
                for name in PEER_GRIDS:
                    grid = per_image_max_dice(maps, masks, mode="grid", grid=name, empty_gt=empty_gt)
                    assert exact.dice >= grid.dice - TOL, (kind, name, empty_gt)


def test_exact_predicts_nothing_when_that_is_best():
    rng = np.random.default_rng(14)
    maps = rng.random((3, 4, 4))
    zeros = np.zeros((3, 4, 4))
    d, t = per_image_max_dice(maps, zeros)
    assert d == 1.0 and t == np.nextafter(maps.max(), np.inf)  # every image: empty GT, empty prediction
    assert per_image_max_dice(maps, zeros, mode="grid", grid="thor").dice == 1.0
    assert per_image_dice(maps, zeros, t).tolist() == [1.0, 1.0, 1.0]
    # global: Dice 0 everywhere; the highest candidate (the empty prediction) is reported
    assert global_max_dice(maps, zeros) == (0.0, float(np.nextafter(maps.max(), np.inf)))


# --------------------------------------------------------------------------- global Max Dice (exact)


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
    # all-zero masks: Dice 0, threshold = the "predict nothing" candidate (highest, tie rule)
    assert global_max_dice(maps, zeros) == (0.0, float(np.nextafter(maps.max(), np.inf)))
    assert global_max_dice(maps, zeros, mode="grid", grid="thor") == (0.0, 0.0)  # THOR: 0, first threshold
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


def test_custom_grid_uses_our_rule():
    rng = np.random.default_rng(3)
    maps, masks = random_case(rng, n=3, size=10)
    maps = np.clip(maps * 0.6 + 0.4 * masks, 0, 1)
    grid = [0.9, 0.1, 0.5, 0.5, 0.25]
    dice, thr = global_max_dice(maps, masks, mode="grid", grid=grid)
    ref = ref_global(maps, masks, grid=grid)
    assert abs(dice - ref[0]) <= TOL and thr == ref[1]
    assert dice <= global_max_dice(maps, masks).dice + TOL  # exact is an upper bound
    assert metrics.peer_grid(grid).strict is False and metrics.peer_grid(grid).tie == "highest"
    with pytest.raises(ValueError, match="increasing"):
        PeerGrid("bad", (0.5, 0.1))
    with pytest.raises(ValueError, match="tie"):
        PeerGrid("bad", (0.1,), tie="middle")


def test_grid_definitions_and_mode_errors():
    assert GRIDS["thor"].size == 101 and GRIDS["thor"][1] == pytest.approx(0.01)
    assert GRIDS["itermask2"].size == 100 and GRIDS["itermask2"][1] == 1e-4
    assert GRIDS["madad"].size == 201
    np.testing.assert_array_equal(resolve_grid("THOR"), GRIDS["thor"])
    assert EXACT_RULE.strict is False and EXACT_RULE.tie == "highest"
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


# --------------------------------------------------------------------------- per-image Max Dice (exact)


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


def test_per_image_custom_grid_matches_brute_force():
    rng = np.random.default_rng(7)
    maps, masks = random_case(rng, n=4, size=6)
    masks[1] = 0
    maps = np.clip(0.7 * maps + 0.3 * masks, 0, 1)
    grid = np.array([0.05, 0.5, 0.3, 0.3, 2.0])
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
    np.testing.assert_array_equal(thresholds, exact_candidates(maps))
    np.testing.assert_allclose(np.cumsum(steps) / 6, ref_means, rtol=0, atol=TOL)
    grid = np.array([0.0, 0.2, 0.5, 0.55, 1.0])
    _, grid_steps = metrics._per_image_steps(scores, truth, metrics.peer_grid(grid), "zero")
    _, _, ref_grid = ref_per_image(maps, masks, grid=grid, empty_gt="zero")
    np.testing.assert_allclose(np.cumsum(grid_steps) / 6, ref_grid, rtol=0, atol=TOL)


def test_per_image_chunks_agree(monkeypatch):
    rng = np.random.default_rng(12)
    maps, masks = random_case(rng, n=7, size=8, levels=30)
    maps = maps + 0.3 * masks
    whole = per_image_max_dice(maps, masks)
    whole_grid = per_image_max_dice(maps, masks, mode="grid", grid="madad")
    monkeypatch.setattr(metrics, "_CHUNK_PIXELS", 100)  # one image per chunk
    assert per_image_max_dice(maps, masks) == whole
    assert per_image_max_dice(maps, masks, mode="grid", grid="madad") == whole_grid
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
    # constant maps with mixed GT: predicting nothing (0 + 1) / 2 beats predicting all (0.2 + 0) / 2
    masks = np.zeros((2, 3, 3))
    masks[0, 0, 0] = 1
    d, t = per_image_max_dice(np.full((2, 3, 3), 0.5), masks)
    assert t == np.nextafter(0.5, 1) and d == 0.5
    d, t = per_image_max_dice(np.full((2, 3, 3), 0.5), masks, empty_gt="zero")
    assert t == 0.5 and d == pytest.approx((2 / 10 + 0.0) / 2, abs=TOL)


def test_per_image_dice_values():
    maps = np.array([[[0.9, 0.1], [0.1, 0.1]], [[0.1, 0.1], [0.1, 0.1]], [[0.8, 0.8], [0.1, 0.1]]])
    masks = np.array([[[1, 0], [0, 0]], [[0, 0], [0, 0]], [[1, 0], [0, 0]]])
    np.testing.assert_allclose(per_image_dice(maps, masks, 0.5), [1.0, 1.0, 2 / 3])
    np.testing.assert_allclose(per_image_dice(maps, masks, 0.5, empty_gt="zero"), [1.0, 0.0, 2 / 3])
    out = per_image_dice(maps, masks, 0.5, empty_gt="exclude")
    assert np.isnan(out[1]) and dice_at_threshold(maps, masks, 0.5, True, "exclude") == pytest.approx(5 / 6)
    assert dice_at_threshold(maps, masks, 0.5) == pytest.approx(2 * 2 / (3 + 2))
    assert dice_at_threshold(maps, np.zeros_like(masks), 0.95) == 0.0
    # peer rules: map > t and eps; at t = 0.8 the 0.8 pixels drop out under THOR's rule
    np.testing.assert_allclose(per_image_dice(maps, masks, 0.8, rule="thor"), [2 / (2 + 1e-6), 1.0, 0.0])
    np.testing.assert_allclose(per_image_dice(maps, masks, 0.8), [1.0, 1.0, 2 / 3])


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
