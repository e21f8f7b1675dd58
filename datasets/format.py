"""The prepared-slice format and its loader.

A prepared set is a directory::

    images.npy        N x C x H x W float32   (C = modalities, in manifest order)
    lesion_masks.npy  N x H x W uint8          (1 = lesion)
    brain_masks.npy   N x H x W uint8          (1 = brain)
    slices.csv        one row per slice: subject_id, slice_index, split, lesion_area
    manifest.json     name, modalities, resolution, protocol hints, every preprocessing choice

Arrays are opened with memory mapping, so a large preparation streams instead of
loading. ``save_slices`` writes into a temporary sibling directory and renames it into
place, so an interrupted write never leaves a set that loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

ARRAY_FILES = ("images.npy", "lesion_masks.npy", "brain_masks.npy")
TABLE_FILE = "slices.csv"
MANIFEST_FILE = "manifest.json"
REQUIRED_COLUMNS = ("subject_id", "slice_index", "split", "lesion_area")
SPLITS = ("train", "val", "test")


class DatasetFormatError(ValueError):
    """A prepared set on disk is missing a file or holds inconsistent data."""


@dataclass
class SliceSet:
    """Slices of one prepared set (or a view of a split / modality of one)."""

    images: np.ndarray  # N x C x H x W float32 (possibly a memory map)
    lesion_masks: np.ndarray  # N x H x W uint8
    brain_masks: np.ndarray  # N x H x W uint8
    table: pd.DataFrame  # REQUIRED_COLUMNS (+ anything else), index 0..N-1
    modalities: list[str]
    manifest: dict[str, Any] = field(default_factory=dict)
    _fingerprint: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if self.images.ndim != 4:
            raise DatasetFormatError(f"images must be N x C x H x W, got shape {self.images.shape}")
        spatial = self.images.shape[2:]
        for name, arr in (("lesion_masks", self.lesion_masks), ("brain_masks", self.brain_masks)):
            if arr.shape != (n, *spatial):
                raise DatasetFormatError(f"{name} must be N x H x W = {(n, *spatial)}, got {arr.shape}")
        if len(self.table) != n:
            raise DatasetFormatError(f"slices table has {len(self.table)} rows for {n} slices")
        if len(self.modalities) != self.images.shape[1]:
            raise DatasetFormatError(f"{len(self.modalities)} modality names for {self.images.shape[1]} channels")
        self.table = self.table.reset_index(drop=True)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def resolution(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def lesion_areas(self) -> np.ndarray:
        return self.table["lesion_area"].to_numpy()

    def subset(self, index: Sequence[int] | np.ndarray) -> "SliceSet":
        """Rows ``index`` (materialised in memory)."""
        index = np.asarray(index, dtype=np.int64)
        return SliceSet(
            images=np.ascontiguousarray(self.images[index]),
            lesion_masks=np.ascontiguousarray(self.lesion_masks[index]),
            brain_masks=np.ascontiguousarray(self.brain_masks[index]),
            table=self.table.iloc[index].reset_index(drop=True),
            modalities=list(self.modalities),
            manifest=self.manifest,
        )

    def split(self, name: str) -> "SliceSet":
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; splits are {SPLITS}")
        return self.subset(np.flatnonzero(self.table["split"].to_numpy() == name))

    def modality(self, name: str) -> "SliceSet":
        """A one-channel view holding only modality ``name``."""
        if name not in self.modalities:
            raise ValueError(f"modality {name!r} not in this set; it has {self.modalities}")
        c = self.modalities.index(name)
        return SliceSet(
            images=self.images[:, c : c + 1],
            lesion_masks=self.lesion_masks,
            brain_masks=self.brain_masks,
            table=self.table,
            modalities=[name],
            manifest=self.manifest,
        )

    def fingerprint(self) -> str:
        """Content hash of these slices: their arrays, table rows, modalities and preprocessing.

        Computed from the arrays themselves (once per object), never taken from the
        manifest: a set edited in place gets a new fingerprint, so resume and the
        checkpoint cache never trust results made from other bytes.
        """
        if self._fingerprint is None:
            base = array_fingerprint(self.images, self.lesion_masks, self.brain_masks)
            extra = json.dumps(
                {"n": len(self), "modalities": self.modalities, "ids": _table_digest(self.table),
                 "preprocessing": self.manifest.get("preprocessing")},
                sort_keys=True, default=str,
            )
            self._fingerprint = hashlib.sha256((base + extra).encode()).hexdigest()[:16]
        return self._fingerprint


def _table_digest(table: pd.DataFrame) -> str:
    cols = [c for c in REQUIRED_COLUMNS if c in table]
    return hashlib.sha256(table[cols].to_csv(index=False).encode()).hexdigest()[:16]


def array_fingerprint(*arrays: np.ndarray, chunk: int = 64) -> str:
    """SHA-256 over the bytes of the arrays, read in chunks of rows (memory stays bounded)."""
    digest = hashlib.sha256()
    for arr in arrays:
        digest.update(str((arr.shape, str(arr.dtype))).encode())
        for start in range(0, arr.shape[0], chunk):
            digest.update(np.ascontiguousarray(arr[start : start + chunk]).tobytes())
    return digest.hexdigest()[:16]


#: Relative tolerance when the recorded per-channel statistics are compared at load.
STATS_RTOL = 1e-3
#: A temporary folder of an interrupted write older than this is removed by the next write.
STALE_TEMP_SECONDS = 6 * 3600


@dataclass
class ContentScan:
    """What one streaming pass over a set's arrays found."""

    channel_stats: dict[str, dict[str, float]]  # modality -> brain mean / std / min / max
    non_finite: int
    mask_values: set[int]
    empty_brain_slices: list[int]
    train_lesion_slices: list[int]


def scan_contents(slices: SliceSet, chunk: int = 256) -> ContentScan:
    """Per-channel statistics inside the brain and the facts :func:`check_contents` needs.

    Streams the (possibly memory-mapped) arrays in chunks of slices; sums in float64.
    """
    n, c = slices.images.shape[:2]
    total = np.zeros(c)
    squares = np.zeros(c)
    low = np.full(c, np.inf)
    high = np.full(c, -np.inf)
    count = 0
    non_finite = 0
    mask_values: set[int] = set()
    empty: list[int] = []
    train_lesions: list[int] = []
    is_train = slices.table["split"].astype(str).to_numpy() == "train"
    for start in range(0, n, chunk):
        images = np.asarray(slices.images[start : start + chunk], dtype=np.float64)
        brains = np.asarray(slices.brain_masks[start : start + chunk])
        lesions = np.asarray(slices.lesion_masks[start : start + chunk])
        non_finite += int(np.count_nonzero(~np.isfinite(images)))
        mask_values |= set(np.unique(brains).tolist()) | set(np.unique(lesions).tolist())
        inside = brains != 0
        empty += [start + i for i in np.flatnonzero(~inside.reshape(len(inside), -1).any(axis=1))]
        has_lesion = lesions.reshape(len(lesions), -1).any(axis=1)
        train_lesions += [start + i for i in np.flatnonzero(has_lesion & is_train[start : start + chunk])]
        values = np.where(np.isfinite(images), images, 0.0).transpose(1, 0, 2, 3)[:, inside]  # C x brain pixels
        if values.shape[1]:
            total += values.sum(axis=1)
            squares += (values**2).sum(axis=1)
            low = np.minimum(low, values.min(axis=1))
            high = np.maximum(high, values.max(axis=1))
            count += values.shape[1]
    stats = {}
    for k, name in enumerate(slices.modalities):
        mean = total[k] / count if count else float("nan")
        std = float(np.sqrt(max(squares[k] / count - mean**2, 0.0))) if count else float("nan")
        stats[str(name)] = {"brain_mean": float(mean), "brain_std": std, "brain_min": float(low[k]), "brain_max": float(high[k])}
    return ContentScan(stats, non_finite, mask_values, empty, train_lesions)


def check_contents(slices: SliceSet, where: str, scan: ContentScan | None = None) -> ContentScan:
    """Refuse data no method can be evaluated on honestly; errors name ``where`` and the problem.

    Finite images; masks holding only 0 and 1; a brain in every slice; no lesion pixel in a
    training slice; no channel constant inside the brain; and, when the preparation
    recorded per-channel statistics, channels still named as they were prepared (a swap of
    two names in the manifest would otherwise score the wrong contrast silently).
    """
    scan = scan or scan_contents(slices)
    if scan.non_finite:
        raise DatasetFormatError(f"{where}: images hold {scan.non_finite} NaN or infinite value(s)")
    if not scan.mask_values <= {0, 1}:
        raise DatasetFormatError(f"{where}: masks must hold only 0 and 1, found values {sorted(scan.mask_values)}")
    if scan.empty_brain_slices:
        raise DatasetFormatError(f"{where}: {len(scan.empty_brain_slices)} slice(s) have an empty brain mask (first: row {scan.empty_brain_slices[0]})")
    if scan.train_lesion_slices:
        raise DatasetFormatError(
            f"{where}: {len(scan.train_lesion_slices)} training slice(s) carry lesion pixels (first: row "
            f"{scan.train_lesion_slices[0]}); training must see healthy slices only"
        )
    for name, stats in scan.channel_stats.items():
        if not stats["brain_max"] > stats["brain_min"]:
            raise DatasetFormatError(f"{where}: channel {name!r} is constant inside the brain ({stats['brain_min']:g})")
    recorded = slices.manifest.get("channel_stats")
    if isinstance(recorded, dict):
        for name, stats in scan.channel_stats.items():
            expected = recorded.get(name)
            if not isinstance(expected, dict):
                raise DatasetFormatError(f"{where}: the manifest names channel {name!r}, which the preparation did not record ({sorted(recorded)})")
            if not all(np.isclose(stats[k], expected.get(k, np.nan), rtol=STATS_RTOL, atol=1e-6) for k in ("brain_mean", "brain_std")):
                closest = min(recorded, key=lambda m: abs(recorded[m].get("brain_mean", np.inf) - stats["brain_mean"]))
                raise DatasetFormatError(
                    f"{where}: channel {name!r} has brain mean {stats['brain_mean']:.4g} and std {stats['brain_std']:.4g}, but the "
                    f"preparation recorded {expected.get('brain_mean', float('nan')):.4g} / {expected.get('brain_std', float('nan')):.4g} "
                    f"for {name!r} (closest recorded: {closest!r}); were the modality names in the manifest reordered?"
                )
    return scan


def remove_stale_temporaries(directory: Path, max_age: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Delete temporary folders of writes into ``directory`` that were interrupted long ago."""
    removed = []
    if not directory.parent.is_dir():
        return removed
    for tmp in directory.parent.glob(f".{directory.name}.*.tmp"):
        try:
            if tmp.is_dir() and time.time() - tmp.stat().st_mtime > max_age:
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp)
        except OSError:
            continue
    return removed


def save_slices(slices: SliceSet, directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``slices`` in the prepared format, atomically (temp dir + rename)."""
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory}: already exists (pass overwrite=True to replace it)")
    directory.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(directory)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp is owner-only; the set should be shared like any folder
    try:
        np.save(tmp / "images.npy", np.asarray(slices.images, dtype=np.float32))
        np.save(tmp / "lesion_masks.npy", np.asarray(slices.lesion_masks, dtype=np.uint8))
        np.save(tmp / "brain_masks.npy", np.asarray(slices.brain_masks, dtype=np.uint8))
        slices.table.to_csv(tmp / TABLE_FILE, index=False)
        manifest = dict(slices.manifest)
        manifest["modalities"] = list(slices.modalities)
        manifest["n_slices"] = len(slices)
        manifest["resolution"] = list(slices.resolution)
        manifest.setdefault(
            "fingerprint", array_fingerprint(slices.images, slices.lesion_masks, slices.brain_masks)
        )
        manifest["channel_stats"] = scan_contents(slices).channel_stats  # checked again at every load
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str))
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_slices(directory: str | os.PathLike, mmap: bool = True, check: bool = True) -> SliceSet:
    """Open a prepared set, checking every file and (``check``) its contents; errors name the file and the problem."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetFormatError(f"{directory}: not a directory (expected a prepared slice set)")
    for name in (*ARRAY_FILES, TABLE_FILE, MANIFEST_FILE):
        if not (directory / name).is_file():
            raise DatasetFormatError(f"{directory / name}: missing; a prepared set needs {', '.join((*ARRAY_FILES, TABLE_FILE, MANIFEST_FILE))}")
    manifest_path = directory / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetFormatError(f"{manifest_path}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise DatasetFormatError(f"{manifest_path}: must hold a JSON object, got a {type(manifest).__name__}")
    arrays = {}
    for name in ARRAY_FILES:
        path = directory / name
        try:
            arrays[name] = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise DatasetFormatError(f"{path}: cannot be read as a .npy array ({exc})") from exc
    images, lesions, brains = (arrays[n] for n in ARRAY_FILES)
    checks = [
        ("images.npy", images, 4, np.float32),
        ("lesion_masks.npy", lesions, 3, np.uint8),
        ("brain_masks.npy", brains, 3, np.uint8),
    ]
    for name, arr, ndim, dtype in checks:
        if arr.ndim != ndim:
            raise DatasetFormatError(f"{directory / name}: expected {ndim} dimensions, got shape {arr.shape}")
        if arr.dtype != dtype:
            raise DatasetFormatError(f"{directory / name}: expected dtype {np.dtype(dtype).name}, got {arr.dtype}")
    n, _, h, w = images.shape
    for name, arr in (("lesion_masks.npy", lesions), ("brain_masks.npy", brains)):
        if arr.shape != (n, h, w):
            raise DatasetFormatError(f"{directory / name}: shape {arr.shape} does not match images.npy (N, H, W) = {(n, h, w)}")
    table_path = directory / TABLE_FILE
    try:
        table = pd.read_csv(table_path, dtype={"subject_id": str})
    except Exception as exc:  # pandas raises several types
        raise DatasetFormatError(f"{table_path}: cannot be read as CSV ({exc})") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise DatasetFormatError(f"{table_path}: missing column(s) {', '.join(missing)}")
    if len(table) != n:
        raise DatasetFormatError(f"{table_path}: {len(table)} rows, but images.npy holds {n} slices")
    bad_splits = sorted(set(table["split"].astype(str)) - set(SPLITS))
    if bad_splits:
        raise DatasetFormatError(f"{table_path}: unknown split value(s) {bad_splits}; allowed: {SPLITS}")
    modalities = manifest.get("modalities")
    if not isinstance(modalities, list) or len(modalities) != images.shape[1]:
        raise DatasetFormatError(
            f"{manifest_path}: 'modalities' must list one name per channel ({images.shape[1]}), got {modalities!r}"
        )
    manifest.setdefault("path", str(directory.resolve()))
    slices = SliceSet(images=images, lesion_masks=lesions, brain_masks=brains, table=table, modalities=modalities, manifest=manifest)
    if check:
        check_contents(slices, str(directory))
    return slices


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
