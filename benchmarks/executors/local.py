"""The local executor: job groups one after another in this process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.execute import RunContext, run_group
from benchmarks.jobs import Job, group_jobs
from benchmarks.plugins import load_plugins
from benchmarks.progress import JobProgress, observe_phases
from benchmarks.records import is_finished


def run_local(jobs: list[Job], ctx: RunContext, **_: Any) -> list[dict[str, Any]]:
    load_plugins()
    out = Path(ctx.out)
    records: list[dict[str, Any]] = []
    finished = {job for job in jobs if is_finished(job.record_path(out))}
    # The methods draw their own training/scoring bars, so the status line is printed
    # once per group rather than redrawn in place over them.
    progress = JobProgress(len(jobs), skipped=len(finished), enabled=ctx.progress, inplace=False)
    from methods.progress import observe_progress

    with progress, observe_phases(progress.enter_phase), observe_progress(progress.on_step):
        for group in group_jobs(jobs):
            pending = [job for job in group if job not in finished]
            progress.running = len(pending)
            records.extend(run_group(group, ctx))
            ok = sum(is_finished(job.record_path(out)) for job in pending)
            progress.running = 0
            progress.advance(ok=ok, failed=len(pending) - ok)
    return records
