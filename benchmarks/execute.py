"""Running jobs: fit (or reuse a cached checkpoint), score, evaluate, write one record.

``run_group`` is the unit of work of every executor: a list of jobs that differ only in
their variant, so a variant that changes only inference-time knobs reuses the model its
group trained (or the checkpoint on disk, keyed by the hash of training config + data
fingerprint + seed). It takes and returns plain data, so a Ray task can call it as is.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.jobs import Job, inside, safe_component
from benchmarks.progress import report_phase
from benchmarks.records import (
    SCHEMA_VERSION,
    device_info,
    git_commit,
    is_finished,
    library_versions,
    now_iso,
    read_record,
    write_record,
)
from datasets.format import SliceSet
from methods.atomic import atomic_write_text
from methods.base import UADMethod, config_to_dict, resolve_device, stable_hash
from methods.progress import PROGRESS_ENV
from methods.registry import create_method, get_method_class


@dataclass(frozen=True)
class RunContext:
    """Where and how jobs run; plain values so it can be shipped to Ray workers."""

    out: str
    checkpoints: str
    device: str = "auto"
    progress: bool = True
    n_examples: int = 4
    fail_fast: bool = False
    threads: int | None = None


@lru_cache(maxsize=4)
def load_data(spec: str) -> SliceSet:
    """``embedded`` (built on first use, cached) or the path of a prepared set."""
    if spec == "embedded":
        from datasets.embedded import load_embedded

        return load_embedded()
    from datasets.format import load_slices

    return load_slices(spec)


def data_name(spec: str) -> str:
    if spec == "embedded":
        return "embedded"
    data = load_data(spec)
    return str(data.manifest.get("name") or Path(spec).name)


@dataclass
class _Splits:
    train: SliceSet
    val: SliceSet | None
    test: SliceSet


def paired_split(data: SliceSet, modalities: list[str], split: str) -> SliceSet:
    """Split ``split`` of ``data`` with the channels ``modalities`` in that order (one copy of that split only)."""
    missing = [m for m in modalities if m not in data.modalities]
    if missing:
        raise ValueError(f"this data set has modalities {data.modalities}; the method trains on {modalities} and {missing} is missing")
    parts = [data.modality(m).split(split) for m in modalities]
    first = parts[0]
    images = np.concatenate([p.images for p in parts], axis=1)
    return SliceSet(images, first.lesion_masks, first.brain_masks, first.table, list(modalities), manifest=data.manifest)


def _training_splits(job: Job, splits: _Splits, modalities: list[str]) -> _Splits:
    """``splits`` with train and val holding every modality ``fit`` needs (test keeps the job's alone)."""
    if modalities == [job.modality]:
        return splits
    data = load_data(job.data)
    missing = [m for m in modalities if m not in data.modalities]
    if missing:
        raise ValueError(
            f"{job.method} trains on {', '.join(modalities)} for a {job.modality} job, but data {job.data_name!r} "
            f"has no {', '.join(missing)} (its channels: {', '.join(data.modalities)})"
        )
    val = paired_split(data, modalities, "val") if splits.val is not None else None
    paired = _Splits(train=paired_split(data, modalities, "train"), val=val, test=splits.test)
    return dry_run_splits(paired) if job.dry_run else paired


def _splits(job: Job, protocol: Any) -> _Splits:
    view = load_data(job.data).modality(job.modality)
    val = view.split("val")
    splits = _Splits(train=view.split("train"), val=val if len(val) else None, test=protocol.select_test(view.split("test")))
    return dry_run_splits(splits) if job.dry_run else splits


#: Slices a dry run keeps: training (two batches of ``DRY_RUN_BATCH``), validation, test.
DRY_RUN_TRAIN, DRY_RUN_VAL, DRY_RUN_TEST = 4, 2, 2


def _spread(n: int, k: int) -> np.ndarray:
    """At most ``k`` indices evenly spaced over ``0..n-1``, both ends included."""
    return np.unique(np.linspace(0, n - 1, num=min(k, n)).round().astype(np.int64)) if n else np.zeros(0, dtype=np.int64)


def dry_run_splits(splits: _Splits) -> _Splits:
    """The few slices of a dry run: training and validation slices evenly spaced over their
    splits (not all from one end of one volume), and the first test slices with lesion
    pixels (so that every metric of the protocol is computed)."""
    test = splits.test
    lesion = np.flatnonzero(np.asarray(test.lesion_areas()) > 0)
    others = np.setdiff1d(np.arange(len(test)), lesion)
    keep = np.sort(np.concatenate([lesion, others])[:DRY_RUN_TEST])  # lesion slices first; others only if too few
    val = splits.val
    return _Splits(
        train=splits.train.subset(_spread(len(splits.train), DRY_RUN_TRAIN)),
        val=None if val is None else val.subset(_spread(len(val), DRY_RUN_VAL)),
        test=test.subset(keep),
    )


def run_group(jobs: list[Job], ctx: RunContext) -> list[dict[str, Any]]:
    """Run jobs that share protocol, method, data, modality, seed and profile."""
    with _progress_switch(ctx.progress):
        return _run_group(jobs, ctx)


@contextmanager
def _progress_switch(enabled: bool):
    """--no-progress hides every bar, the training loops' too (methods.progress reads the variable)."""
    previous = os.environ.get(PROGRESS_ENV)
    if not enabled:
        os.environ[PROGRESS_ENV] = "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(PROGRESS_ENV, None)
        else:
            os.environ[PROGRESS_ENV] = previous


def _run_group(jobs: list[Job], ctx: RunContext) -> list[dict[str, Any]]:
    from protocols import get_protocol

    if ctx.threads:
        import torch

        torch.set_num_threads(ctx.threads)
    out = Path(ctx.out)
    pending = [job for job in jobs if not is_finished(job.record_path(out))]
    records = [read_record(job.record_path(out)) for job in jobs if job not in pending]
    if not pending:
        return [r for r in records if r is not None]
    protocol = get_protocol(jobs[0].protocol)
    report_phase(_label(pending[0]), "build data")
    splits = _splits(jobs[0], protocol)
    trained: dict[str, tuple[UADMethod, dict[str, Any]]] = {}
    for job in pending:
        path = job.record_path(out)
        with job_lock(path) as owned:
            if not owned:  # another run on the same --out is computing this job right now
                records.append(elsewhere_record(job, "running in another process"))
                continue
            if is_finished(path):  # another run finished it while this one waited
                record = read_record(path)
                records.append(None if record is None else dict(record, status_note="finished by another run"))
                continue
            try:
                record = _run_job(job, ctx, protocol, splits, trained)
            except (Exception, SystemExit) as exc:  # one failing job, even one calling sys.exit, must not stop the others
                if ctx.fail_fast:
                    raise
                record = _failed_record(job, exc)
            write_record(record, path)
        records.append(record)
    return [r for r in records if r is not None]


@contextmanager
def job_lock(record_path: Path):
    """An exclusive, non-blocking lock on one job of one run folder; yields whether it was taken.

    Two runs sharing an ``--out`` (a re-launched command, two cluster jobs) then never
    compute, or claim, the same job: the second one skips it and says so. The lock is
    released by the OS when the process dies, so a killed run leaves no stale lock.
    """
    import fcntl

    lock_path = record_path.with_name(f".{record_path.name}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def elsewhere_record(job: Job, why: str) -> dict[str, Any]:
    """What this run reports for a job another run owns (never written to disk)."""
    return {**_base_record(job), "status": "skipped", "error": f"skipped: {why}", "status_note": why}


def _run_job(job: Job, ctx: RunContext, protocol: Any, splits: _Splits, trained: dict) -> dict[str, Any]:
    device = str(resolve_device(ctx.device))
    profile, overrides = job.settings()  # with a dry run's overrides when it is one
    method = create_method(job.method, profile, seed=job.seed, device=device, **overrides)
    modalities = method.training_modalities(job.modality)
    fit_splits = _training_splits(job, splits, modalities)
    identity = {"training": method.training_key(), "data": fit_splits.train.fingerprint(), "modality": job.modality}
    if modalities != [job.modality]:
        identity["training_modalities"] = modalities  # absent otherwise: single-modality keys stay as they were
    if job.dry_run:
        identity["dry_run"] = True  # never the key of a real run, even where the overrides change nothing
    key = stable_hash(identity)
    # shared by the methods of one training family (DDPM, THOR and AutoDDPM train one network)
    checkpoint = inside(Path(ctx.checkpoints), Path(ctx.checkpoints) / safe_component(method.family()) / key)
    report_phase(_label(job), "fit")
    fitted, fit_info = _fitted_method(method, key, checkpoint, fit_splits, trained)

    report_phase(_label(job), "score test")
    start = time.perf_counter()
    maps = fitted.score(splits.test.images, splits.test.brain_masks, progress=ctx.progress).numpy()
    score_seconds = time.perf_counter() - start
    val_maps = val_brain_masks = None
    if splits.val is not None and protocol.needs_val_maps:
        report_phase(_label(job), "score validation")
        val_maps = fitted.score(splits.val.images, splits.val.brain_masks).numpy()
        val_brain_masks = np.asarray(splits.val.brain_masks)
    report_phase(_label(job), "metrics")
    result = protocol.evaluate(maps, splits.test, val_maps=val_maps, val_brain_masks=val_brain_masks)

    record_path = job.record_path(Path(ctx.out))
    examples = _write_examples(fitted, splits.test, maps, record_path, ctx.n_examples)
    per_image_name = None
    if getattr(result, "per_image", None) is not None and len(result.per_image):
        per_image_path = record_path.with_suffix(".per_image.csv")
        atomic_write_text(result.per_image.to_csv(index=False), per_image_path)
        per_image_name = per_image_path.name
    n_test = len(splits.test)
    return {
        **_base_record(job),
        "status": "ok",
        "error": None,
        "config": config_to_dict(fitted.config),
        "training_key": key,
        "training_family": method.family(),
        "protocol": protocol.parameters(),
        "data": dict(_data_info(job, splits), **({"training_modalities": modalities} if modalities != [job.modality] else {})),
        "metrics": {k: float(v) for k, v in result.metrics.items()},
        "timings": {
            "fit_seconds": fit_info["fit_seconds"],
            "reused_checkpoint": fit_info["reused"],
            "checkpoint_trained_by": fit_info.get("trained_by"),
            "score_seconds": score_seconds,
            "slices_per_second": n_test / score_seconds if score_seconds > 0 else None,
            "n_scored": n_test,
            "threads": _torch_threads(),  # CPU threads of this job: timings depend on them
        },
        "device": device_info(device),
        "notes": dict(fitted.notes),
        "evaluation_notes": dict(getattr(result, "notes", None) or {}),
        "examples": examples,
        "per_image": per_image_name,
        "checkpoint": str(checkpoint),
    }


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def _label(job: Job) -> str:
    """A short name of a job for the status line."""
    variant = "" if job.variant.name == "default" else f" {job.variant.name}"
    return f"{job.method} {job.modality} seed {job.seed}{variant}"


def _fitted_method(method: UADMethod, key: str, checkpoint: Path, splits: _Splits, trained: dict) -> tuple[UADMethod, dict]:
    """Train once per training key; later variants reuse the model (memory, then disk)."""
    if key in trained and type(trained[key][0]) is type(method):
        fitted, info = trained[key]
        fitted.config = method.config  # same training fields; only inference knobs differ
        return fitted, dict(info, reused=True)
    with _checkpoint_lock(checkpoint):  # one trainer per checkpoint: a sibling job (THOR beside DDPM under Ray) waits, then loads
        fitted, info = _load_or_fit(method, checkpoint, splits)
    trained[key] = (fitted, info)
    return fitted, info


@contextmanager
def _checkpoint_lock(checkpoint: Path):
    import fcntl

    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    with open(checkpoint.parent / f".{checkpoint.name}.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load_or_fit(method: UADMethod, checkpoint: Path, splits: _Splits) -> tuple[UADMethod, dict]:
    """The checkpoint's method if it loads, else ``method`` trained now and saved there."""
    info_path = checkpoint / "fit.json"
    fitted = None
    if (checkpoint / "method.json").is_file() and info_path.is_file():
        try:
            # possibly trained by another method of the same training family (DDPM for THOR)
            fitted = get_method_class(method.name).load(checkpoint, device=method.config.device, config=method.config)
            info = dict(json.loads(info_path.read_text()), reused=True)
        except Exception as exc:  # truncated, edited or foreign files: keep them for a look, train again
            moved = _quarantine(checkpoint)
            print(f"warning: checkpoint {checkpoint} could not be loaded ({type(exc).__name__}: {exc}); "
                  f"moved to {moved} and training again", file=sys.stderr)
            method.notes["checkpoint_replaced"] = f"{type(exc).__name__}: {exc}"[:300]
            fitted = None
    if fitted is not None:
        fitted.config = method.config
    else:
        start = time.perf_counter()
        method.fit(splits.train, splits.val)
        info = {"fit_seconds": time.perf_counter() - start, "n_train": len(splits.train), "created": now_iso(), "trained_by": method.name}
        method.save(checkpoint)
        atomic_write_text(json.dumps(info), info_path)  # written last: marks the checkpoint complete
        fitted, info = method, dict(info, reused=False)
    return fitted, info


def _quarantine(checkpoint: Path) -> Path:
    """Move an unusable checkpoint folder aside (never delete what a user may want to inspect)."""
    target = checkpoint.with_name(f"{checkpoint.name}.unusable-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    checkpoint.rename(target)
    return target


def _example_indices(test: SliceSet, k: int) -> np.ndarray:
    """``k`` slices spread over lesion sizes; the same for every method on the same test set."""
    if k <= 0 or len(test) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(test.lesion_areas(), kind="stable")
    picks = np.linspace(0, len(order) - 1, num=min(k, len(order))).round().astype(np.int64)
    return np.sort(order[picks])


def _write_examples(method: UADMethod, test: SliceSet, maps: np.ndarray, record_path: Path, k: int) -> str | None:
    index = _example_indices(test, k)
    if len(index) == 0:
        return None
    arrays = {
        "index": index,
        "image": np.asarray(test.images[index], dtype=np.float32),
        "map": maps[index].astype(np.float32),
        "lesion_mask": np.asarray(test.lesion_masks[index]),
        "brain_mask": np.asarray(test.brain_masks[index]),
        "subject_id": test.table["subject_id"].to_numpy()[index].astype(str),
    }
    if method.can_reconstruct:
        arrays["reconstruction"] = method.reconstruct(arrays["image"], arrays["brain_mask"]).numpy()
    path = record_path.with_suffix(".examples.npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
    return path.name


def _data_info(job: Job, splits: _Splits) -> dict[str, Any]:
    manifest = load_data(job.data).manifest
    keep = {k: v for k, v in manifest.items() if k != "path"}  # the path is machine-specific
    return {
        "name": job.data_name,
        "spec": job.data,
        "modality": job.modality,
        "fingerprint": load_data(job.data).fingerprint(),
        "train_fingerprint": splits.train.fingerprint(),
        "n_train": len(splits.train),
        "n_val": len(splits.val) if splits.val is not None else 0,
        "n_test": len(splits.test),
        "manifest": keep,
    }


def _base_record(job: Job) -> dict[str, Any]:
    marks = {"dry_run": True} if job.dry_run else {}  # absent from real runs' records
    return {
        **marks,
        "schema_version": SCHEMA_VERSION,
        "job_id": job.job_id,
        "method": job.method,
        "variant": job.variant.name,
        "variant_overrides": job.variant.as_dict,
        "profile": job.profile,
        "seed": job.seed,
        "versions": library_versions(),
        "git_commit": git_commit(),
        "created": now_iso(),
    }


def _failed_record(job: Job, exc: BaseException) -> dict[str, Any]:
    return {
        **_base_record(job),
        "status": "failed",
        "error": f"{type(exc).__name__}: {exc}",
        "traceback": traceback.format_exc(),
        "protocol": {"name": job.protocol},
        "data": {"name": job.data_name, "spec": job.data, "modality": job.modality},
        "metrics": {},
        "timings": {},
    }
