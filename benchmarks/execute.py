"""Running jobs: fit (or reuse a cached checkpoint), score, evaluate, write one record.

``run_group`` is the unit of work of every executor: a list of jobs that differ only in
their variant, so a variant that changes only inference-time knobs reuses the model its
group trained (or the checkpoint on disk, keyed by the hash of training config + data
fingerprint + seed). It takes and returns plain data, so a Ray task can call it as is.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.jobs import Job
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


def _splits(job: Job, protocol: Any) -> _Splits:
    view = load_data(job.data).modality(job.modality)
    val = view.split("val")
    return _Splits(train=view.split("train"), val=val if len(val) else None, test=protocol.select_test(view.split("test")))


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
    splits = _splits(jobs[0], protocol)
    trained: dict[str, tuple[UADMethod, dict[str, Any]]] = {}
    for job in pending:
        try:
            record = _run_job(job, ctx, protocol, splits, trained)
        except Exception as exc:  # one failing job must not stop the others
            if ctx.fail_fast:
                raise
            record = _failed_record(job, exc)
        write_record(record, job.record_path(out))
        records.append(record)
    return [r for r in records if r is not None]


def _run_job(job: Job, ctx: RunContext, protocol: Any, splits: _Splits, trained: dict) -> dict[str, Any]:
    device = str(resolve_device(ctx.device))
    profile, overrides = job.variant.resolve(job.profile)
    method = create_method(job.method, profile, seed=job.seed, device=device, **overrides)
    key = stable_hash({"training": method.training_key(), "data": splits.train.fingerprint(), "modality": job.modality})
    checkpoint = Path(ctx.checkpoints) / method.family() / key  # shared by the methods of one training family
    fitted, fit_info = _fitted_method(method, key, checkpoint, splits, trained)

    start = time.perf_counter()
    maps = fitted.score(splits.test.images, splits.test.brain_masks, progress=ctx.progress).numpy()
    score_seconds = time.perf_counter() - start
    val_maps = val_brain_masks = None
    if splits.val is not None and protocol.needs_val_maps:
        val_maps = fitted.score(splits.val.images, splits.val.brain_masks).numpy()
        val_brain_masks = np.asarray(splits.val.brain_masks)
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
        "data": _data_info(job, splits),
        "metrics": {k: float(v) for k, v in result.metrics.items()},
        "timings": {
            "fit_seconds": fit_info["fit_seconds"],
            "reused_checkpoint": fit_info["reused"],
            "checkpoint_trained_by": fit_info.get("trained_by"),
            "score_seconds": score_seconds,
            "slices_per_second": n_test / score_seconds if score_seconds > 0 else None,
            "n_scored": n_test,
        },
        "device": device_info(device),
        "notes": dict(fitted.notes),
        "evaluation_notes": dict(getattr(result, "notes", None) or {}),
        "examples": examples,
        "per_image": per_image_name,
        "checkpoint": str(checkpoint),
    }


def _fitted_method(method: UADMethod, key: str, checkpoint: Path, splits: _Splits, trained: dict) -> tuple[UADMethod, dict]:
    """Train once per training key; later variants reuse the model (memory, then disk)."""
    if key in trained and type(trained[key][0]) is type(method):
        fitted, info = trained[key]
        fitted.config = method.config  # same training fields; only inference knobs differ
        return fitted, dict(info, reused=True)
    info_path = checkpoint / "fit.json"
    if (checkpoint / "method.json").is_file() and info_path.is_file():
        # possibly trained by another method of the same training family (DDPM for THOR)
        fitted = get_method_class(method.name).load(checkpoint, device=method.config.device, config=method.config)
        info = dict(json.loads(info_path.read_text()), reused=True)
    else:
        start = time.perf_counter()
        method.fit(splits.train, splits.val)
        info = {"fit_seconds": time.perf_counter() - start, "n_train": len(splits.train), "created": now_iso(), "trained_by": method.name}
        method.save(checkpoint)
        atomic_write_text(json.dumps(info), info_path)  # written last: marks the checkpoint complete
        fitted, info = method, dict(info, reused=False)
    trained[key] = (fitted, info)
    return fitted, info


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
    return {
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
