"""Result records: one JSON file per job, written atomically, plus environment facts."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from methods.atomic import atomic_write_text

SCHEMA_VERSION = 1
_PACKAGES = ("torch", "monai", "diffusers", "numpy", "scipy", "scikit-learn", "pandas", "ray", "nibabel", "nilearn")


def write_record(record: dict[str, Any], path: Path) -> None:
    """Write ``record`` as JSON; a reader never sees a half-written file."""
    atomic_write_text(json.dumps(record, indent=2, sort_keys=True, default=_json_default), path)


def read_record(path: Path) -> dict[str, Any] | None:
    """The record at ``path``, or None if it is missing or unreadable (then the job reruns)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("schema_version") == SCHEMA_VERSION else None


def is_finished(path: Path) -> bool:
    record = read_record(path)
    return record is not None and record.get("status") == "ok"


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return str(value)


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    try:
        versions["uad-bench"] = version("uad-bench")
    except PackageNotFoundError:
        from methods import __version__

        versions["uad-bench"] = __version__
    return versions


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the checkout this package runs from (with '+dirty' if modified)."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"type": device, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        info["name"] = torch.cuda.get_device_name(index)
        info["cuda"] = torch.version.cuda
        info["visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    else:
        info["name"] = platform.processor() or platform.machine()
    return info


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
