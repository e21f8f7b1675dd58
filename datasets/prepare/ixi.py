"""IXI T1 -> S1 healthy train/val slices.

Expected input: IXI T1 volumes registered to the MNI ICBM152 2009 1 mm grid (197 x 233 x
189) and skull-stripped, keeping the release's file names, anywhere under ``--raw``::

    RAW/IXI002-Guys-0828-T1.nii.gz
    RAW/IXI012-HH-1211-T1.nii.gz
    ...

(T2/PD files may sit beside them; S1 uses T1 only.) Subject id = the file name without
``-T1.nii.gz``. A seeded subject-level holdout (``val_fraction``) forms the val split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datasets.prepare.common import (
    Outcome,
    PrepareError,
    SubjectResult,
    find_duplicates,
    load_volume,
    raise_duplicates,
    run_preparation,
)
from datasets.prepare.s1 import S1Config, bucket_of, check_config, check_grid, s1_manifest_base, s1_slice

SUFFIXES = ("-T1.nii.gz", "-T1.nii")


@dataclass
class IXIConfig(S1Config):
    val_fraction: float = 0.1  # subject-level holdout for the val split
    seed: int = 0  # seeds the holdout permutation of the sorted subject ids
    file_pattern: str = "IXI*-T1.nii*"


def find_subjects(raw: Path, cfg: IXIConfig) -> dict[str, Path]:
    if not raw.is_dir():
        raise PrepareError(f"{raw}: not a directory (--raw must be the folder holding the IXI T1 files)")
    pairs = []
    for p in sorted(raw.rglob(cfg.file_pattern)):
        for suf in SUFFIXES:
            if p.name.endswith(suf):
                pairs.append((p.name[: -len(suf)], p))
    raise_duplicates(find_duplicates(pairs), "IXI")
    if not pairs:
        raise PrepareError(f"{raw}: no IXI T1 file (pattern {cfg.file_pattern}, e.g. IXI002-Guys-0828-T1.nii.gz) found")
    return dict(sorted(pairs))


def holdout(ids: list[str], fraction: float, seed: int) -> set[str]:
    """Seeded subject-level holdout: permute the sorted ids, the first round(f*n) are val."""
    ids = sorted(ids)
    if not 0 <= fraction < 1:
        raise PrepareError(f"val_fraction must be in [0, 1), got {fraction}")
    n_val = int(round(fraction * len(ids)))
    if fraction > 0 and len(ids) >= 2:
        n_val = min(max(n_val, 1), len(ids) - 1)
    perm = np.random.default_rng(seed).permutation(len(ids))
    return {ids[i] for i in perm[:n_val]}


def process_subject(cfg: IXIConfig, subject_id: str, path: str, split: str) -> SubjectResult:
    vol = load_volume(path, canonical=True)
    check_grid(vol, cfg)
    rec, _ = s1_slice(vol, None, cfg, split)
    return SubjectResult(subject_id=subject_id, slices=[rec])


def prepare_ixi(
    raw: str | Path,
    out: str | Path,
    config: IXIConfig | None = None,
    *,
    workers: int = 1,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Outcome:
    cfg = config or IXIConfig()
    check_config(cfg)
    raw = Path(raw)
    subjects = find_subjects(raw, cfg)
    val = holdout(list(subjects), cfg.val_fraction, cfg.seed)
    jobs = [(cfg, sid, str(p), "val" if sid in val else "train") for sid, p in subjects.items()]
    manifest: dict[str, Any] = {
        "name": "ixi-s1",
        "source": "ixi",
        "protocol": "S1-train",
        "protocols": [],  # a part of S1; combine with ATLAS (python -m datasets.prepare s1)
        **s1_manifest_base(cfg),
        "split_rule": {
            "kind": "seeded subject holdout",
            "val_fraction": cfg.val_fraction,
            "seed": cfg.seed,
            "val_subjects": sorted(val),
        },
        "raw": str(raw.resolve()),
    }
    return run_preparation(
        "ixi", process_subject, jobs, channels=1, size=cfg.resolution, manifest=manifest,
        extra=bucket_of(cfg), out=out, workers=workers, strict=strict, overwrite=overwrite, progress=progress,
    )
