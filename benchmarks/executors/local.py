"""The local executor: job groups one after another in this process."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm

from benchmarks.execute import RunContext, run_group
from benchmarks.jobs import Job, group_jobs


def run_local(jobs: list[Job], ctx: RunContext, **_: Any) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    groups = group_jobs(jobs)
    with tqdm(total=len(jobs), desc="jobs", unit="job", disable=not ctx.progress) as bar:
        for group in groups:
            bar.set_postfix_str(f"{group[0].method} {group[0].modality} seed{group[0].seed}")
            records.extend(run_group(group, ctx))
            bar.update(len(group))
    return records
