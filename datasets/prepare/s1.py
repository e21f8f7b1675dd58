"""Protocol S1 (THOR setting): one mid-axial slice per MNI-registered T1 volume.

Shared by the IXI (healthy train/val) and ATLAS 2.0 (stroke test) preparations, and the
``combine_s1`` step that joins both into the one set the runner evaluates.

Geometry: volumes are reoriented to the closest RAS+ voxel order (flips/permutations
only). The MNI ICBM152 2009 1 mm grid ATLAS 2.0 ships in is 197 (x, left->right) x 233
(y, posterior->anterior) x 189 (z, inferior->superior); axial slices run along the third
axis, so the protocol's slice 95 is ``volume[:, :, 95]`` (z = 95 of 189, just above the
grid centre 94). The 2-D slice is shown with rows anterior->posterior and columns patient
left->right, padded to a square, and resized with area interpolation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from datasets.prepare.common import (
    PrepareError,
    SliceRecord,
    SubjectError,
    Volume,
    brain_percentiles,
    check_axial_order,
    check_brain_fraction,
    check_common_config,
    check_not_constant,
    config_dict,
    lesion_warnings,
    pad_to_square,
    percentile_scale,
    resize_area,
    resize_lesion,
    resize_mask,
    size_bucket,
    to_display,
)

MNI_SHAPE = (197, 233, 189)
REGISTER_HINT = (
    "register every T1 to the MNI ICBM152 2009 1 mm template grid (197 x 233 x 189, the grid "
    "ATLAS 2.0 ships in) before preparing; see docs/data-preparation.md, section IXI"
)


@dataclass
class S1Config:
    """Preprocessing of protocol S1; every field is written into the manifest."""

    resolution: int = 128
    expected_shape: tuple[int, int, int] = MNI_SHAPE  # voxel grid after RAS reorientation
    voxel_size_mm: float = 1.0
    voxel_size_tolerance_mm: float = 0.05
    axial_axis: int = 2  # RAS voxel axis along which axial slices run (z, inferior->superior)
    slice_index: int = 95  # the mid-axial slice
    brain_threshold: float = 0.0  # brain mask = voxels > threshold (inputs skull-stripped)
    percentile_low: float = 1.0  # normalisation: brain percentile mapped to 0
    percentile_high: float = 99.0  # ... and to 1 (then clipped to [0, 1])
    normalisation_scope: str = "volume-brain"  # percentiles over all brain voxels of the volume
    background_value: float = 0.0
    pad_value: float = 0.0
    image_interpolation: str = "area"
    mask_interpolation: str = "area+threshold"  # brain mask
    mask_threshold: float = 0.5  # resized brain-mask pixel = 1 where area fraction >= threshold
    # Lesion mask: "nonzero" = resized value > 0 (THOR: DownstreamEvaluatorAtlas.py sets
    # masks[masks > 0] = 1); "threshold" = area fraction >= mask_threshold (before prepare_version 2).
    lesion_mask_rule: str = "nonzero"
    max_brain_fraction: float = 0.7  # a larger brain mask in the slice means skull / noisy background
    affine_atol: float = 1e-3  # image/mask affine agreement
    orientation: str = "RAS-canonical; rows anterior->posterior, columns left->right"
    bucket_edges: tuple[int, ...] = (0, 3, 71, 570)  # (e_k, e_k+1] pixels at `resolution`
    bucket_names: tuple[str, ...] = ("none", "tiny", "small", "medium", "large")


S1_SHARED_KEYS = tuple(S1Config.__dataclass_fields__)  # must agree between IXI and ATLAS


def check_config(cfg: S1Config) -> None:
    check_common_config(cfg)
    if cfg.slice_index < 0:
        raise PrepareError(f"--slice-index must be >= 0, got {cfg.slice_index}")


def check_grid(vol: Volume, cfg: S1Config) -> None:
    if vol.data.shape != tuple(cfg.expected_shape):
        raise SubjectError(vol.path, f"grid {vol.data.shape} is not the expected MNI grid {tuple(cfg.expected_shape)}; {REGISTER_HINT}")
    zooms = np.sqrt((vol.affine[:3, :3] ** 2).sum(axis=0))
    if np.any(np.abs(zooms - cfg.voxel_size_mm) > cfg.voxel_size_tolerance_mm):
        raise SubjectError(vol.path, f"voxel size {np.round(zooms, 3).tolist()} mm is not {cfg.voxel_size_mm} mm; {REGISTER_HINT}")
    check_axial_order(vol)


def s1_slice(vol: Volume, lesion: np.ndarray | None, cfg: S1Config, split: str) -> tuple[SliceRecord, list[str]]:
    """The protocol slice of one (checked, RAS) volume, normalised and resized, and its
    warnings (lesion voxels outside the brain, a lesion the resize erases)."""
    if cfg.axial_axis != 2:
        raise PrepareError("S1Config.axial_axis must be 2 (RAS z); other layouts are not supported")
    if not 0 <= cfg.slice_index < vol.data.shape[2]:
        raise SubjectError(vol.path, f"slice index {cfg.slice_index} outside the {vol.data.shape[2]} axial slices")
    brain = vol.data > cfg.brain_threshold
    if not brain.any():
        raise SubjectError(vol.path, f"empty brain (no voxel > {cfg.brain_threshold})")
    check_not_constant(vol.data[brain], vol.path, "the T1 volume")
    low, high = brain_percentiles(vol.data, brain, (cfg.percentile_low, cfg.percentile_high))
    k = cfg.slice_index
    img2d, brain2d = vol.data[:, :, k], brain[:, :, k]
    if not brain2d.any():
        raise SubjectError(vol.path, f"empty brain in axial slice {k}")
    check_brain_fraction(brain2d, cfg.max_brain_fraction, vol.path, f"axial slice {k}")
    img2d = percentile_scale(img2d, brain2d, low, high, cfg.background_value)
    codes = tuple("RAS")  # volumes are reoriented to RAS before this point
    planes = [to_display(img2d, codes), to_display(brain2d.astype(np.uint8), codes)]
    if lesion is not None:
        planes.append(to_display(lesion[:, :, k], codes))
    sq = [pad_to_square(p, cfg.pad_value if i == 0 else 0) for i, p in enumerate(planes)]
    image = resize_area(sq[0], cfg.resolution)[None]
    brain_r = resize_mask(sq[1], cfg.resolution, cfg.mask_threshold)
    warnings: list[str] = []
    if lesion is not None:
        lesion_r = resize_lesion(sq[2], cfg.resolution, cfg.lesion_mask_rule, cfg.mask_threshold)
        warnings = lesion_warnings(lesion[:, :, k], brain2d, lesion_r, cfg.lesion_mask_rule, cfg.resolution, f"axial slice {k}")
    else:
        lesion_r = np.zeros_like(brain_r)
    info = {"norm_low": low, "norm_high": high}
    return SliceRecord(slice_index=k, image=image, lesion=lesion_r, brain=brain_r, split=split, info=info), warnings


def bucket_of(cfg: S1Config):
    def extra(rec: SliceRecord) -> dict[str, Any]:
        return {"size_bucket": size_bucket(int(rec.lesion.sum()), cfg.bucket_edges, cfg.bucket_names, left_open=True)}

    return extra


def s1_manifest_base(cfg: S1Config) -> dict[str, Any]:
    return {"preprocessing": config_dict(cfg), "modalities": ["T1"]}
