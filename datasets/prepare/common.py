"""Shared helpers for the prepare scripts: NIfTI reading and checks, intensity
normalisation, pad/resize, per-subject parallel processing, bounded-memory assembly.

Errors come in two kinds:

* ``SubjectError`` -- one subject's input is bad (unreadable file, missing modality, NaN,
  ...). The subject is skipped and listed in the summary; ``--strict`` turns any skip
  into a ``PrepareError``.
* ``PrepareError`` -- the preparation as a whole cannot go on (a bad option, an output
  folder that cannot be written, no usable subject, duplicate subject ids, a split CSV
  naming subjects that are missing, ...).

Input that is usable but suspicious (lesion voxels outside the brain, a lesion the resize
erases) is kept and listed as a warning, counted in the manifest's ``summary``.

Every message names the file it is about.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import nibabel as nib
import numpy as np
import pandas as pd

from datasets.format import SliceSet, array_fingerprint, save_slices

PREPARE_VERSION = 2  # 2: lesion masks resized with the peers' "value > 0" rule by default

# How a lesion mask is brought to the output resolution (area interpolation, then):
#   "nonzero"   -- a pixel is lesion if its resized value is > 0, i.e. it overlaps any lesion
#                  voxel (IterMask2: monai Resized(mode="area") then seg > 0; THOR: masks > 0);
#   "threshold" -- a pixel is lesion if the lesion covers >= mask_threshold of it (this suite's
#                  rule before; shrinks small lesions and can erase them).
LESION_MASK_RULES = ("nonzero", "threshold")


class PrepareError(RuntimeError):
    """The preparation cannot produce a valid set; the message says why (and names files)."""


class SubjectError(ValueError):
    """One subject's input is unusable; the subject is skipped (or ``--strict`` fails)."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


# --------------------------------------------------------------------------- NIfTI input


@dataclass
class Volume:
    path: str
    data: np.ndarray  # float32, 3-D
    affine: np.ndarray  # 4 x 4


def load_volume(path: str | os.PathLike, canonical: bool = False) -> Volume:
    """Read a 3-D NIfTI as float32; raise ``SubjectError`` naming the file on any problem.

    ``canonical=True`` reorients to the closest RAS+ voxel order first (flips/permutations
    only, no resampling).
    """
    path = Path(path)
    if not path.is_file():
        raise SubjectError(path, "file not found")
    try:
        img = nib.load(str(path))
        if canonical:
            img = nib.as_closest_canonical(img)
        data = img.get_fdata(dtype=np.float32)
    except Exception as exc:  # nibabel raises many types (ImageFileError, EOFError, zlib.error, OSError, ...)
        raise SubjectError(path, f"cannot be read as NIfTI (unreadable or truncated: {type(exc).__name__}: {exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise SubjectError(path, f"expected a 3-D volume, got shape {data.shape}")
    if not np.isfinite(data).all():
        n_bad = int((~np.isfinite(data)).sum())
        raise SubjectError(path, f"{n_bad} NaN/inf voxel(s)")
    return Volume(str(path), data, np.asarray(img.affine, dtype=np.float64))


def check_same_grid(ref: Volume, other: Volume, atol: float) -> None:
    """Images and mask of one subject must share shape and affine."""
    if ref.data.shape != other.data.shape:
        raise SubjectError(other.path, f"shape {other.data.shape} differs from {Path(ref.path).name} {ref.data.shape}")
    if not np.allclose(ref.affine, other.affine, atol=atol):
        raise SubjectError(
            other.path,
            f"affine differs from {Path(ref.path).name} (max abs difference "
            f"{np.abs(ref.affine - other.affine).max():.4g} > {atol})",
        )


def check_labels(vol: Volume, allowed: Sequence[int]) -> np.ndarray:
    """Integer label volume with values in ``allowed``; returns it as uint8."""
    values = np.unique(vol.data)
    if not np.all(values == np.round(values)):
        raise SubjectError(vol.path, f"label volume holds non-integer values (e.g. {values[values != np.round(values)][:3].tolist()})")
    bad = sorted(set(values.astype(np.int64).tolist()) - set(int(a) for a in allowed))
    if bad:
        raise SubjectError(vol.path, f"label value(s) {bad} outside the expected set {sorted(allowed)}")
    return vol.data.astype(np.uint8)


def check_axial_order(vol: Volume) -> tuple[str, str, str]:
    """Voxel axes 0, 1 must be in-plane (L/R, A/P) and axis 2 superior/inferior."""
    codes = nib.aff2axcodes(vol.affine)
    if codes[0] not in "LR" or codes[1] not in "AP" or codes[2] not in "SI":
        raise SubjectError(vol.path, f"voxel axes are {''.join(codes)}; expected x=L/R, y=A/P, z=S/I (axial slices along the third axis)")
    return codes  # type: ignore[return-value]


def to_display(slice2d: np.ndarray, codes: Sequence[str]) -> np.ndarray:
    """Axial slice (x, y) -> rows anterior..posterior, columns patient left..right.

    Flips only; the pixel grid (and every area) is unchanged.
    """
    s = slice2d
    if codes[0] == "L":  # make x increase towards the right
        s = s[::-1, :]
    if codes[1] == "P":  # make y increase towards anterior
        s = s[:, ::-1]
    return np.ascontiguousarray(s.T[::-1, :])


# --------------------------------------------------------------------------- intensities


def brain_percentiles(data: np.ndarray, brain: np.ndarray, qs: Sequence[float]) -> list[float]:
    vals = data[brain]
    return [float(v) for v in np.percentile(vals, list(qs))]


def percentile_scale(data: np.ndarray, brain: np.ndarray, low: float, high: float, background: float = 0.0) -> np.ndarray:
    """Map brain intensities [low, high] linearly to [0, 1], clip, set background."""
    span = high - low
    out = (data - low) / (span if span > 0 else 1.0)
    np.clip(out, 0.0, 1.0, out=out)
    out[~brain] = background
    return out.astype(np.float32, copy=False)


# --------------------------------------------------------------------------- geometry


def pad_to_square(img: np.ndarray, value: float = 0.0) -> np.ndarray:
    """Centre ``img`` (H x W) in a square of side max(H, W), filled with ``value``."""
    h, w = img.shape
    n = max(h, w)
    top, left = (n - h) // 2, (n - w) // 2
    out = np.full((n, n), value, dtype=img.dtype)
    out[top : top + h, left : left + w] = img
    return out


@lru_cache(maxsize=32)
def area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out x n_in) weights of exact area (box) interpolation along one axis.

    Output pixel i covers input coordinates [i*s, (i+1)*s), s = n_in / n_out; its value is
    the overlap-weighted mean of the input pixels (rows sum to 1). Identity when n_in == n_out.
    """
    s = n_in / n_out
    starts = np.arange(n_out)[:, None] * s
    ends = starts + s
    j = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(ends, j + 1) - np.maximum(starts, j), 0.0, None)
    m = overlap / overlap.sum(axis=1, keepdims=True)
    m.flags.writeable = False
    return m


def resize_area(img: np.ndarray, size: int) -> np.ndarray:
    """Area-interpolate a square-or-not 2-D array to ``size`` x ``size``."""
    h, w = img.shape
    rows, cols = area_matrix(h, size), area_matrix(w, size)
    return (rows @ img.astype(np.float64) @ cols.T).astype(np.float32)


def resize_mask(mask: np.ndarray, size: int, threshold: float = 0.5) -> np.ndarray:
    """Binary mask: area interpolation of the 0/1 mask, then ``>= threshold``."""
    return (resize_area(mask.astype(np.float32), size) >= threshold).astype(np.uint8)


@lru_cache(maxsize=32)
def overlap_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out x n_in) 0/1: output pixel i overlaps input pixel j, i.e. floor(i n_in / n_out)
    <= j < ceil((i + 1) n_in / n_out) -- exactly the pixels with a non-zero weight in
    ``area_matrix`` (and in torch's adaptive average pooling), in integer arithmetic."""
    i = np.arange(n_out)[:, None]
    j = np.arange(n_in)[None, :]
    lo = (i * n_in) // n_out
    hi = -((-(i + 1) * n_in) // n_out)
    m = ((j >= lo) & (j < hi)).astype(np.int64)
    m.flags.writeable = False
    return m


def resize_mask_nonzero(mask: np.ndarray, size: int) -> np.ndarray:
    """Binary mask: a pixel is 1 where its area-resized value is > 0 (it overlaps a 1)."""
    h, w = mask.shape
    counts = overlap_matrix(h, size) @ (mask != 0).astype(np.int64) @ overlap_matrix(w, size).T
    return (counts > 0).astype(np.uint8)


def resize_lesion(mask: np.ndarray, size: int, rule: str, threshold: float) -> np.ndarray:
    """Lesion mask at ``size`` under ``rule`` (see ``LESION_MASK_RULES``)."""
    if rule == "nonzero":
        return resize_mask_nonzero(mask, size)
    if rule == "threshold":
        return resize_mask(mask, size, threshold)
    raise PrepareError(f"lesion_mask_rule must be one of {LESION_MASK_RULES}, got {rule!r}")


def check_common_config(cfg: Any) -> None:
    """Options every preparation shares; a bad value stops the run before any subject."""
    if not isinstance(cfg.resolution, (int, np.integer)) or isinstance(cfg.resolution, bool) or cfg.resolution < 1:
        raise PrepareError(f"--resolution must be a positive integer (output slices are resolution x resolution), got {cfg.resolution!r}")
    if cfg.lesion_mask_rule not in LESION_MASK_RULES:
        raise PrepareError(f"lesion_mask_rule must be one of {', '.join(LESION_MASK_RULES)}, got {cfg.lesion_mask_rule!r}")
    if not 0 < cfg.mask_threshold <= 1:
        raise PrepareError(f"mask_threshold must be in (0, 1], got {cfg.mask_threshold!r}")
    if not 0 < cfg.max_brain_fraction <= 1:
        raise PrepareError(f"max_brain_fraction must be in (0, 1], got {cfg.max_brain_fraction!r}")


def check_brain_fraction(brain2d: np.ndarray, limit: float, path: str, where: str) -> None:
    """A skull-stripped brain fills well under the whole slice (about 30-40 % of BraTS's and
    the MNI grid's field of view); a mask covering most of it means skull or a noisy
    non-zero background was counted as brain."""
    fraction = float(np.count_nonzero(brain2d)) / brain2d.size
    if fraction > limit:
        raise SubjectError(
            path,
            f"brain mask covers {fraction:.0%} of {where} (limit {limit:.0%}): the input looks not "
            "skull-stripped or has a non-zero background; skull-strip it first (see docs/data-preparation.md)",
        )


def check_not_constant(values: np.ndarray, path: str, what: str) -> None:
    """A modality with one value in the whole brain has no contrast to normalise."""
    if values.size and values.min() == values.max():
        raise SubjectError(path, f"{what} is constant inside the brain (every voxel {float(values.min()):g}); no contrast to use")


def lesion_warnings(native: np.ndarray, brain2d: np.ndarray, resized: np.ndarray, rule: str, size: int, where: str) -> list[str]:
    """Counted warnings for a slice's lesion: voxels outside the brain, erased by the resize."""
    out = []
    n_lesion = int(np.count_nonzero(native))
    outside = int(np.count_nonzero((native != 0) & (brain2d == 0)))
    if outside:
        out.append(f"{where}: {outside} of {n_lesion} lesion voxel(s) lie outside the brain mask")
    if n_lesion and not resized.any():
        out.append(f"{where}: the lesion ({n_lesion} native voxel(s)) vanishes at {size}x{size} under lesion_mask_rule={rule!r}")
    return out


def check_writable(out: Path) -> None:
    """Fail before any work if ``out``'s folder cannot be created or written to."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".probe")
        probe.close()
    except OSError as exc:
        raise PrepareError(f"{out}: cannot write the output there ({exc.strerror or exc})") from exc


def size_bucket(area: int, edges: Sequence[float], names: Sequence[str], left_open: bool) -> str:
    """Bucket name for a lesion area.

    ``edges`` e0 < e1 < ... split areas into len(edges)+1 ranges; the first range (area
    below e0) gets ``names[0]``. ``left_open``: ranges (e_k, e_k+1] (S1); else [e_k, e_k+1) (S2).
    """
    k = 0
    for e in edges:
        if (area > e) if left_open else (area >= e):
            k += 1
    return names[k]


# --------------------------------------------------------------------------- per-subject results


@dataclass
class SliceRecord:
    slice_index: int
    image: np.ndarray  # C x H x W float32
    lesion: np.ndarray  # H x W uint8
    brain: np.ndarray  # H x W uint8
    split: str
    info: dict[str, Any] = field(default_factory=dict)  # extra table columns (normalisation values, ...)


@dataclass
class SubjectResult:
    subject_id: str
    slices: list[SliceRecord] = field(default_factory=list)
    error: str | None = None  # bad input: skipped (fails with --strict)
    excluded: str | None = None  # valid input the protocol rule leaves out (e.g. no tumour in range)
    warnings: list[str] = field(default_factory=list)  # kept, but worth a look (counted in the manifest)


def run_subject(fn: Callable[..., SubjectResult], args: tuple) -> SubjectResult:
    """Call ``fn(*args)``; a ``SubjectError`` becomes a skipped subject (id = args[1])."""
    try:
        return fn(*args)
    except SubjectError as exc:
        return SubjectResult(subject_id=str(args[1]), error=str(exc))


def single_threaded_blas() -> Any:
    """Per-subject processes are the parallelism: one BLAS thread each (small matrix
    products with many BLAS threads on a shared machine are ~30x slower)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional; only speed is affected
        return nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _init_worker() -> None:
    single_threaded_blas()  # stays in force for the worker's lifetime


def _star(job: tuple) -> SubjectResult:
    fn, args = job
    return run_subject(fn, args)


def map_subjects(
    fn: Callable[..., SubjectResult], jobs: Sequence[tuple], workers: int, desc: str, progress: bool = True
) -> Iterable[SubjectResult]:
    """Yield ``fn(*job)`` for each job, in job order; parallel over processes when workers > 1."""
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc=desc, unit="subject", disable=not progress)
    try:
        if workers <= 1:
            for job in jobs:
                with single_threaded_blas():
                    result = run_subject(fn, job)
                yield result
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker) as pool:
                for result in pool.map(_star, [(fn, job) for job in jobs], chunksize=1):
                    yield result
                    bar.update()
    finally:
        bar.close()


# --------------------------------------------------------------------------- assembly


class SliceSpool:
    """Append slices to raw files in a scratch directory; memory holds only the table.

    ``finish()`` memory-maps the spooled arrays as a ``SliceSet`` (so ``save_slices``
    streams them into the final set).
    """

    def __init__(self, directory: Path, channels: int, size: int) -> None:
        self.directory = directory
        self.channels, self.size = channels, size
        self.rows: list[dict[str, Any]] = []
        self._files = {n: open(directory / f"{n}.bin", "wb") for n in ("images", "lesions", "brains")}

    def add(self, subject_id: str, rec: SliceRecord, extra: dict[str, Any]) -> None:
        if rec.image.shape != (self.channels, self.size, self.size):
            raise PrepareError(f"internal: slice of {subject_id} has shape {rec.image.shape}")
        self._files["images"].write(np.ascontiguousarray(rec.image, dtype=np.float32).tobytes())
        self._files["lesions"].write(np.ascontiguousarray(rec.lesion, dtype=np.uint8).tobytes())
        self._files["brains"].write(np.ascontiguousarray(rec.brain, dtype=np.uint8).tobytes())
        self.rows.append(
            {
                "subject_id": subject_id,
                "slice_index": rec.slice_index,
                "split": rec.split,
                "lesion_area": int(rec.lesion.sum()),
                **extra,
                **rec.info,
            }
        )

    def finish(self, modalities: list[str], manifest: dict[str, Any]) -> SliceSet:
        for f in self._files.values():
            f.close()
        n, s = len(self.rows), self.size

        def mm(name: str, dtype: Any, shape: tuple) -> np.ndarray:
            if n == 0:
                return np.zeros(shape, dtype=dtype)
            return np.memmap(self.directory / f"{name}.bin", dtype=dtype, mode="r", shape=shape)

        return SliceSet(
            images=mm("images", np.float32, (n, self.channels, s, s)),
            lesion_masks=mm("lesions", np.uint8, (n, s, s)),
            brain_masks=mm("brains", np.uint8, (n, s, s)),
            table=pd.DataFrame(self.rows, columns=None if self.rows else ["subject_id", "slice_index", "split", "lesion_area"]),
            modalities=modalities,
            manifest=manifest,
        )

    def close(self) -> None:
        for f in self._files.values():
            f.close()


@dataclass
class Summary:
    """What happened to each subject found in the raw folder."""

    found: int = 0
    used: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # subject -> reason (bad input)
    excluded: dict[str, str] = field(default_factory=dict)  # subject -> reason (protocol rule)
    warnings: dict[str, list[str]] = field(default_factory=dict)  # subject -> warnings (kept)

    @property
    def n_warnings(self) -> int:
        return sum(len(w) for w in self.warnings.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "subjects_found": self.found,
            "subjects_used": self.used,
            "skipped": dict(sorted(self.skipped.items())),
            "excluded_by_rule": dict(sorted(self.excluded.items())),
            "n_warnings": self.n_warnings,
            "warnings": dict(sorted(self.warnings.items())),
        }

    def report(self, name: str) -> str:
        lines = [
            f"[{name}] subjects found: {self.found}, used: {self.used}, skipped (bad input): {len(self.skipped)}, "
            f"excluded by protocol rule: {len(self.excluded)}, warnings: {self.n_warnings}"
        ]
        for sid, reason in sorted(self.skipped.items()):
            lines.append(f"  skipped  {sid}: {reason}")
        for sid, reason in sorted(self.excluded.items()):
            lines.append(f"  excluded {sid}: {reason}")
        for sid, items in sorted(self.warnings.items()):
            lines += [f"  warning  {sid}: {w}" for w in items]
        return "\n".join(lines)


def config_dict(cfg: Any) -> dict[str, Any]:
    d = asdict(cfg)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def finalize_manifest(manifest: dict[str, Any], slices: SliceSet) -> dict[str, Any]:
    """Fingerprint = hash of the arrays, the table and the preprocessing parameters."""
    base = array_fingerprint(slices.images, slices.lesion_masks, slices.brain_masks)
    table_csv = slices.table.to_csv(index=False)
    params = json.dumps(manifest.get("preprocessing", {}), sort_keys=True, default=str)
    digest = hashlib.sha256((base + table_csv + params).encode()).hexdigest()[:16]
    manifest["fingerprint"] = digest
    return manifest


def collect(
    results: Iterable[SubjectResult],
    spool: SliceSpool,
    summary: Summary,
    extra: Callable[[SliceRecord], dict[str, Any]],
) -> None:
    """Feed per-subject results into the spool and the summary (in subject order)."""
    for res in results:
        if res.error is not None:
            summary.skipped[res.subject_id] = res.error
            continue
        if res.excluded is not None:
            summary.excluded[res.subject_id] = res.excluded
        if res.warnings:
            summary.warnings[res.subject_id] = list(res.warnings)
        if res.slices:
            summary.used += 1
        for rec in res.slices:
            spool.add(res.subject_id, rec, extra(rec))


def enforce_strict(summary: Summary, name: str, strict: bool) -> None:
    if strict and summary.skipped:
        first = "; ".join(f"{k}: {v}" for k, v in list(sorted(summary.skipped.items()))[:5])
        raise PrepareError(f"[{name}] --strict: {len(summary.skipped)} subject(s) skipped for bad input: {first}")


def scratch_dir(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".scratch"))


def write_set(slices: SliceSet, out: Path, overwrite: bool) -> Path:
    """Atomic write via ``save_slices`` (temp dir + rename)."""
    return save_slices(slices, out, overwrite=overwrite)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def find_duplicates(pairs: Iterable[tuple[str, Path]]) -> dict[str, list[Path]]:
    seen: dict[str, list[Path]] = {}
    for sid, p in pairs:
        seen.setdefault(sid, []).append(p)
    return {k: v for k, v in seen.items() if len(v) > 1}


def raise_duplicates(dups: dict[str, list[Path]], what: str) -> None:
    if dups:
        sid, paths = next(iter(sorted(dups.items())))
        raise PrepareError(
            f"duplicate {what} subject id(s) {sorted(dups)[:5]}: e.g. {sid} at {', '.join(str(p) for p in paths)}; "
            "keep one copy per subject under --raw"
        )


# --------------------------------------------------------------------------- driver


@dataclass
class Outcome:
    """What one preparation produced."""

    path: Path
    summary: Summary
    n_slices: int
    seconds: float

    @property
    def subjects_per_second(self) -> float:
        return self.summary.found / self.seconds if self.seconds > 0 else float("inf")


def run_preparation(
    name: str,
    fn: Callable[..., SubjectResult],
    jobs: Sequence[tuple],
    *,
    channels: int,
    size: int,
    manifest: dict[str, Any],
    extra: Callable[[SliceRecord], dict[str, Any]],
    out: str | os.PathLike,
    workers: int = 1,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    summary: Summary | None = None,
    check: Callable[[SliceSet], None] | None = None,
) -> Outcome:
    """Process ``jobs`` (one per subject) with ``fn``, then write the set atomically.

    ``fn(*job)`` returns a ``SubjectResult``; ``job[1]`` is the subject id. Slices are spooled
    to a scratch directory next to ``out`` (removed afterwards), so memory holds one
    subject's volumes per worker plus the slice table.
    """
    import time

    out = Path(out)
    if out.exists() and not overwrite:
        raise PrepareError(f"{out}: already exists (pass --overwrite to replace it)")
    if workers < 1:
        raise PrepareError(f"--workers must be >= 1, got {workers}")
    check_writable(out)
    t0 = time.perf_counter()
    summary = summary or Summary()
    summary.found += len(jobs)
    scratch = scratch_dir(out)
    spool = SliceSpool(scratch, channels, size)
    try:
        collect(map_subjects(fn, jobs, workers, desc=name, progress=progress), spool, summary, extra)
        enforce_strict(summary, name, strict)
        manifest = dict(manifest)
        manifest["summary"] = summary.as_dict()
        manifest["prepare_version"] = PREPARE_VERSION
        slices = spool.finish(list(manifest["modalities"]), manifest)
        if len(slices) == 0:
            reasons = "; ".join(f"{k}: {v}" for k, v in list(sorted(summary.skipped.items()))[:5])
            raise PrepareError(f"[{name}] no usable slice from {summary.found} subject(s)" + (f" -- {reasons}" if reasons else ""))
        if check is not None:
            check(slices)
        finalize_manifest(slices.manifest, slices)
        write_set(slices, out, overwrite)
        n = len(slices)
        del slices
    finally:
        spool.close()
        remove_tree(scratch)
    return Outcome(path=out, summary=summary, n_slices=n, seconds=time.perf_counter() - t0)
