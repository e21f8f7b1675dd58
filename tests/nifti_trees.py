"""Small synthetic NIfTI trees in the layouts of the IXI, ATLAS 2.0 and BraTS 2021 releases.

Volumes are tiny (in-plane 40..48 voxels) but keep the slice indices the protocols use
(z >= 96 so S1's slice 95 and S2's slices 70..89 exist). The geometry is known exactly,
so tests can predict every prepared value.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import pandas as pd

BRATS_AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])  # BraTS stores L-P-S voxel axes
MNI_AFFINE = np.array([[1.0, 0, 0, -98], [0, 1, 0, -134], [0, 0, 1, -72], [0, 0, 0, 1]])
SMALL_S1_SHAPE = (40, 48, 189)  # MNI-like depth, small in-plane
BRATS_SHAPE = (48, 48, 100)
BRATS_FILES = {"T1": "t1", "T1CE": "t1ce", "T2": "t2", "FLAIR": "flair"}


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray = MNI_AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def ellipsoid(shape: Sequence[int], frac: Sequence[float] = (0.8, 0.8, 1.3)) -> np.ndarray:
    """Boolean ellipsoid with semi-axes ``frac`` (fractions of each half-axis): the 'brain'."""
    total = np.zeros(tuple(shape), dtype=np.float32)
    for axis, (n, f) in enumerate(zip(shape, frac)):
        g = np.linspace(-1, 1, n, dtype=np.float32) / f
        total += (g**2).reshape([n if a == axis else 1 for a in range(len(shape))])
    return total <= 1.0


def head(shape: Sequence[int], seed: int, base: float = 100.0) -> np.ndarray:
    """Brain with smooth intensity variation + noise, zero background (skull-stripped)."""
    rng = np.random.default_rng(seed)
    brain = ellipsoid(shape)
    x = np.linspace(0, 1, shape[0])[:, None, None]
    vol = base * (1.0 + 0.5 * x) + rng.normal(0, 5, size=shape)
    vol = np.where(brain, np.maximum(vol, 1.0), 0.0)
    return vol.astype(np.float32)


def disc(shape2d: Sequence[int], area: int, center: tuple[int, int] | None = None) -> np.ndarray:
    """Boolean 2-D mask with exactly ``area`` pixels, grown around ``center`` by distance."""
    h, w = shape2d
    cy, cx = center if center is not None else (h // 2, w // 2)
    yy, xx = np.mgrid[:h, :w]
    d = (yy - cy) ** 2 + (xx - cx) ** 2 + 1e-3 * (yy * w + xx)  # tie-break: unique order
    out = np.zeros(h * w, dtype=bool)
    out[np.argsort(d.ravel(), kind="stable")[:area]] = True
    return out.reshape(h, w)


# --------------------------------------------------------------------------- IXI


def make_ixi_tree(root: Path, n: int = 5, shape: Sequence[int] = SMALL_S1_SHAPE) -> dict[str, Path]:
    """``root/IXI<k>-Guys-<n>-{T1,T2,PD}.nii.gz`` on an MNI-like grid (T2/PD are decoys)."""
    out = {}
    for k in range(n):
        sid = f"IXI{k + 2:03d}-Guys-{800 + k:04d}"
        vol = head(shape, seed=k)
        out[sid] = write_nifti(root / f"{sid}-T1.nii.gz", vol)
        write_nifti(root / f"{sid}-T2.nii.gz", np.zeros((4, 4, 4), np.float32))
        write_nifti(root / f"{sid}-PD.nii.gz", np.zeros((4, 4, 4), np.float32))
    return out


# --------------------------------------------------------------------------- ATLAS


def atlas_paths(root: Path, sid: str, cohort: str = "R001") -> tuple[Path, Path]:
    anat = root / "ATLAS_2" / "Training" / cohort / sid / "ses-1" / "anat"
    stem = f"{sid}_ses-1_space-MNI152NLin2009aSym"
    return anat / f"{stem}_T1w.nii.gz", anat / f"{stem}_label-L_desc-T1lesion_mask.nii.gz"


def make_atlas_tree(
    root: Path,
    lesion_areas: Sequence[int] = (0, 2, 30, 200, 700),
    shape: Sequence[int] = SMALL_S1_SHAPE,
    slice_index: int = 95,
) -> dict[str, tuple[Path, Path]]:
    """One subject per area; the lesion (exactly ``area`` voxels) lies in axial slice
    ``slice_index`` only, plus a decoy lesion in the slice below it."""
    out = {}
    for k, area in enumerate(lesion_areas):
        sid = f"sub-r001s{k + 1:03d}"
        t1, mask = atlas_paths(root, sid)
        vol = head(shape, seed=100 + k)
        lesion = np.zeros(shape, dtype=np.uint8)
        lesion[:, :, slice_index] = disc(shape[:2], area)
        lesion[:, :, slice_index - 1] = disc(shape[:2], 50)
        vol[lesion > 0] *= 0.5
        write_nifti(t1, vol)
        write_nifti(mask, lesion)
        out[sid] = (t1, mask)
    return out


# --------------------------------------------------------------------------- BraTS


def brats_dir(root: Path, sid: str, nest: str = "RSNA_ASNR_MICCAI_BraTS2021_TrainingData_16July2021") -> Path:
    return root / nest / sid


def brats_seg(shape: Sequence[int], split: str) -> np.ndarray:
    """Train/val: tumour in slices 70..79 only (healthy 80..89 remain). Test: tumour whose
    in-range area peaks at slice 83, plus a larger one outside the range at slice 50."""
    seg = np.zeros(shape, dtype=np.uint8)
    centre = (shape[0] // 2, shape[1] // 2)
    if split == "test":
        for z in range(70, 90):
            seg[:, :, z] = disc(shape[:2], 40 + 10 * (10 - abs(z - 83)), centre)
        seg[:, :, 50] = disc(shape[:2], 500, centre)
    else:
        for z in range(70, 80):
            seg[:, :, z] = disc(shape[:2], 30, centre)
    # labels 1/2/4 in rings
    core = np.zeros(shape, dtype=bool)
    core[centre[0] - 1 : centre[0] + 2, centre[1] - 1 : centre[1] + 2] = True
    labelled = np.where(seg > 0, 2, 0).astype(np.uint8)
    labelled[(seg > 0) & core] = 4
    labelled[(seg > 0) & np.roll(core, 3, axis=0) & ~core] = 1
    return labelled


def make_brats_tree(root: Path, splits: dict[str, str], shape: Sequence[int] = BRATS_SHAPE) -> dict[str, Path]:
    out = {}
    for k, (sid, split) in enumerate(sorted(splits.items())):
        folder = brats_dir(root, sid)
        for j, (mod, suf) in enumerate(BRATS_FILES.items()):
            write_nifti(folder / f"{sid}_{suf}.nii.gz", head(shape, seed=10 * k + j, base=100.0 * (j + 1)), BRATS_AFFINE)
        write_nifti(folder / f"{sid}_seg.nii.gz", brats_seg(shape, split), BRATS_AFFINE)
        out[sid] = folder
    return out


def write_split(path: Path, splits: dict[str, str]) -> Path:
    pd.DataFrame(sorted(splits.items()), columns=["subject_id", "split"]).to_csv(path, index=False)
    return path


# --------------------------------------------------------------------------- corruptions


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def rewrite(path: Path, fn, affine: np.ndarray | None = None) -> None:
    img = nib.load(str(path))
    data = fn(np.asarray(img.dataobj))
    write_nifti(path, data, img.affine if affine is None else affine)


def duplicate_folder(src: Path, dst_root: Path) -> Path:
    dst = dst_root / "copy" / src.name
    shutil.copytree(src, dst)
    return dst
