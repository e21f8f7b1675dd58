"""BraTS 2021 (glioma, T1/T1CE/T2/FLAIR) -> S2 slices (IterMask2 setting).

Expected input: the BraTS 2021 Task 1 training release (1251 subjects, already
co-registered to the SRI24 atlas, 1 mm, 240 x 240 x 155, skull-stripped)::

    RAW/BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz
    RAW/BraTS2021_00002/...

(subject folders may sit one or more levels down, e.g. under
``RSNA_ASNR_MICCAI_BraTS2021_TrainingData_16July2021/``).

Rules (all parameters of ``BraTSConfig``): subject split from the split CSV (default:
``datasets/splits/brats21_split.csv``, IterMask2's 990/128/133); axial slices
``slice_start .. slice_stop-1`` (70..89) along the stored third voxel axis; train and val
keep the slices without tumour; test keeps per subject the slice with the largest tumour
(first maximum); brain mask = voxels non-zero in any modality; each modality divided by
the 90th percentile of its brain voxels, background set to 0; pad to square; area resize;
lesion mask = area-resized tumour mask > 0 (IterMask2's rule; ``lesion_mask_rule``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from datasets.prepare.common import (
    Outcome,
    PrepareError,
    SliceRecord,
    SubjectError,
    SubjectResult,
    Summary,
    check_axial_order,
    check_brain_fraction,
    check_common_config,
    check_labels,
    check_not_constant,
    check_same_grid,
    config_dict,
    find_duplicates,
    load_volume,
    pad_to_square,
    lesion_warnings,
    raise_duplicates,
    resize_area,
    resize_lesion,
    resize_mask,
    run_preparation,
    size_bucket,
    to_display,
)

DEFAULT_SPLIT_CSV = Path(__file__).resolve().parents[1] / "splits" / "brats21_split.csv"
SUBJECT_PATTERN = re.compile(r"^BraTS2021_\d+$")


@dataclass
class BraTSConfig:
    """Preprocessing of protocol S2; every field is written into the manifest."""

    resolution: int = 128
    modalities: tuple[str, ...] = ("T1", "T1CE", "T2", "FLAIR")  # channel order
    file_suffixes: dict[str, str] = field(
        default_factory=lambda: {"T1": "t1", "T1CE": "t1ce", "T2": "t2", "FLAIR": "flair", "seg": "seg"}
    )
    slice_start: int = 70  # first axial slice (stored voxel index along the third axis)
    slice_stop: int = 90  # one past the last (70..89)
    tumour_labels: tuple[int, ...] = (0, 1, 2, 4)  # allowed seg values; lesion = seg > 0
    train_slice_rule: str = "every slice in range with no seg > 0 voxel (train and val)"
    test_slice_rule: str = "per subject the slice in range with the largest seg > 0 area (first maximum)"
    brain_mask_rule: str = "voxel non-zero in any modality"
    scale_percentile: float = 90.0  # value / percentile of the brain voxels, per volume and modality
    background_value: float = 0.0
    pad_value: float = 0.0
    image_interpolation: str = "area"
    mask_interpolation: str = "area+threshold"  # brain mask: area fraction >= mask_threshold
    mask_threshold: float = 0.5
    # Lesion mask: "nonzero" = resized value > 0 (IterMask2: datasets/brats2021.py resizes the
    # seg with monai Resized, default mode "area", and test.py keeps seg > 0); "threshold" =
    # area fraction >= mask_threshold (this suite's rule before prepare_version 2).
    lesion_mask_rule: str = "nonzero"
    max_brain_fraction: float = 0.7  # a larger brain mask in a chosen slice means skull / noisy background
    affine_atol: float = 1e-3
    orientation: str = "stored voxel order; rows anterior->posterior, columns left->right (flips only)"
    bucket_edges: tuple[int, ...] = (1, 200, 800)  # [e_k, e_k+1) pixels at `resolution`
    bucket_names: tuple[str, ...] = ("none", "small", "medium", "large")

    @property
    def slice_range(self) -> range:
        return range(self.slice_start, self.slice_stop)


def check_config(cfg: BraTSConfig) -> None:
    check_common_config(cfg)
    if cfg.slice_start < 0:
        raise PrepareError(f"--slice-start must be >= 0, got {cfg.slice_start}")
    if cfg.slice_stop <= cfg.slice_start:
        raise PrepareError(
            f"empty slice range: --slice-start {cfg.slice_start} must be below --slice-stop {cfg.slice_stop} (one past the last slice)"
        )


def read_split(path: Path) -> dict[str, str]:
    try:
        table = pd.read_csv(path, dtype=str)
    except Exception as exc:
        raise PrepareError(f"{path}: cannot be read as a split CSV ({exc})") from exc
    if list(table.columns[:2]) != ["subject_id", "split"]:
        raise PrepareError(f"{path}: expected columns subject_id,split; got {list(table.columns)}")
    bad = sorted(set(table["split"]) - {"train", "val", "test"})
    if bad:
        raise PrepareError(f"{path}: unknown split value(s) {bad}; allowed: train, val, test")
    dup = sorted(table["subject_id"][table["subject_id"].duplicated()])
    if dup:
        raise PrepareError(f"{path}: duplicate subject id(s) {dup[:5]}")
    return dict(zip(table["subject_id"], table["split"]))


def find_subjects(raw: Path) -> dict[str, Path]:
    if not raw.is_dir():
        raise PrepareError(f"{raw}: not a directory (--raw must be the BraTS 2021 training folder)")
    dirs = [(p.name, p) for p in sorted(raw.rglob("BraTS2021_*")) if p.is_dir() and SUBJECT_PATTERN.match(p.name)]
    raise_duplicates(find_duplicates(dirs), "BraTS")
    if not dirs:
        raise PrepareError(f"{raw}: no BraTS2021_<id> subject folder found")
    return dict(sorted(dirs))


def subject_files(cfg: BraTSConfig, subject_id: str, folder: Path) -> dict[str, Path]:
    return {key: folder / f"{subject_id}_{suf}.nii.gz" for key, suf in cfg.file_suffixes.items()}


def process_subject(cfg: BraTSConfig, subject_id: str, folder: str, split: str) -> SubjectResult:
    files = subject_files(cfg, subject_id, Path(folder))
    for key, path in files.items():
        if not path.is_file():
            what = "segmentation" if key == "seg" else f"modality {key}"
            raise SubjectError(path, f"{what} missing for {subject_id}")
    seg_vol = load_volume(files["seg"])
    seg = check_labels(seg_vol, cfg.tumour_labels) > 0
    codes = check_axial_order(seg_vol)
    if cfg.slice_stop > seg.shape[2] or cfg.slice_start < 0:
        raise SubjectError(seg_vol.path, f"{seg.shape[2]} axial slices; slices {cfg.slice_start}..{cfg.slice_stop - 1} needed")
    area = seg[:, :, cfg.slice_start : cfg.slice_stop].sum(axis=(0, 1))
    if split == "test":
        if area.max() == 0:
            return SubjectResult(subject_id, excluded=f"no tumour in slices {cfg.slice_start}..{cfg.slice_stop - 1}")
        chosen = [cfg.slice_start + int(np.argmax(area))]
    else:
        chosen = [cfg.slice_start + i for i in np.flatnonzero(area == 0)]
        if not chosen:
            return SubjectResult(subject_id, excluded=f"no tumour-free slice in {cfg.slice_start}..{cfg.slice_stop - 1}")

    slices: dict[str, np.ndarray] = {}
    brain: np.ndarray | None = None
    paths: dict[str, str] = {}
    for m in cfg.modalities:
        vol = load_volume(files[m])
        check_same_grid(seg_vol, vol, cfg.affine_atol)
        nz = vol.data != 0
        brain = nz if brain is None else (brain | nz)
        slices[m] = vol.data  # one subject's volumes only
        paths[m] = vol.path
    assert brain is not None
    if not brain.any():
        raise SubjectError(paths[cfg.modalities[0]], f"empty brain (all modalities zero) for {subject_id}")
    for m in cfg.modalities:
        check_not_constant(slices[m][brain], paths[m], f"modality {m}")
    for z in chosen:
        check_brain_fraction(brain[:, :, z], cfg.max_brain_fraction, paths[cfg.modalities[0]], f"axial slice {z}")
    scale: dict[str, float] = {}
    warnings: list[str] = []
    for m in cfg.modalities:
        p = float(np.percentile(slices[m][brain], cfg.scale_percentile))
        if not p > 0:
            raise SubjectError(paths[m], f"brain {cfg.scale_percentile:g}th percentile is {p:g}; cannot scale (empty or non-positive modality)")
        scale[m] = p
    records = []
    for z in chosen:
        b2 = brain[:, :, z]
        chans = []
        for m in cfg.modalities:
            x = slices[m][:, :, z] / scale[m]
            x[~b2] = cfg.background_value
            chans.append(resize_area(pad_to_square(to_display(x, codes), cfg.pad_value), cfg.resolution))
        brain_r = resize_mask(pad_to_square(to_display(b2.astype(np.uint8), codes)), cfg.resolution, cfg.mask_threshold)
        lesion_r = resize_lesion(pad_to_square(to_display(seg[:, :, z].astype(np.uint8), codes)), cfg.resolution, cfg.lesion_mask_rule, cfg.mask_threshold)
        warnings += lesion_warnings(seg[:, :, z], b2, lesion_r, cfg.lesion_mask_rule, cfg.resolution, f"{Path(files['seg']).name} slice {z}")
        info = {f"p{cfg.scale_percentile:g}_{m}": scale[m] for m in cfg.modalities}
        info["lesion_area_native"] = int(seg[:, :, z].sum())
        records.append(SliceRecord(z, np.stack(chans).astype(np.float32), lesion_r, brain_r, split, info))
    return SubjectResult(subject_id, slices=records, warnings=warnings)


def prepare_brats21(
    raw: str | Path,
    out: str | Path,
    config: BraTSConfig | None = None,
    *,
    split_csv: str | Path | None = None,
    allow_missing: bool = False,
    workers: int = 1,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Outcome:
    cfg = config or BraTSConfig()
    check_config(cfg)
    raw = Path(raw)
    split_path = Path(split_csv) if split_csv is not None else DEFAULT_SPLIT_CSV
    split = read_split(split_path)
    subjects = find_subjects(raw)
    summary = Summary()
    missing = sorted(set(split) - set(subjects))
    if missing and not allow_missing:
        raise PrepareError(
            f"{split_path}: names {len(missing)} subject(s) missing from {raw}: {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''} (download the full release, or pass --allow-missing to prepare the rest)"
        )
    for sid in missing:
        summary.skipped[sid] = f"{split_path}: named in the split but no folder {sid} under {raw}"
    for sid in sorted(set(subjects) - set(split)):
        summary.excluded[sid] = f"not in the split CSV {split_path.name}"
    summary.found = len(set(subjects) - set(split))  # + the jobs, counted by run_preparation
    jobs = [(cfg, sid, str(subjects[sid]), split[sid]) for sid in sorted(split) if sid in subjects]
    counts = pd.Series(split).value_counts().to_dict()
    manifest: dict[str, Any] = {
        "name": "brats21-s2",
        "source": "brats21",
        "protocol": "S2",
        "protocols": ["S2"],
        "modalities": list(cfg.modalities),
        "preprocessing": config_dict(cfg),
        "split_rule": {
            "kind": "fixed subject split from CSV",
            "csv": split_path.name,
            "csv_sha256": hashlib.sha256(split_path.read_bytes()).hexdigest(),
            "subjects_per_split": {k: int(counts.get(k, 0)) for k in ("train", "val", "test")},
        },
        "raw": str(raw.resolve()),
    }

    def extra(rec: SliceRecord) -> dict[str, Any]:
        return {"size_bucket": size_bucket(int(rec.lesion.sum()), cfg.bucket_edges, cfg.bucket_names, left_open=False)}

    return run_preparation(
        "brats21", process_subject, jobs, channels=len(cfg.modalities), size=cfg.resolution, manifest=manifest,
        extra=extra, out=out, workers=workers, strict=strict, overwrite=overwrite, progress=progress, summary=summary,
    )
