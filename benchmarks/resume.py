"""Which finished records still answer their job, so that a rerun may skip them.

A record's file name says which job it belongs to (method, data, modality, seed, variant),
not which configuration produced it. A rerun after ``--set``, a changed profile default
or a rebuilt data set would otherwise skip jobs whose records came from another config
or other data. Here the record's stored config and data fingerprint are compared with
what the job would use now; records that differ are reported, and on request moved
under ``<out>/superseded/<time>/`` (kept, never deleted) so that their jobs rerun.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from benchmarks.jobs import SUPERSEDED_DIR, Job
from benchmarks.records import read_record
from methods.base import MethodConfig, config_to_dict, execution_field_names

# The same job on another device, or with other GPU execution knobs (bf16, compile, ...), is the same job.
_IGNORED_FIELDS = {"device"} | execution_field_names(MethodConfig)
_SIDECARS = (".per_image.csv", ".examples.npz")
#: Fields added after records were first written, with the value those records ran with:
#: a stored record without the field compares as if it held this value.
_ADDED_FIELDS: dict[str, Any] = {"max_reverse_steps": None}


@dataclass(frozen=True)
class ChangedRecord:
    """A finished record whose config or data differ from what its job would use now."""

    path: Path
    differences: tuple[str, ...]  # e.g. "vae_epochs: 12 -> 24"


def job_config(job: Job) -> dict[str, Any]:
    """The config ``job`` runs with, as the record stores it (JSON types)."""
    from methods.registry import get_method_class

    profile, overrides = job.settings()
    config = get_method_class(job.method).config_for(profile, seed=job.seed, **overrides)
    return _comparable(config_to_dict(config))


def changed_records(jobs: list[Job], out: Path, data_fingerprint: Callable[[str], str]) -> list[ChangedRecord]:
    """Finished records under ``out`` that no longer match their job's config or data."""
    fingerprints: dict[str, str] = {}  # per data spec: hashing a set's arrays is not free
    changed = []
    for job in jobs:
        path = job.record_path(out)
        record = read_record(path)
        if record is None or record.get("status") != "ok":
            continue  # missing or failed: the job runs anyway
        stored = {**_ADDED_FIELDS, **_comparable(record.get("config") or {})}
        current = job_config(job)
        differences = _config_differences({k: v for k, v in stored.items() if k in current or k not in _ADDED_FIELDS}, current)
        if bool(record.get("dry_run")) != job.dry_run:  # a dry run's record never stands for a real job, nor the reverse
            differences.insert(0, f"dry run: {bool(record.get('dry_run'))} -> {job.dry_run}")
        stored_data = (record.get("data") or {}).get("fingerprint")
        if job.data not in fingerprints:
            fingerprints[job.data] = data_fingerprint(job.data)
        current_data = fingerprints[job.data]
        if stored_data != current_data:
            differences.append(f"data fingerprint: {stored_data} -> {current_data}")
        if differences:
            changed.append(ChangedRecord(path, tuple(differences)))
    return changed


def describe(changed: list[ChangedRecord], out: Path, limit: int = 5) -> str:
    lines = [f"{len(changed)} finished record(s) under {out} came from another config or data than their job would use now:"]
    for item in changed[:limit]:
        shown = "; ".join(item.differences[:4]) + ("; ..." if len(item.differences) > 4 else "")
        lines.append(f"  {item.path.relative_to(out)}: {shown}")
    if len(changed) > limit:
        lines.append(f"  ... and {len(changed) - limit} more")
    return "\n".join(lines)


def supersede(changed: list[ChangedRecord], out: Path) -> Path:
    """Move the changed records (and their per-image CSV and example files) aside; return where."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target_root = out / SUPERSEDED_DIR / stamp
    for item in changed:
        for path in [item.path, *(item.path.with_suffix(suffix) for suffix in _SIDECARS)]:
            if path.is_file():
                target = target_root / path.relative_to(out)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(path), str(target))
    return target_root


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """JSON round trip (tuples -> lists, paths -> str), without the fields that do not matter."""
    plain = json.loads(json.dumps(config, default=str))
    return {k: v for k, v in plain.items() if k not in _IGNORED_FIELDS}


def _config_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    missing = object()
    return [
        f"{name}: {stored.get(name, '(absent)')} -> {current.get(name, '(absent)')}"
        for name in sorted(set(stored) | set(current))
        if stored.get(name, missing) != current.get(name, missing)
    ]
