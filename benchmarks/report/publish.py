"""Where a leaderboard build may write, and how the shipped one is kept reproducible.

Three places matter:

* ``results/records/`` (tracked): the records the shipped page is built from (each
  record's JSON and per-image CSV, and the example slices the figures draw).
* ``results/`` (tracked): the shipped page, ``leaderboard.md``, ``tables/``, ``figures/``.
  ``python -m benchmarks.leaderboard --shipped`` rebuilds it from ``results/records/``
  byte for byte.
* ``results/local/`` (git-ignored): the default page of a user's own runs.

A build goes to a staging folder first; :func:`sync` then copies what changed into the
destination and removes the outputs of earlier builds, but refuses (unless forced) when
that would change or delete a file git tracks. A user's run can therefore never wipe or
rewrite the shipped results by accident.
"""

from __future__ import annotations

import filecmp
import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Outputs of a build, relative to its folder; everything else there is left alone.
OUTPUT_PATTERNS = ("leaderboard.md", "tables/*.csv", "tables/*.tex", "figures/*.png")


class TrackedFilesError(RuntimeError):
    """A build would change or delete files that git tracks."""


@dataclass
class SyncPlan:
    """What copying a staged build into its destination does."""

    write: list[Path] = field(default_factory=list)  # new or changed files (relative)
    unchanged: list[Path] = field(default_factory=list)
    remove: list[Path] = field(default_factory=list)  # stale outputs of an earlier build


def outputs(folder: Path) -> set[Path]:
    """Build outputs under ``folder``, relative to it."""
    found: set[Path] = set()
    for pattern in OUTPUT_PATTERNS:
        found |= {p.relative_to(folder) for p in folder.glob(pattern) if p.is_file()}
    return found


def plan_sync(staged: Path, dest: Path) -> SyncPlan:
    plan = SyncPlan()
    new = outputs(staged)
    for rel in sorted(new):
        target = dest / rel
        same = target.is_file() and filecmp.cmp(staged / rel, target, shallow=False)
        (plan.unchanged if same else plan.write).append(rel)
    plan.remove = sorted(outputs(dest) - new) if dest.is_dir() else []
    return plan


def tracked_files(paths: list[Path]) -> list[Path]:
    """Those of ``paths`` (absolute) that git tracks; none outside a git work tree."""
    existing = [p for p in paths if p.exists()]
    if not existing:
        return []
    top = _git_top(existing[0].parent)
    if top is None:
        return []
    try:
        listed = subprocess.run(
            ["git", "-C", str(top), "ls-files", "-z", "--", *[str(p.resolve()) for p in existing]],
            capture_output=True, check=True, timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    names = {top / n for n in listed.decode().split("\0") if n}
    return [p for p in existing if p.resolve() in names]


def _git_top(folder: Path) -> Path | None:
    try:
        out = subprocess.run(["git", "-C", str(folder), "rev-parse", "--show-toplevel"], capture_output=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(out.stdout.decode().strip()).resolve()


def sync(staged: Path, dest: Path, force: bool = False) -> SyncPlan:
    """Copy a staged build into ``dest``; refuse to touch tracked files unless ``force``."""
    plan = plan_sync(staged, dest)
    touched = [dest / rel for rel in plan.write + plan.remove]
    tracked = tracked_files(touched)
    if tracked and not force:
        shown = ", ".join(str(p.relative_to(dest)) for p in tracked[:8]) + (" ..." if len(tracked) > 8 else "")
        raise TrackedFilesError(
            f"this build would change or delete {len(tracked)} file(s) that git tracks under {dest} ({shown}); "
            "nothing was written. Build your own runs into another folder (the default, results/local/), "
            "rebuild the shipped page with --shipped, or pass --force to overwrite."
        )
    for rel in plan.write:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(staged / rel, dest / rel)
    for rel in plan.remove:
        (dest / rel).unlink()
    return plan


# ----------------------------------------------------------------------------- shipped records


def export_records(records: list[dict[str, Any]], dest: Path, with_examples: set[Path]) -> list[Path]:
    """Copy records (JSON, per-image CSV, and the examples in ``with_examples``) into ``dest``.

    ``dest`` is replaced as a whole, so it holds exactly the records of this page. File
    names keep each record's path below its run folder's ``records/`` level, so records of
    several runs do not collide.
    """
    if dest.exists():
        shutil.rmtree(dest)
    written: list[Path] = []
    for record in records:
        source = Path(record["_path"])
        target = dest / _shipped_name(record)
        target.parent.mkdir(parents=True, exist_ok=True)
        body = {k: v for k, v in record.items() if not k.startswith("_")}
        per_image = source.parent / str(record.get("per_image") or "")
        if record.get("per_image") and per_image.is_file():
            shutil.copyfile(per_image, target.parent / per_image.name)
            written.append(target.parent / per_image.name)
        examples = source.parent / str(record.get("examples") or "")
        if record.get("examples") and examples.resolve() in with_examples and examples.is_file():
            shutil.copyfile(examples, target.parent / examples.name)
            written.append(target.parent / examples.name)
        else:
            body["examples"] = None  # not shipped: the figures do not draw it
        target.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
        written.append(target)
    return written


def _shipped_name(record: dict[str, Any]) -> Path:
    """The record's path below its run's ``records/`` folder (``S2/quick/ae/embedded-T1__seed0__default.json``)."""
    source = Path(record["_path"])
    parts = source.parts
    if "records" in parts[:-1]:
        start = len(parts) - 1 - parts[::-1].index("records", 1)
        return Path(*parts[start + 1 :])
    key = [str(record.get(k) or "?") for k in ("method", "profile")]
    return Path(*key, source.name)


def figure_examples(records: list[dict[str, Any]]) -> set[Path]:
    """The example files the figures draw: default variant, lowest seed, per (section, method, modality)."""
    from benchmarks.report.collect import job_key, sibling

    chosen: dict[tuple, tuple[Any, Path]] = {}
    for record in records:
        key = job_key(record)
        examples = sibling(record, "examples")
        if key["variant"] != "default" or examples is None:
            continue
        group = (key["protocol"], key["data"], key["profile"], key["method"], key["modality"])
        seed = key["seed"] if isinstance(key["seed"], int) else 1 << 30
        if group not in chosen or seed < chosen[group][0]:
            chosen[group] = (seed, examples.resolve())
    return {path for _, path in chosen.values()}
