"""datasets.prepare on synthetic NIfTI trees in each release's layout (tests/nifti_trees.py)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

import nifti_trees as nt
from datasets.format import DatasetFormatError, load_slices
from datasets.prepare import (
    ATLASConfig,
    BraTSConfig,
    IXIConfig,
    PrepareError,
    prepare_atlas,
    prepare_brats21,
    prepare_ixi,
    prepare_s1,
)
from datasets.prepare.__main__ import main
from datasets.prepare.brats21 import DEFAULT_SPLIT_CSV
from datasets.prepare.common import area_matrix, pad_to_square, resize_area, size_bucket, to_display
from datasets.prepare.ixi import holdout

SMALL_S1 = dict(expected_shape=nt.SMALL_S1_SHAPE, resolution=48)  # 40 x 48 slice -> pad 48 -> identity resize
SPLITS = {
    "BraTS2021_00000": "train",
    "BraTS2021_00002": "train",
    "BraTS2021_00005": "val",
    "BraTS2021_00011": "test",
    "BraTS2021_00012": "test",
}


def brats(tmp_path: Path, splits: dict[str, str] = SPLITS, **kw):
    raw = tmp_path / "brats"
    nt.make_brats_tree(raw, splits)
    csv = nt.write_split(tmp_path / "split.csv", splits)
    cfg = BraTSConfig(resolution=48)
    run = lambda out="out", **more: prepare_brats21(raw, tmp_path / out, cfg, split_csv=csv, progress=False, **{**kw, **more})
    return raw, csv, run


# --------------------------------------------------------------------------- helpers


def test_area_resize_and_padding():
    m = area_matrix(4, 2)
    np.testing.assert_allclose(m, [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    np.testing.assert_allclose(area_matrix(233, 128).sum(axis=1), 1.0)
    np.testing.assert_allclose(area_matrix(7, 7), np.eye(7))
    np.testing.assert_allclose(resize_area(np.full((233, 233), 3.0), 128), 3.0, rtol=1e-6)
    sq = pad_to_square(np.ones((2, 4)))
    assert sq.shape == (4, 4) and sq.sum() == 8 and sq[0].sum() == 0 and sq[1].sum() == 4


def test_size_buckets():
    edges, names = (0, 3, 71, 570), ("none", "tiny", "small", "medium", "large")
    got = [size_bucket(a, edges, names, left_open=True) for a in (0, 3, 4, 71, 72, 570, 571)]
    assert got == ["none", "tiny", "small", "small", "medium", "medium", "large"]
    edges, names = (1, 200, 800), ("none", "small", "medium", "large")
    got = [size_bucket(a, edges, names, left_open=False) for a in (0, 199, 200, 799, 800)]
    assert got == ["none", "small", "medium", "medium", "large"]


def test_shipped_split_csv():
    table = pd.read_csv(DEFAULT_SPLIT_CSV, dtype=str)
    assert len(table) == 1251 and table["subject_id"].is_unique
    assert table["split"].value_counts().to_dict() == {"train": 990, "val": 128, "test": 133}
    assert table["subject_id"].str.fullmatch(r"BraTS2021_\d{5}").all()
    assert table["subject_id"].min() == "BraTS2021_00000" and table["subject_id"].max() == "BraTS2021_01666"


# --------------------------------------------------------------------------- S2 / BraTS


def test_brats_slices_split_and_normalisation(tmp_path):
    raw, csv, run = brats(tmp_path)
    outcome = run()
    s = load_slices(outcome.path)
    t = s.table
    assert s.modalities == ["T1", "T1CE", "T2", "FLAIR"] and s.images.shape[1:] == (4, 48, 48)
    # split by subject id from the CSV
    assert dict(t.groupby("subject_id")["split"].first()) == SPLITS
    # train/val: only tumour-free slices of 70..89 (the trees have tumour in 70..79)
    for sid in ("BraTS2021_00000", "BraTS2021_00002", "BraTS2021_00005"):
        assert t[t.subject_id == sid].slice_index.tolist() == list(range(80, 90))
    assert (t[t.split != "test"].lesion_area == 0).all()
    # test: one slice per subject, the largest in-range tumour (83), not the bigger one at 50
    test = t[t.split == "test"]
    assert test.slice_index.tolist() == [83, 83] and (test.lesion_area == 140).all()
    assert (test.size_bucket == "small").all() and (t[t.split != "test"].size_bucket == "none").all()
    # normalisation: value / brain p90 per modality, background 0 (identity resize at 48)
    sid, row = "BraTS2021_00011", int(test.index[0])
    vols = {m: nib.load(str(raw / nt.brats_dir(raw, sid).relative_to(raw) / f"{sid}_{suf}.nii.gz")).get_fdata(dtype=np.float32) for m, suf in nt.BRATS_FILES.items()}
    brain = np.any([v != 0 for v in vols.values()], axis=0)
    codes = ("L", "P", "S")
    for c, m in enumerate(s.modalities):
        p90 = np.percentile(vols[m][brain], 90)
        assert t.loc[row, f"p90_{m}"] == pytest.approx(p90, rel=1e-5)
        expected = np.where(brain[:, :, 83], vols[m][:, :, 83] / p90, 0.0)
        np.testing.assert_allclose(s.images[row, c], to_display(expected, codes), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(s.brain_masks[row], to_display(brain[:, :, 83].astype(np.uint8), codes))
    assert (np.asarray(s.images)[:, :, :][np.broadcast_to(s.brain_masks[:, None] == 0, s.images.shape)] == 0).all()
    m = s.manifest
    assert m["protocol"] == "S2" and m["protocols"] == ["S2"] and m["source"] == "brats21"
    assert m["preprocessing"]["slice_start"] == 70 and m["preprocessing"]["scale_percentile"] == 90.0
    assert m["split_rule"]["subjects_per_split"] == {"train": 2, "val": 1, "test": 2}
    assert re.fullmatch(r"[0-9a-f]{16}", m["fingerprint"]) and s.fingerprint()


def test_brats_cli_default_resolution_parallel_and_deterministic(tmp_path, capsys):
    raw, csv, run = brats(tmp_path)
    args = ["brats21", "--raw", str(raw), "--split-csv", str(csv), "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "a"), "--workers", "2"]) == 0
    assert "subjects/s" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "b"), "--workers", "1"]) == 0
    a, b = load_slices(tmp_path / "a"), load_slices(tmp_path / "b")
    assert a.images.shape == (32, 4, 128, 128)
    assert a.manifest["fingerprint"] == b.manifest["fingerprint"]
    np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))
    test = a.table[a.table.split == "test"]
    assert test.slice_index.tolist() == [83, 83] and (test.size_bucket == "large").all()  # 140 px at 48^2 ~ 1000 at 128^2
    # refuses to overwrite without --overwrite
    assert main([*args, "--out", str(tmp_path / "a")]) == 1
    assert "already exists" in capsys.readouterr().err


def test_brats_slice_range_parameter(tmp_path):
    raw, csv, _ = brats(tmp_path)
    cfg = BraTSConfig(resolution=48, slice_start=60, slice_stop=75)
    s = load_slices(prepare_brats21(raw, tmp_path / "o", cfg, split_csv=csv, progress=False).path)
    assert s.table[s.table.subject_id == "BraTS2021_00000"].slice_index.tolist() == list(range(60, 70))
    assert s.table[s.table.split == "test"].slice_index.tolist() == [74, 74]  # largest within 60..74


def test_brats_excluded_by_rule_and_not_in_split(tmp_path):
    splits = dict(SPLITS)
    raw, csv, run = brats(tmp_path, splits)
    nt.make_brats_tree(raw, {"BraTS2021_00099": "train"})  # present, but not in the CSV
    seg = nt.brats_dir(raw, "BraTS2021_00012") / "BraTS2021_00012_seg.nii.gz"
    nt.rewrite(seg, lambda d: np.where(np.arange(d.shape[2]) < 70, d, 0).astype(np.uint8))  # no tumour in 70..89
    outcome = run(strict=True)  # exclusions are protocol rules, not bad input
    assert "BraTS2021_00012" in outcome.summary.excluded and "BraTS2021_00099" in outcome.summary.excluded
    assert set(load_slices(outcome.path).table.subject_id) == set(SPLITS) - {"BraTS2021_00012"}


BAD = "BraTS2021_00011"
SHIFTED = nt.BRATS_AFFINE.copy()
SHIFTED[0, 3] = 5.0  # same grid, moved 5 mm


PAIR = {"BraTS2021_00000": "train", BAD: "test"}  # one good, one to corrupt


def _bad(raw: Path, suffix: str) -> Path:
    return nt.brats_dir(raw, BAD) / f"{BAD}_{suffix}.nii.gz"


CORRUPTIONS = {
    "truncated": ("t1ce", lambda p: nt.truncate(p), "cannot be read"),
    "missing modality": ("flair", lambda p: p.unlink(), "modality FLAIR missing"),
    "missing mask": ("seg", lambda p: p.unlink(), "segmentation missing"),
    "shape mismatch": ("t2", lambda p: nt.rewrite(p, lambda d: d[:-2]), "shape"),
    "affine mismatch": ("t1", lambda p: nt.rewrite(p, lambda d: d, affine=SHIFTED), "affine"),
    "nan": ("flair", lambda p: nt.rewrite(p, lambda d: np.where(np.arange(d.size).reshape(d.shape) == 7, np.nan, d).astype(np.float32)), "NaN/inf"),
    "inf": ("t1", lambda p: nt.rewrite(p, lambda d: np.where(np.arange(d.size).reshape(d.shape) == 7, np.inf, d).astype(np.float32)), "NaN/inf"),
    "label set": ("seg", lambda p: nt.rewrite(p, lambda d: np.where(d == 2, 3, d).astype(np.uint8)), "label value(s) [3]"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_brats_bad_input_is_skipped_and_named(tmp_path, kind):
    suffix, corrupt, words = CORRUPTIONS[kind]
    raw, csv, run = brats(tmp_path, PAIR)
    corrupt(_bad(raw, suffix))
    outcome = run()
    reason = outcome.summary.skipped[BAD]
    assert f"{BAD}_{suffix}.nii.gz" in reason and words in reason, reason
    assert BAD not in set(load_slices(outcome.path).table.subject_id)
    with pytest.raises(PrepareError, match=re.escape(f"{BAD}_{suffix}.nii.gz")):
        run("strict", strict=True)
    assert not (tmp_path / "strict").exists()


def test_brats_empty_brain(tmp_path):
    raw, csv, run = brats(tmp_path, PAIR)
    for suf in nt.BRATS_FILES.values():
        nt.rewrite(_bad(raw, suf), np.zeros_like)
    reason = run().summary.skipped[BAD]
    assert "empty brain" in reason and f"{BAD}_t1.nii.gz" in reason


def test_brats_duplicate_subject(tmp_path):
    raw, csv, run = brats(tmp_path, PAIR)
    nt.duplicate_folder(nt.brats_dir(raw, BAD), raw)
    with pytest.raises(PrepareError, match=f"duplicate.*{BAD}.*{BAD}"):
        run()


def test_brats_split_csv_names_missing_subject(tmp_path):
    raw, csv, run = brats(tmp_path, PAIR)
    nt.write_split(csv, {**PAIR, "BraTS2021_01666": "test"})
    with pytest.raises(PrepareError, match=r"split\.csv.*BraTS2021_01666.*missing"):
        run()
    outcome = run(allow_missing=True)
    assert "split.csv" in outcome.summary.skipped["BraTS2021_01666"]
    with pytest.raises(PrepareError, match="strict.*BraTS2021_01666"):
        run("o2", allow_missing=True, strict=True)


def test_brats_bad_split_csv(tmp_path):
    raw, csv, run = brats(tmp_path, PAIR)
    csv.write_text("subject_id,split\nBraTS2021_00000,train\nBraTS2021_00000,test\n")
    with pytest.raises(PrepareError, match=r"split\.csv: duplicate subject id"):
        run()
    csv.write_text("subject_id,split\nBraTS2021_00000,training\n")
    with pytest.raises(PrepareError, match=r"split\.csv: unknown split"):
        run()


def test_cli_strict_exit_code(tmp_path, capsys):
    raw, csv, _ = brats(tmp_path, PAIR)
    nt.truncate(_bad(raw, "t2"))
    args = ["brats21", "--raw", str(raw), "--split-csv", str(csv), "--resolution", "48", "--workers", "1", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "s"), "--strict"]) == 1
    err = capsys.readouterr().err
    assert "--strict" in err and f"{BAD}_t2.nii.gz" in err and not (tmp_path / "s").exists()
    assert main([*args, "--out", str(tmp_path / "ok")]) == 0
    err = capsys.readouterr().err
    assert f"skipped  {BAD}" in err and f"{BAD}_t2.nii.gz" in err


# --------------------------------------------------------------------------- atomic output


def _leftovers(parent: Path) -> list[str]:
    return [n for n in os.listdir(parent) if n.startswith(".")]


def test_interrupted_write_leaves_no_set(tmp_path, monkeypatch):
    raw, csv, run = brats(tmp_path, PAIR)
    import datasets.format as fmt

    real_save, calls = fmt.np.save, []

    def flaky_save(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        return real_save(*a, **k)

    monkeypatch.setattr(fmt.np, "save", flaky_save)
    with pytest.raises(KeyboardInterrupt):
        run()
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    with pytest.raises(DatasetFormatError):
        load_slices(tmp_path / "out")


def test_interrupted_processing_leaves_no_set(tmp_path, monkeypatch):
    raw, csv, run = brats(tmp_path)
    import datasets.prepare.brats21 as b

    real, seen = b.process_subject, []

    def dying(*args):
        seen.append(args[1])
        if len(seen) == 3:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args)

    monkeypatch.setattr(b, "process_subject", dying)
    with pytest.raises(KeyboardInterrupt):
        run()
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


# --------------------------------------------------------------------------- S1 / IXI + ATLAS


def test_s1_combined_set(tmp_path):
    nt.make_ixi_tree(tmp_path / "ixi", n=5)
    atlas = nt.make_atlas_tree(tmp_path / "atlas")
    outcome = prepare_s1(
        tmp_path / "ixi", tmp_path / "atlas", tmp_path / "s1",
        ixi_config=IXIConfig(**SMALL_S1), atlas_config=ATLASConfig(**SMALL_S1), progress=False,
    )
    s = load_slices(outcome.path)
    t = s.table
    m = s.manifest
    assert m["protocol"] == "S1" and m["protocols"] == ["S1"] and m["modalities"] == ["T1"]
    assert m["sources"] == {"train": "ixi", "val": "ixi", "test": "atlas"}
    assert set(m["parts"]) == {"ixi", "atlas"} and m["parts"]["ixi"]["fingerprint"]
    assert (t.slice_index == 95).all() and s.images.shape == (10, 1, 48, 48)
    # IXI: seeded subject holdout (10% of 5 -> 1 val subject), recorded in the manifest
    ixi = t[t.source == "ixi"]
    val = m["parts"]["ixi"]["split_rule"]["val_subjects"]
    assert ixi[ixi.split == "val"].subject_id.tolist() == val and len(val) == 1
    assert sorted(val) == sorted(holdout(ixi.subject_id.tolist(), 0.1, 0))
    # ATLAS: slice 95 holds lesions of exactly these areas -> one per bucket
    test = t[t.split == "test"]
    assert test.lesion_area.tolist() == [0, 2, 30, 200, 700]
    assert test.size_bucket.value_counts().to_dict() == {"none": 1, "tiny": 1, "small": 1, "medium": 1, "large": 1}
    # percentile normalisation: brain p1..p99 of the volume -> [0, 1], background 0
    sid = "sub-r001s004"
    vol = nib.load(str(atlas[sid][0])).get_fdata(dtype=np.float32)
    brain = vol > 0
    lo, hi = np.percentile(vol[brain], [1, 99])
    row = int(t.index[t.subject_id == sid][0])
    assert t.loc[row, "norm_low"] == pytest.approx(lo, rel=1e-5) and t.loc[row, "norm_high"] == pytest.approx(hi, rel=1e-5)
    expected = np.where(brain[:, :, 95], np.clip((vol[:, :, 95] - lo) / (hi - lo), 0, 1), 0)
    np.testing.assert_allclose(s.images[row, 0], pad_to_square(to_display(expected, "RAS")), atol=1e-5)
    assert s.images.min() >= 0 and s.images.max() <= 1
    # reusing prepared parts gives the same set
    prepare_ixi(tmp_path / "ixi", tmp_path / "pi", IXIConfig(**SMALL_S1), progress=False)
    prepare_atlas(tmp_path / "atlas", tmp_path / "pa", ATLASConfig(**SMALL_S1), progress=False)
    again = prepare_s1(tmp_path / "pi", tmp_path / "pa", tmp_path / "s1b", progress=False)
    assert load_slices(again.path).manifest["fingerprint"] == m["fingerprint"]
    # parts prepared with different S1 parameters are refused
    prepare_atlas(tmp_path / "atlas", tmp_path / "pa2", ATLASConfig(**{**SMALL_S1, "percentile_high": 98.0}), progress=False)
    with pytest.raises(PrepareError, match="percentile_high"):
        prepare_s1(tmp_path / "pi", tmp_path / "pa2", tmp_path / "s1c", progress=False)


def test_s1_default_grid_cli(tmp_path, capsys):
    """The real rule: 197 x 233 x 189 MNI grid, axial slice 95, 128 x 128."""
    shape = (197, 233, 189)
    brain = nt.ellipsoid(shape, (0.8, 0.8, 0.8))
    vol = np.where(brain, 100 + np.arange(shape[0])[:, None, None] // 20, 0).astype(np.int16)  # not constant
    nt.write_nifti(tmp_path / "ixi" / "IXI002-Guys-0828-T1.nii.gz", vol)
    nt.write_nifti(tmp_path / "ixi" / "IXI012-HH-1211-T1.nii.gz", vol)
    t1, mask = nt.atlas_paths(tmp_path / "atlas", "sub-r009s001", cohort="R009")
    lesion = np.zeros(shape, np.uint8)
    lesion[90:110, 100:130, 95] = 1  # 600 voxels, only in slice 95
    nt.write_nifti(t1, vol)
    nt.write_nifti(mask, lesion)
    out = tmp_path / "s1"
    assert main(["s1", "--ixi", str(tmp_path / "ixi"), "--atlas", str(tmp_path / "atlas"), "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    s = load_slices(out)
    assert s.images.shape == (3, 1, 128, 128) and sorted(s.table.split) == ["test", "train", "val"]
    area = int(s.table.lesion_area.iloc[2])
    # "nonzero" rule: every output pixel the 20 x 30 block overlaps (never fewer than its area share)
    k = 128 / 233
    assert 600 * k**2 <= area <= (20 * k + 2) * (30 * k + 2) and s.table.size_bucket.iloc[2] == "medium"
    assert _leftovers(tmp_path) == []


def test_s1_errors(tmp_path):
    ixi = nt.make_ixi_tree(tmp_path / "ixi", n=3)
    atlas = nt.make_atlas_tree(tmp_path / "atlas", lesion_areas=(10, 20, 30, 40))
    icfg, acfg = IXIConfig(**SMALL_S1), ATLASConfig(**SMALL_S1)
    # IXI not registered: wrong grid -> message says to register first
    bad_ixi = ixi["IXI003-Guys-0801"]
    nt.write_nifti(bad_ixi, np.ones((30, 30, 30), np.float32))
    nt.truncate(ixi["IXI004-Guys-0802"])
    o = prepare_ixi(tmp_path / "ixi", tmp_path / "i", icfg, progress=False)
    assert "register" in o.summary.skipped["IXI003-Guys-0801"] and bad_ixi.name in o.summary.skipped["IXI003-Guys-0801"]
    assert "IXI004-Guys-0802-T1.nii.gz" in o.summary.skipped["IXI004-Guys-0802"]
    with pytest.raises(PrepareError, match="register"):
        prepare_ixi(tmp_path / "ixi", tmp_path / "i2", IXIConfig(resolution=48), progress=False)  # default grid: none fit
    # ATLAS: missing mask, labels outside {0, 1}, mask shape mismatch, NaN
    atlas["sub-r001s001"][1].unlink()
    nt.rewrite(atlas["sub-r001s002"][1], lambda d: (d * 2).astype(np.uint8))
    nt.rewrite(atlas["sub-r001s003"][1], lambda d: d[:, :, :-1])
    o = prepare_atlas(tmp_path / "atlas", tmp_path / "a", acfg, progress=False)
    sk = o.summary.skipped
    assert "lesion mask missing" in sk["sub-r001s001"] and "T1lesion_mask.nii.gz" in sk["sub-r001s001"]
    assert "label value(s) [2]" in sk["sub-r001s002"] and "sub-r001s002_ses-1" in sk["sub-r001s002"]
    assert "shape" in sk["sub-r001s003"] and "sub-r001s003_ses-1_space-MNI152NLin2009aSym_label-L" in sk["sub-r001s003"]
    assert load_slices(o.path).table.subject_id.tolist() == ["sub-r001s004"]
    with pytest.raises(PrepareError, match="strict"):
        prepare_atlas(tmp_path / "atlas", tmp_path / "a2", acfg, strict=True, progress=False)
    # duplicate ATLAS subject (same sub-* in two cohort folders)
    src = atlas["sub-r001s004"][0].parents[2]
    dst = tmp_path / "atlas" / "ATLAS_2" / "Training" / "R002" / src.name
    import shutil

    shutil.copytree(src, dst)
    with pytest.raises(PrepareError, match="duplicate ATLAS subject id.*sub-r001s004"):
        prepare_atlas(tmp_path / "atlas", tmp_path / "a3", acfg, progress=False)


# --------------------------------------------------------------------------- lesion mask rule (peers: resized value > 0)


@pytest.mark.parametrize("n_in,n_out", [(240, 128), (233, 128), (48, 16), (7, 3), (32, 48)])
def test_nonzero_rule_matches_torch_area_resize(n_in, n_out):
    """Independent reference: torch's area interpolation (what monai Resized(mode="area")
    runs for IterMask2) of the 0/1 mask, then > 0."""
    import torch
    import torch.nn.functional as F

    from datasets.prepare.common import resize_mask_nonzero

    rng = np.random.default_rng(n_in)
    for density in (0.001, 0.02, 0.3):
        mask = (rng.random((n_in, n_in)) < density).astype(np.uint8)
        ref = F.interpolate(torch.from_numpy(mask.astype(np.float64))[None, None], size=(n_out, n_out), mode="area")[0, 0] > 0
        np.testing.assert_array_equal(resize_mask_nonzero(mask, n_out), ref.numpy().astype(np.uint8))
        # and it is the support of our exact area resize
        np.testing.assert_array_equal(resize_mask_nonzero(mask, n_out), (resize_area(mask.astype(np.float32), n_out) > 1e-6).astype(np.uint8))


def _one_voxel_tumour(raw: Path, sid: str) -> None:
    seg = nt.brats_dir(raw, sid) / f"{sid}_seg.nii.gz"
    def fn(d):
        out = np.zeros_like(d)
        out[20, 22, 83] = 1  # one voxel, inside the brain, at the test slice
        return out
    nt.rewrite(seg, fn)


def test_brats_lesion_rule_default_nonzero_and_threshold_option(tmp_path):
    raw, csv, _ = brats(tmp_path, PAIR)
    _one_voxel_tumour(raw, BAD)
    run = lambda out, **cfg: prepare_brats21(raw, tmp_path / out, BraTSConfig(resolution=16, **cfg), split_csv=csv, progress=False)
    s = load_slices(run("nonzero").path)
    test = s.table[s.table.split == "test"]
    assert test.lesion_area.tolist() == [1] and test.lesion_area_native.tolist() == [1]  # kept, as IterMask2 keeps it
    assert s.manifest["preprocessing"]["lesion_mask_rule"] == "nonzero" and s.manifest["summary"]["n_warnings"] == 0
    old = run("threshold", lesion_mask_rule="threshold")
    s = load_slices(old.path)
    assert s.table[s.table.split == "test"].lesion_area.tolist() == [0]  # 1/9 of a pixel < 0.5: erased
    assert s.manifest["preprocessing"]["lesion_mask_rule"] == "threshold"
    assert s.manifest["summary"]["n_warnings"] == 1 and "vanishes at 16x16" in s.manifest["summary"]["warnings"][BAD][0]
    assert "vanishes" in old.summary.report("brats21")
    with pytest.raises(PrepareError, match="lesion_mask_rule must be one of"):
        run("bad", lesion_mask_rule="half")


def test_atlas_lesion_rule_nonzero(tmp_path):
    nt.make_atlas_tree(tmp_path / "atlas", lesion_areas=(1, 5))
    cfg = dict(expected_shape=nt.SMALL_S1_SHAPE, resolution=16)  # 48 -> 16: a pixel holds 9 voxels
    a = load_slices(prepare_atlas(tmp_path / "atlas", tmp_path / "a", ATLASConfig(**cfg), progress=False).path)
    b = prepare_atlas(tmp_path / "atlas", tmp_path / "b", ATLASConfig(**cfg, lesion_mask_rule="threshold"), progress=False)
    assert (a.table.lesion_area > 0).all() and a.manifest["preprocessing"]["lesion_mask_rule"] == "nonzero"
    assert load_slices(b.path).table.lesion_area.tolist()[0] == 0 and b.summary.n_warnings >= 1


# --------------------------------------------------------------------------- bad options and suspicious input


def _cli_error(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_cli_bad_options_fail_with_one_line(tmp_path, capsys):
    raw, csv, _ = brats(tmp_path, PAIR)
    args = ["brats21", "--raw", str(raw), "--split-csv", str(csv), "--no-progress", "--workers", "1"]
    for value in ("0", "-5"):
        err = _cli_error(capsys, [*args, "--out", str(tmp_path / "r"), "--resolution", value])
        assert "--resolution must be a positive integer" in err and value in err
    err = _cli_error(capsys, [*args, "--out", str(tmp_path / "r"), "--slice-start", "90", "--slice-stop", "70"])
    assert "empty slice range" in err and "--slice-start 90" in err
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    err = _cli_error(capsys, [*args, "--out", str(blocker / "set")])
    assert "cannot write" in err and "file.txt" in err
    err = _cli_error(capsys, ["s1", "--ixi", str(tmp_path), "--atlas", str(tmp_path), "--out", str(tmp_path / "s1"), "--resolution", "0"])
    assert "--resolution" in err
    err = _cli_error(capsys, ["atlas", "--raw", str(tmp_path), "--out", str(tmp_path / "a"), "--slice-index", "-1"])
    assert "--slice-index must be >= 0" in err
    assert not (tmp_path / "r").exists() and _leftovers(tmp_path) == []


def test_brats_not_skull_stripped_constant_modality_and_lesion_outside_brain(tmp_path):
    splits = {"BraTS2021_00000": "train", BAD: "test", "BraTS2021_00012": "test", "BraTS2021_00013": "test"}
    raw, csv, run = brats(tmp_path, splits)
    # a head with a noisy non-zero background in every modality: the brain mask fills the slice
    for suf in nt.BRATS_FILES.values():
        nt.rewrite(_bad(raw, suf), lambda d: (d + 1.0 + np.random.default_rng(0).random(d.shape)).astype(np.float32))
    # a constant T2 inside the brain
    t2 = nt.brats_dir(raw, "BraTS2021_00012") / "BraTS2021_00012_t2.nii.gz"
    nt.rewrite(t2, lambda d: np.where(d != 0, 7.0, 0.0).astype(np.float32))
    # tumour voxels in the background corner of the test slice
    seg = nt.brats_dir(raw, "BraTS2021_00013") / "BraTS2021_00013_seg.nii.gz"
    def corner(d):
        d = d.copy()
        d[0:2, 0:2, 83] = 2
        return d
    nt.rewrite(seg, corner)
    outcome = run()
    assert "not skull-stripped" in outcome.summary.skipped[BAD] and f"{BAD}_t1.nii.gz" in outcome.summary.skipped[BAD]
    reason = outcome.summary.skipped["BraTS2021_00012"]
    assert "constant inside the brain" in reason and "BraTS2021_00012_t2.nii.gz" in reason and "T2" in reason
    m = load_slices(outcome.path).manifest
    assert m["summary"]["n_warnings"] == 1
    warning = m["summary"]["warnings"]["BraTS2021_00013"][0]
    assert "4 of" in warning and "outside the brain mask" in warning and "slice 83" in warning
    with pytest.raises(PrepareError, match="strict"):
        run("strict", strict=True)


def test_s1_not_skull_stripped_and_lesion_outside_brain(tmp_path):
    ixi = nt.make_ixi_tree(tmp_path / "ixi", n=3)
    nt.rewrite(ixi["IXI003-Guys-0801"], lambda d: (d + 5.0).astype(np.float32))  # background 5: a skull / noise
    o = prepare_ixi(tmp_path / "ixi", tmp_path / "i", IXIConfig(**SMALL_S1), progress=False)
    assert "not skull-stripped" in o.summary.skipped["IXI003-Guys-0801"] and "axial slice 95" in o.summary.skipped["IXI003-Guys-0801"]
    atlas = nt.make_atlas_tree(tmp_path / "atlas", lesion_areas=(30,))
    def corner(d):
        d = d.copy()
        d[0, 0:3, 95] = 1
        return d
    nt.rewrite(atlas["sub-r001s001"][1], corner)
    o = prepare_atlas(tmp_path / "atlas", tmp_path / "a", ATLASConfig(**SMALL_S1), progress=False)
    warnings = load_slices(o.path).manifest["summary"]["warnings"]["sub-r001s001"]
    assert len(warnings) == 1 and "3 of 33 lesion voxel(s) lie outside the brain mask" in warnings[0] and "T1lesion_mask" in warnings[0]
