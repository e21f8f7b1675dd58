"""ATLAS 2.0 (stroke, T1w) -> S1 test slices.

Expected input: the ATLAS R2.0 training release (already in the MNI ICBM152 2009 1 mm
grid, 197 x 233 x 189), BIDS-like, possibly nested under cohort folders::

    RAW/ATLAS_2/Training/R001/sub-r001s001/ses-1/anat/
        sub-r001s001_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz
        sub-r001s001_ses-1_space-MNI152NLin2009aSym_label-L_desc-T1lesion_mask.nii.gz

The tree is searched recursively for ``sub-*/ses-*/anat/*_T1w.nii.gz``; the mask is the
file with the same prefix and ``_label-L_desc-T1lesion_mask.nii.gz``. Subject id = the
``sub-*`` folder name. Every subject goes to the test split (the protocol drops slices
with 0..3 lesion pixels at evaluation time; the table keeps them, bucket "none"/"tiny").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets.prepare.common import (
    Outcome,
    PrepareError,
    SubjectError,
    SubjectResult,
    check_labels,
    check_same_grid,
    find_duplicates,
    load_volume,
    raise_duplicates,
    run_preparation,
)
from datasets.prepare.s1 import S1Config, bucket_of, check_config, check_grid, s1_manifest_base, s1_slice

T1_SUFFIX = "_T1w.nii.gz"
MASK_SUFFIX = "_label-L_desc-T1lesion_mask.nii.gz"


@dataclass
class ATLASConfig(S1Config):
    lesion_labels: tuple[int, ...] = (0, 1)  # allowed mask values; lesion = value > 0
    t1_glob: str = "sub-*/ses-*/anat/*" + T1_SUFFIX
    mask_suffix: str = MASK_SUFFIX


def find_subjects(raw: Path, cfg: ATLASConfig) -> dict[str, tuple[Path, Path]]:
    if not raw.is_dir():
        raise PrepareError(f"{raw}: not a directory (--raw must be the ATLAS 2.0 folder)")
    pairs = []
    for t1 in sorted(raw.rglob(cfg.t1_glob)):
        sid = t1.parents[2].name  # sub-*/ses-*/anat/file
        mask = t1.with_name(t1.name[: -len(T1_SUFFIX)] + cfg.mask_suffix)
        pairs.append((sid, (t1, mask)))
    raise_duplicates(find_duplicates((sid, t1) for sid, (t1, _) in pairs), "ATLAS")
    if not pairs:
        raise PrepareError(f"{raw}: no ATLAS T1 file (sub-*/ses-*/anat/*{T1_SUFFIX}) found")
    return dict(sorted(pairs))


def process_subject(cfg: ATLASConfig, subject_id: str, t1: str, mask: str) -> SubjectResult:
    if not Path(mask).is_file():
        raise SubjectError(mask, f"lesion mask missing (expected beside {Path(t1).name})")
    vol = load_volume(t1, canonical=True)
    check_grid(vol, cfg)
    lesion_vol = load_volume(mask, canonical=True)
    check_same_grid(vol, lesion_vol, cfg.affine_atol)
    lesion = (check_labels(lesion_vol, cfg.lesion_labels) > 0).astype("uint8")
    rec, warnings = s1_slice(vol, lesion, cfg, "test")
    return SubjectResult(subject_id=subject_id, slices=[rec], warnings=[f"{Path(mask).name} {w}" for w in warnings])


def prepare_atlas(
    raw: str | Path,
    out: str | Path,
    config: ATLASConfig | None = None,
    *,
    workers: int = 1,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Outcome:
    cfg = config or ATLASConfig()
    check_config(cfg)
    raw = Path(raw)
    subjects = find_subjects(raw, cfg)
    jobs = [(cfg, sid, str(t1), str(mask)) for sid, (t1, mask) in subjects.items()]
    manifest: dict[str, Any] = {
        "name": "atlas2-s1",
        "source": "atlas",
        "protocol": "S1-test",
        "protocols": [],  # a part of S1; combine with IXI (python -m datasets.prepare s1)
        **s1_manifest_base(cfg),
        "split_rule": {"kind": "all subjects are test"},
        "raw": str(raw.resolve()),
    }
    return run_preparation(
        "atlas", process_subject, jobs, channels=1, size=cfg.resolution, manifest=manifest,
        extra=bucket_of(cfg), out=out, workers=workers, strict=strict, overwrite=overwrite, progress=progress,
    )
