"""Load result records (benchmarks/records.py format) from run directories, recursively.

Only JSON files carrying ``schema_version`` count as records; anything else (configs,
fit.json of checkpoints, ...) is skipped silently. Records of dry runs (``"dry_run":
true``, ``benchmarks.run --dry-run``) are set aside, counted but never shown: their
training and chains were cut short. Records are never modified here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from benchmarks.jobs import SUPERSEDED_DIR

KEY = ["protocol", "data", "profile", "method", "variant", "modality", "seed"]


@dataclass
class RecordSet:
    ok: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    searched: list[Path] = field(default_factory=list)
    missing_dirs: list[Path] = field(default_factory=list)
    unreadable: list[Path] = field(default_factory=list)
    duplicates: list[Path] = field(default_factory=list)
    invalid: list[tuple[Path, str]] = field(default_factory=list)  # (record, why it is not shown)
    dry_run: list[Path] = field(default_factory=list)  # records of dry runs, never shown


#: Metrics that are fractions: a value outside [0, 1] means the record is corrupt or edited.
FRACTION_PREFIXES = ("max_dice", "dice", "auroc", "auprc")


def out_of_range(record: dict[str, Any]) -> str | None:
    """Why a record's metrics cannot be real (a fraction outside [0, 1]), or None."""
    for name, value in (record.get("metrics") or {}).items():
        if not str(name).startswith(FRACTION_PREFIXES):
            continue
        number = _number(value)
        if number == number and not 0.0 <= number <= 1.0:  # NaN (no lesion in a bucket) is allowed
            return f"{name} = {value!r} is outside [0, 1]"
    return None


def load_records(run_dirs: list[Path]) -> RecordSet:
    """Every record under ``run_dirs``; later duplicates of one job (same key) are dropped."""
    result = RecordSet(searched=[Path(d) for d in run_dirs])
    for directory in result.searched:
        if not directory.is_dir():
            result.missing_dirs.append(directory)
            continue
        for path in sorted(directory.rglob("*.json")):
            if SUPERSEDED_DIR in path.relative_to(directory).parts[:-1]:
                continue  # records a rerun replaced (benchmarks/resume.py)
            record = _read(path, result)
            if record is None:
                continue
            if record.get("dry_run"):
                result.dry_run.append(path)
                continue
            problem = out_of_range(record)
            if problem is not None:
                result.invalid.append((path, problem))
                continue
            (result.ok if record.get("status") == "ok" else result.failed).append(record)
    result.ok = _dedupe(result.ok, result.duplicates)
    result.failed.sort(key=lambda r: (str(r["_path"])))
    return result


def _read(path: Path, result: RecordSet) -> dict[str, Any] | None:
    if path.name.startswith("."):  # temp files of atomic writes
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        result.unreadable.append(path)
        return None
    if not isinstance(data, dict) or "schema_version" not in data:
        return None  # not a record
    data["_path"] = path
    return data


def _dedupe(records: list[dict[str, Any]], dropped: list[Path]) -> list[dict[str, Any]]:
    """One record per job key: the most recently created wins (then the path, for determinism)."""
    best: dict[tuple, dict[str, Any]] = {}
    for record in sorted(records, key=lambda r: (str(r.get("created") or ""), str(r["_path"]))):
        key = tuple(job_key(record).values())
        if key in best:
            dropped.append(best[key]["_path"])
        best[key] = record
    return [best[k] for k in sorted(best, key=lambda k: tuple(str(v) for v in k))]


def job_key(record: dict[str, Any]) -> dict[str, Any]:
    protocol = record.get("protocol") or {}
    data = record.get("data") or {}
    return {
        "protocol": str(protocol.get("name", "?")) if isinstance(protocol, dict) else str(protocol),
        "data": str(data.get("name", "?")),
        "profile": str(record.get("profile", "?")),
        "method": str(record.get("method", "?")),
        "variant": str(record.get("variant") or "default"),
        "modality": str(data.get("modality", "?")),
        "seed": record.get("seed"),
    }


def device_label(device: Any) -> str:
    if isinstance(device, dict):
        kind, name = device.get("type"), device.get("name")
        return f"{kind} ({name})" if kind and name and name != kind else str(kind or name or "?")
    return str(device) if device else "?"


def sibling(record: dict[str, Any], key: str) -> Path | None:
    """A file the record names relative to itself (``examples``, ``per_image``), if it exists."""
    name = record.get(key)
    if not name:
        return None
    path = Path(record["_path"]).parent / str(name)
    return path if path.is_file() else None


def records_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per ok record: the job key, metrics (m_*), timings (t_*), and what the report needs."""
    rows = []
    for record in records:
        row: dict[str, Any] = job_key(record)
        for name, value in (record.get("metrics") or {}).items():
            row[f"m_{name}"] = _number(value)
        for name, value in (record.get("timings") or {}).items():
            row[f"t_{name}"] = value
        protocol = record.get("protocol") if isinstance(record.get("protocol"), dict) else {}
        row.update(
            device=device_label(record.get("device")),
            fingerprint=str((record.get("data") or {}).get("fingerprint") or "?"),
            mode=str(protocol.get("mode", "?")),
            protocol_params=protocol,
            path=record["_path"],
            examples=sibling(record, "examples"),
            per_image=sibling(record, "per_image"),
        )
        rows.append(row)
    columns = KEY + ["device", "fingerprint", "mode", "protocol_params", "path", "examples", "per_image"]
    frame = pd.DataFrame(rows, columns=None if rows else columns)
    return frame.sort_values(KEY, key=_sort_key).reset_index(drop=True) if rows else frame


def _sort_key(column: pd.Series) -> pd.Series:
    # Seeds sort numerically (2 before 10); everything else as text.
    if column.name == "seed":
        return pd.to_numeric(column, errors="coerce").fillna(-1)
    return column.astype(str)


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def error_line(record: dict[str, Any]) -> str:
    error = str(record.get("error") or f"status {record.get('status')!r}").strip()
    return error.splitlines()[0] if error else "(no error message)"
