"""Join the IXI (train/val) and ATLAS 2.0 (test) parts into the one S1 set.

``python -m datasets.prepare s1 --ixi PATH --atlas PATH --out PATH`` -- each PATH is either
a raw folder (prepared on the fly into a temporary directory) or a set already written
by ``python -m datasets.prepare ixi|atlas``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from datasets.format import MANIFEST_FILE, SliceSet, load_slices
from datasets.prepare.atlas import ATLASConfig, prepare_atlas
from datasets.prepare.common import Outcome, PrepareError, Summary, check_writable, finalize_manifest, remove_tree, write_set
from datasets.prepare.ixi import IXIConfig, prepare_ixi
from datasets.prepare.s1 import S1_SHARED_KEYS, check_config


def combine_s1(ixi: SliceSet, atlas: SliceSet) -> SliceSet:
    """Join an IXI set (train/val) and an ATLAS set (test) into the one S1 set.

    Refuses sets that are not these parts or were prepared with different S1 parameters.
    """
    for part, want in ((ixi, ("ixi", "S1-train")), (atlas, ("atlas", "S1-test"))):
        got = (part.manifest.get("source"), part.manifest.get("protocol"))
        if got != want:
            raise PrepareError(f"{part.manifest.get('path', '?')}: expected a set with source/protocol {want}, got {got}")
    if ixi.modalities != atlas.modalities:
        raise PrepareError(f"modalities differ: IXI {ixi.modalities} vs ATLAS {atlas.modalities}")
    pi, pa = ixi.manifest["preprocessing"], atlas.manifest["preprocessing"]
    diff = {k: (pi.get(k), pa.get(k)) for k in S1_SHARED_KEYS if pi.get(k) != pa.get(k)}
    if diff:
        raise PrepareError(f"IXI and ATLAS were prepared with different S1 parameters: {diff}")
    if set(ixi.table["split"]) - {"train", "val"} or set(atlas.table["split"]) != {"test"}:
        raise PrepareError("IXI set must hold only train/val slices and ATLAS set only test slices")
    table = pd.concat([ixi.table.assign(source="ixi"), atlas.table.assign(source="atlas")], ignore_index=True)
    shared = {k: pi[k] for k in S1_SHARED_KEYS if k in pi}
    manifest: dict[str, Any] = {
        "name": "s1-ixi-atlas",
        "source": "ixi+atlas",
        "sources": {"train": "ixi", "val": "ixi", "test": "atlas"},
        "protocol": "S1",
        "protocols": ["S1"],
        "modalities": list(ixi.modalities),
        "preprocessing": shared,
        "parts": {
            name: {k: v for k, v in m.items() if k != "path"} for name, m in (("ixi", ixi.manifest), ("atlas", atlas.manifest))
        },
        "prepare_version": ixi.manifest.get("prepare_version"),
    }
    combined = SliceSet(
        images=np.concatenate([np.asarray(ixi.images), np.asarray(atlas.images)]),
        lesion_masks=np.concatenate([np.asarray(ixi.lesion_masks), np.asarray(atlas.lesion_masks)]),
        brain_masks=np.concatenate([np.asarray(ixi.brain_masks), np.asarray(atlas.brain_masks)]),
        table=table,
        modalities=list(ixi.modalities),
        manifest=manifest,
    )
    finalize_manifest(combined.manifest, combined)
    return combined


def is_prepared(path: Path) -> bool:
    return (Path(path) / MANIFEST_FILE).is_file()


def prepare_s1(
    ixi: str | Path,
    atlas: str | Path,
    out: str | Path,
    *,
    ixi_config: IXIConfig | None = None,
    atlas_config: ATLASConfig | None = None,
    workers: int = 1,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Outcome:
    """Prepare (or reuse) both S1 parts and write the combined set atomically."""
    import time

    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and not overwrite:
        raise PrepareError(f"{out}: already exists (pass --overwrite to replace it)")
    for cfg in (ixi_config or IXIConfig(), atlas_config or ATLASConfig()):
        check_config(cfg)
    check_writable(out)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".parts"))
    summary = Summary()
    try:
        parts = {}
        for name, src, fn, cfg in (("ixi", ixi, prepare_ixi, ixi_config), ("atlas", atlas, prepare_atlas, atlas_config)):
            src = Path(src)
            if is_prepared(src):
                parts[name] = load_slices(src)
                continue
            res = fn(src, work / name, cfg, workers=workers, strict=strict, progress=progress)
            summary.found += res.summary.found
            summary.used += res.summary.used
            summary.skipped.update({f"{name}:{k}": v for k, v in res.summary.skipped.items()})
            summary.excluded.update({f"{name}:{k}": v for k, v in res.summary.excluded.items()})
            summary.warnings.update({f"{name}:{k}": v for k, v in res.summary.warnings.items()})
            parts[name] = load_slices(work / name)
        combined = combine_s1(parts["ixi"], parts["atlas"])
        write_set(combined, out, overwrite)
        n = len(combined)
        del combined, parts
    finally:
        remove_tree(work)
    return Outcome(path=out, summary=summary, n_slices=n, seconds=time.perf_counter() - t0)
