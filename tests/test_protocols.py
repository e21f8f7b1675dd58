"""S1 / S2 protocol objects: lookup, parameters, data checks, selection and evaluation.

Evaluation results are compared with direct brute-force references: a loop over every
distinct threshold and one above the maximum, Dice computed from ``map >= t`` (our exact
rule), and IterMask2's and THOR's evaluation procedures written from their definitions
(min-max over the test set, brain mask, ``map > k / 10000`` for k < 100, first maximum,
buckets at the global threshold; THOR: ``map > t`` on linspace(0, 1, 101), epsilon 1e-6).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from datasets.format import SliceSet
from protocols import PROTOCOLS, EvaluationResult, Protocol, ProtocolDataError, get_protocol, list_protocols
from protocols.metrics import TIE_TOL, threshold_from_healthy

TOL = 1e-12


# --------------------------------------------------------------------------- helpers


def make_set(test_areas, size=32, n_train=2, n_val=2, modalities=("T1",), seed=0) -> SliceSet:
    """Healthy train/val slices and test slices with lesions of exactly the given areas."""
    n_test = len(test_areas)
    n = n_train + n_val + n_test
    lesions = np.zeros((n, size, size), np.uint8)
    for k, area in enumerate(test_areas):
        flat = lesions[n_train + n_val + k].reshape(-1)
        start = size + (k * 7) % max(1, size * (size - 2) - area)  # inside rows 1..size-2
        flat[start : start + area] = 1
    brain = np.zeros((n, size, size), np.uint8)
    brain[:, 1:-1, :] = 1  # every lesion lies inside the brain
    rng = np.random.default_rng(seed)
    images = rng.random((n, len(modalities), size, size)).astype(np.float32)
    table = pd.DataFrame(
        {
            "subject_id": [f"sub{i}" for i in range(n)],
            "slice_index": np.arange(n),
            "split": ["train"] * n_train + ["val"] * n_val + ["test"] * n_test,
            "lesion_area": lesions.reshape(n, -1).sum(1),
        }
    )
    return SliceSet(images, lesions, brain, table, list(modalities), manifest={"name": "synthetic"})


def lesion_maps(masks: np.ndarray, seed=1, levels=None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    maps = 0.6 * rng.random(masks.shape) + 0.5 * masks * rng.random(masks.shape)
    if levels:
        maps = np.round(maps * levels) / levels
    return maps


def dice(pred, truth):
    denom = pred.sum() + truth.sum()
    return 0.0 if denom == 0 else 2.0 * (pred & truth).sum() / denom


def image_dice(pred, truth):
    if truth.sum() == 0:
        return 1.0 if pred.sum() == 0 else 0.0
    return dice(pred, truth)


def exact_thresholds(maps):
    values = np.unique(maps)
    return np.append(values, np.nextafter(values[-1], np.inf))  # and "predict nothing"


def ref_global(maps, masks):
    best = (-1.0, None)
    for t in exact_thresholds(maps):
        d = dice(maps >= t, masks > 0)
        if d >= best[0]:
            best = (d, float(t))
    return best


def ref_thor(maps, masks):
    """THOR's evaluator: pooled 2tp / (P + G + 1e-6) for map > t, t in linspace(0, 1, 101), first maximum."""
    best = (-1.0, None)
    for t in np.linspace(0, 1, 101):
        pred, truth = maps > t, masks > 0
        d = 2.0 * (pred & truth).sum() / (pred.sum() + truth.sum() + 1e-6)
        if d > best[0]:
            best = (d, float(t))
    return best


def ref_mean_dice(maps, masks, t):
    return float(np.mean([image_dice(maps[i] >= t, masks[i] > 0) for i in range(len(maps))]))


def ref_per_image(maps, masks, thresholds=None):
    ts = exact_thresholds(maps) if thresholds is None else np.unique(thresholds)
    means = [ref_mean_dice(maps, masks, t) for t in ts]
    top = max(means)
    k = max(i for i, v in enumerate(means) if v >= top - TIE_TOL)
    return means[k], float(ts[k])


def ref_itermask2(maps, masks, brain):
    """IterMask2's test.py: min-max over the test set, x brain, map > k / 10000 (k < 100), first max, buckets at it."""
    m = (maps - maps.min()) / (maps.max() - maps.min()) * (brain > 0)
    areas = (masks > 0).reshape(len(masks), -1).sum(1)
    means = []
    for k in range(100):
        per = [image_dice(m[i] > k / 10000, masks[i] > 0) for i in range(len(m))]
        means.append(np.mean(per))
    best = int(np.argmax(means))
    t = best / 10000
    per = np.array([image_dice(m[i] > t, masks[i] > 0) for i in range(len(m))])
    buckets = {"small": areas < 200, "medium": (areas >= 200) & (areas < 800), "large": areas >= 800}
    return means[best], t, {k: float(per[v].mean()) if v.any() else np.nan for k, v in buckets.items()}


# --------------------------------------------------------------------------- lookup and parameters


def test_get_protocol_lookup():
    assert list_protocols() == ["S1", "S2"] and set(PROTOCOLS) == {"S1", "S2"}
    assert get_protocol("s1").name == "S1" and get_protocol(" S2 ").name == "S2"
    assert isinstance(get_protocol("S1"), Protocol)
    with pytest.raises(ValueError, match="S1, S2"):
        get_protocol("S3")
    p = get_protocol("S2", mode="grid", grid="itermask2", apply_brain_mask=True, empty_gt="zero")
    assert (p.mode, p.grid, p.apply_brain_mask, p.empty_gt) == ("grid", "itermask2", True, "zero")
    with pytest.raises(ValueError):
        get_protocol("S1", mode="grid")
    with pytest.raises(ValueError):
        get_protocol("S1", mode="grid", grid="nope")
    with pytest.raises(ValueError):
        get_protocol("S2", empty_gt="sometimes")
    with pytest.raises(TypeError):
        get_protocol("S1", colour="red")
    assert get_protocol("S2").needs_val_maps and not get_protocol("S1").needs_val_maps


@pytest.mark.parametrize("name", ["S1", "S2"])
def test_parameters_state_everything(name):
    params = get_protocol(name).parameters()
    json.dumps(params)  # a record must be able to hold it
    for key in ("name", "metric", "mode", "grid", "resolution", "buckets", "empty_gt", "brain_mask",
                "apply_brain_mask", "slice_rule", "normalisation", "threshold_rule", "val_fpr",
                "map_normalisation", "empty_gt_peers", "lesion_rule", "bucket_threshold", "tie_rule", "grid_rule"):
        assert key in params, key
    assert params["name"] == name and params["mode"] == "exact" and params["grid"] is None
    assert "predict nothing" in params["threshold_rule"] and "highest" in params["tie_rule"]
    assert params["map_normalisation"] == "none" and set(params["empty_gt_peers"]) == {"THOR", "IterMask2", "MAD-AD code"}
    # defaults follow the code that defined each protocol: IterMask2 masks the maps with the brain, THOR does not
    assert params["apply_brain_mask"] is (name == "S2")
    assert params["resolution"] == [128, 128]
    expected = {"S1": {"small": "(3, 71]", "medium": "(71, 570]", "large": "(570, inf)"},
                "S2": {"small": "[0, 200)", "medium": "[200, 800)", "large": "[800, inf)"}}[name]
    assert params["buckets"] == expected
    grid = get_protocol(name, mode="grid", grid="thor").parameters()
    assert grid["mode"] == "grid" and grid["grid"] == "thor" and "101" in grid["grid_values"]
    assert "map > threshold" in grid["threshold_rule"] and "lowest" in grid["tie_rule"]
    assert grid["grid_rule"]["prediction"] == "map > t" and "THOR_DDPM" in grid["grid_rule"]["source"]
    im2 = get_protocol(name, mode="grid", grid="itermask2", map_normalisation="minmax_test_set").parameters()
    assert "100 thresholds from 0 to 0.0099" == im2["grid_values"] and "min" in im2["map_normalisation_rule"]
    assert get_protocol(name, mode="grid", grid=[0.5, 0.1]).parameters()["grid"] == [0.5, 0.1]
    with pytest.raises(ValueError, match="map_normalisation"):
        get_protocol(name, map_normalisation="zscore")
    if name == "S2":
        assert "dice_<bucket>_at_global" in params["bucket_metrics"]


# --------------------------------------------------------------------------- data checks


def test_modalities_and_check_data():
    four = make_set([50, 100], modalities=("T1", "T1CE", "T2", "FLAIR"))
    assert get_protocol("S1").modalities(four) == ["T1"]
    assert get_protocol("S2").modalities(four) == ["T1", "T1CE", "T2", "FLAIR"]
    two = make_set([50], modalities=("FLAIR", "T2"))
    assert get_protocol("S2").modalities(two) == ["T2", "FLAIR"]
    with pytest.raises(ProtocolDataError, match="T1"):
        get_protocol("S1").check_data(two)
    get_protocol("S2").check_data(two)
    with pytest.raises(ProtocolDataError, match="none of them"):
        get_protocol("S2").check_data(make_set([50], modalities=("PD",)))
    # no test lesions beyond the exclusion size
    with pytest.raises(ProtocolDataError, match="lesion"):
        get_protocol("S1").check_data(make_set([0, 3], size=128))
    with pytest.raises(ProtocolDataError, match="lesion"):
        get_protocol("S2").check_data(make_set([0, 0]))
    no_test = make_set([])
    with pytest.raises(ProtocolDataError, match="test"):
        get_protocol("S2").check_data(no_test)


def test_s1_select_test_excludes_tiny_lesions():
    data = make_set([0, 1, 3, 4, 71, 72, 600], size=128)
    test = data.split("test")
    selected = get_protocol("S1").select_test(test)
    assert selected.lesion_areas().tolist() == [4, 71, 72, 600]
    # at 64 x 64 the rule scales by area: <= 0.75 pixels excluded, so 1 pixel stays
    small = make_set([0, 1, 2, 30], size=64).split("test")
    assert get_protocol("S1").select_test(small).lesion_areas().tolist() == [1, 2, 30]
    assert get_protocol("S2").select_test(test) is test
    with pytest.raises(ProtocolDataError):
        get_protocol("S1").select_test(make_set([0, 2], size=128).split("test"))


# --------------------------------------------------------------------------- S1 evaluation


def test_s1_evaluate_matches_brute_force_per_bucket():
    data = make_set([2, 20, 60, 71, 72, 300, 571, 900], size=128)
    protocol = get_protocol("S1")
    full_test = data.split("test")
    test = protocol.select_test(full_test)
    masks = np.asarray(test.lesion_masks)
    maps = lesion_maps(masks, levels=50)
    result = protocol.evaluate(maps, test)
    assert isinstance(result, EvaluationResult)
    m = result.metrics
    ref = ref_global(maps, masks)
    assert abs(m["max_dice"] - ref[0]) <= TOL and m["threshold"] == ref[1]
    buckets = {"small": [0, 1, 2], "medium": [3, 4], "large": [5, 6]}
    for label, rows in buckets.items():
        ref_b = ref_global(maps[rows], masks[rows])
        assert m[f"n_{label}"] == len(rows)
        assert abs(m[f"max_dice_{label}"] - ref_b[0]) <= TOL and m[f"threshold_{label}"] == ref_b[1]
    from sklearn.metrics import average_precision_score, roc_auc_score

    assert abs(m["auroc"] - roc_auc_score(masks.ravel(), maps.ravel())) <= TOL
    assert abs(m["auprc"] - average_precision_score(masks.ravel(), maps.ravel())) <= TOL
    # per-image table: one row per evaluated image
    frame = result.per_image
    assert len(frame) == 7 and frame["bucket"].tolist() == ["small"] * 3 + ["medium"] * 2 + ["large"] * 2
    for col in ("index", "subject_id", "lesion_area", "bucket", "dice_at_best_threshold", "dice_at_bucket_threshold"):
        assert col in frame
    assert frame["lesion_area"].tolist() == [20, 60, 71, 72, 300, 571, 900]
    assert frame["dice_at_best_threshold"].iloc[0] == pytest.approx(dice(maps[0] >= m["threshold"], masks[0] > 0), abs=TOL)
    # the unselected test set gives the same numbers: evaluate applies the exclusion too
    full_maps = np.concatenate([lesion_maps(np.asarray(full_test.lesion_masks[:1]), seed=9), maps])
    again = protocol.evaluate(full_maps, full_test)
    np.testing.assert_equal(again.metrics, m)
    assert again.notes["n_excluded"] == 1
    assert again.per_image["index"].tolist() == list(range(1, 8))


def test_s1_empty_bucket_is_nan_and_grid_mode():
    data = make_set([100, 200, 300], size=128)
    test = data.split("test")
    maps = np.clip(lesion_maps(np.asarray(test.lesion_masks)), 0, 1)
    m = get_protocol("S1").evaluate(maps, test).metrics
    assert m["n_small"] == 0 and np.isnan(m["max_dice_small"]) and m["n_medium"] == 3
    result = get_protocol("S1", mode="grid", grid="thor").evaluate(maps, test)
    g = result.metrics
    masks = np.asarray(test.lesion_masks)
    assert (g["max_dice"], g["threshold"]) == pytest.approx(ref_thor(maps, masks), abs=TOL)
    assert g["threshold"] == ref_thor(maps, masks)[1] and g["max_dice"] <= m["max_dice"] + TOL
    assert (g["max_dice_medium"], g["threshold_medium"]) == pytest.approx(ref_thor(maps, masks), abs=TOL)  # all medium
    # per-image Dice at the reported threshold use THOR's rule (map > t, epsilon)
    t = g["threshold"]
    expected = [2.0 * ((maps[i] > t) & (masks[i] > 0)).sum() / ((maps[i] > t).sum() + (masks[i] > 0).sum() + 1e-6) for i in range(3)]
    np.testing.assert_allclose(result.per_image["dice_at_best_threshold"], expected, rtol=0, atol=TOL)


def test_s1_lesion_is_any_nonzero_pixel():
    data = make_set([10, 40, 100], size=128)
    test = data.split("test")
    masks = np.asarray(test.lesion_masks).astype(np.float32) * 0.25  # fractional mask values
    test = SliceSet(np.asarray(test.images), masks, test.brain_masks, test.table, test.modalities, manifest=test.manifest)
    maps = lesion_maps(masks > 0)
    m = get_protocol("S1").evaluate(maps, test).metrics
    assert m["n_images"] == 3 and m["n_small"] == 2
    assert (m["max_dice"], m["threshold"]) == pytest.approx(ref_global(maps, masks > 0), abs=TOL)


def test_s1_minmax_normalisation_uses_evaluated_images_only():
    data = make_set([0, 100, 200, 300], size=128)
    test = data.split("test")
    masks = np.asarray(test.lesion_masks)
    maps = lesion_maps(masks)
    maps[0] = 50.0  # the excluded image (no lesion) must not set the scale
    result = get_protocol("S1", mode="grid", grid="thor", map_normalisation="minmax_test_set").evaluate(maps, test)
    kept = maps[1:]
    assert result.notes["map_scale"] == [kept.min(), kept.max()]
    scaled = (kept - kept.min()) / (kept.max() - kept.min())
    assert (result.metrics["max_dice"], result.metrics["threshold"]) == pytest.approx(ref_thor(scaled, masks[1:]), abs=TOL)


# --------------------------------------------------------------------------- S2 evaluation


def test_s2_evaluate_matches_brute_force():
    data = make_set([0, 49, 50, 199, 200, 500, 800, 1200], size=64)  # scale 1/4: edges 50 and 200
    protocol = get_protocol("S2")
    test = protocol.select_test(data.split("test"))
    masks = np.asarray(test.lesion_masks)
    maps = lesion_maps(masks, levels=40)
    maps[:, 0, :] = 2.0  # outside the brain: the S2 default multiplies by the brain mask
    result = protocol.evaluate(maps, test)
    m = result.metrics
    inside = maps * np.asarray(test.brain_masks)
    ref = ref_per_image(inside, masks)
    assert abs(m["max_dice"] - ref[0]) <= TOL and m["threshold"] == ref[1]
    assert result.per_image["bucket"].tolist() == ["small"] * 2 + ["medium"] * 2 + ["large"] * 4
    assert result.notes["bucket_scale"] == 0.25
    for label, rows in {"small": [0, 1], "medium": [2, 3], "large": [4, 5, 6, 7]}.items():
        ref_b = ref_per_image(inside[rows], masks[rows])
        assert abs(m[f"max_dice_{label}"] - ref_b[0]) <= TOL and m[f"threshold_{label}"] == ref_b[1]
        at_global = np.mean([image_dice(inside[i] >= m["threshold"], masks[i] > 0) for i in rows])
        assert abs(m[f"dice_{label}_at_global"] - at_global) <= TOL
    assert "dice_at_val_threshold" not in m
    frame = result.per_image
    assert len(frame) == 8 and frame["dice_at_best_threshold"].mean() == pytest.approx(m["max_dice"], abs=TOL)
    assert frame["dice_at_best_threshold"].iloc[0] == (1.0 if inside[0].max() < m["threshold"] else 0.0)


def test_s2_val_threshold_uses_validation_maps_only():
    data = make_set([40, 120, 300], size=32)
    protocol = get_protocol("S2", val_fpr=0.02)
    test, val = data.split("test"), data.split("val")
    masks = np.asarray(test.lesion_masks)
    rng = np.random.default_rng(4)
    val_maps = 0.6 * rng.random(val.brain_masks.shape)
    val_maps[np.asarray(val.brain_masks) == 0] = 5.0  # outside the brain: must not count
    a = protocol.evaluate(lesion_maps(masks, seed=2), test, val_maps=val_maps, val_brain_masks=val.brain_masks)
    b = protocol.evaluate(lesion_maps(masks, seed=3), test, val_maps=val_maps, val_brain_masks=val.brain_masks)
    t = threshold_from_healthy(val_maps, val.brain_masks, fpr=0.02)
    assert a.metrics["val_threshold"] == b.metrics["val_threshold"] == t
    maps = lesion_maps(masks, seed=2)
    assert abs(a.metrics["dice_at_val_threshold"] - ref_mean_dice(maps * np.asarray(test.brain_masks), masks, t)) <= TOL
    assert a.per_image["dice_at_val_threshold"].mean() == pytest.approx(a.metrics["dice_at_val_threshold"], abs=TOL)
    assert a.notes["val_threshold_in_brain"] is True
    # without brain masks every validation pixel counts (and the notes say so)
    c = protocol.evaluate(maps, test, val_maps=val_maps)
    assert c.notes["val_threshold_in_brain"] is False
    assert c.metrics["val_threshold"] == threshold_from_healthy(val_maps, fpr=0.02) > 5.0


@pytest.mark.parametrize("seed", range(4))
def test_s2_reproduces_itermask2_evaluation(seed):
    """IterMask2's whole evaluation: min-max over the test set, brain mask, its 100 thresholds, buckets at the global one."""
    data = make_set([30, 150, 260, 700, 900, 1200], size=128, seed=seed)  # two images per bucket
    test = data.split("test")
    masks, brain = np.asarray(test.lesion_masks), np.asarray(test.brain_masks)
    rng = np.random.default_rng(seed)
    maps = (rng.random(masks.shape) ** 8 * 0.2 + masks * rng.random(masks.shape) * 0.01).astype(np.float32)
    maps[brain == 0] = rng.random(int((brain == 0).sum())) * 0.5  # sets the min-max scale, then masked out
    protocol = get_protocol("S2", mode="grid", grid="itermask2", map_normalisation="minmax_test_set")
    result = protocol.evaluate(maps, test)
    m = result.metrics
    ref_d, ref_t, ref_buckets = ref_itermask2(maps.astype(np.float64), masks, brain)
    assert abs(m["max_dice"] - ref_d) <= TOL and m["threshold"] == ref_t
    for label, value in ref_buckets.items():
        assert abs(m[f"dice_{label}_at_global"] - value) <= TOL, label
    assert result.notes["map_scale"] == [float(maps.min()), float(maps.max())]


def test_s2_grid_mode_and_torch_and_channel_axis():
    data = make_set([40, 120, 300], size=32)
    test = data.split("test")
    masks = np.asarray(test.lesion_masks)
    maps = (np.clip(lesion_maps(masks), 0, 1) * 0.01).astype(np.float32)
    protocol = get_protocol("S2", mode="grid", grid="itermask2", apply_brain_mask=False)
    m = protocol.evaluate(maps, test).metrics
    means = [np.mean([image_dice(maps[i] > k / 10000, masks[i] > 0) for i in range(3)]) for k in range(100)]
    assert abs(m["max_dice"] - max(means)) <= TOL and m["threshold"] == int(np.argmax(means)) / 10000
    np.testing.assert_equal(protocol.evaluate(torch.from_numpy(maps)[:, None], test).metrics, m)
    with pytest.raises(ValueError, match="shape"):
        protocol.evaluate(maps[:2], test)


def test_minmax_normalisation_scales_validation_maps_alike():
    data = make_set([40, 120, 300], size=32)
    test, val = data.split("test"), data.split("val")
    masks = np.asarray(test.lesion_masks)
    maps = 3.0 + 4.0 * lesion_maps(masks)
    val_maps = 3.0 + 4.0 * 0.6 * np.random.default_rng(5).random(val.brain_masks.shape)
    plain = get_protocol("S2", val_fpr=0.05).evaluate(maps, test, val_maps=val_maps, val_brain_masks=val.brain_masks)
    scaled = get_protocol("S2", val_fpr=0.05, map_normalisation="minmax_test_set").evaluate(
        maps, test, val_maps=val_maps, val_brain_masks=val.brain_masks
    )
    low, high = maps.min(), maps.max()
    assert scaled.notes["map_scale"] == [low, high] and plain.notes["map_scale"] is None
    assert scaled.metrics["val_threshold"] == threshold_from_healthy((val_maps - low) / (high - low), val.brain_masks, fpr=0.05)
    # an increasing affine map of positive in-brain scores changes no exact result but the thresholds
    for key in ("max_dice", "dice_at_val_threshold", "max_dice_large"):
        assert scaled.metrics[key] == pytest.approx(plain.metrics[key], abs=1e-9), key
    assert scaled.metrics["threshold"] == pytest.approx((plain.metrics["threshold"] - low) / (high - low), abs=1e-12)
    # a constant test set has no scale: every map becomes 0
    flat = get_protocol("S2", map_normalisation="minmax_test_set").evaluate(np.full(masks.shape, 2.0), test)
    assert flat.per_image["max_score"].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("name", ["S1", "S2"])
def test_brain_mask_application(name):
    data = make_set([40, 120, 300], size=32)
    test = data.split("test")
    masks, brain = np.asarray(test.lesion_masks), np.asarray(test.brain_masks)
    maps = lesion_maps(masks)
    maps[brain == 0] = 3.0  # loud outside the brain
    given = get_protocol(name, apply_brain_mask=False).evaluate(maps, test).metrics
    applied = get_protocol(name, apply_brain_mask=True).evaluate(maps, test).metrics
    np.testing.assert_equal(applied, get_protocol(name, apply_brain_mask=False).evaluate(maps * brain, test).metrics)
    np.testing.assert_equal(get_protocol(name).evaluate(maps, test).metrics, applied if name == "S2" else given)
    assert applied["auroc"] > given["auroc"]
    assert get_protocol(name, apply_brain_mask=True).parameters()["apply_brain_mask"] is True
