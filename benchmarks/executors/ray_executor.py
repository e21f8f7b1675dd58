"""The Ray executor: job groups as Ray tasks on a local or an existing Ray cluster.

Each group (jobs that differ only in their variant, see ``jobs.group_jobs``) becomes one
``ray.remote(num_gpus=..., num_cpus=...)`` task calling ``execute.run_group``, so a group
trains its model once and evaluates every inference-only variant on it. Groups of
different tasks that would train the *same* model (same method, data, modality and
training key, e.g. variants split over several calls) are chained: the later one is
submitted only when the earlier one has finished, and then reuses its checkpoint.

Fault tolerance:

* ``run_group`` records a job that raises as ``failed`` and carries on with the others;
  the task then raises ``JobsFailed`` so Ray retries it (``max_retries=retries``,
  ``retry_exceptions=True``). A retry skips the jobs that have an ``ok`` record and
  reuses the checkpoint on disk, so only the failed jobs run again.
* A worker that dies (OOM kill, segfault, node lost) is retried by Ray the same way.
* When the retries are spent, the group's jobs without an ``ok`` record are recorded as
  failed with the error; the other groups go on.
* Records are written atomically by ``run_group`` as each job finishes, so killing the
  driver (even ``kill -9``) loses at most the jobs in flight; a rerun skips finished
  jobs and reuses checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.execute import RunContext, _failed_record, elsewhere_record, job_lock, run_group
from benchmarks.jobs import Job, group_jobs
from benchmarks.plugins import ENV_VAR as PLUGINS_ENV_VAR
from benchmarks.plugins import load_plugins
from benchmarks.progress import JobProgress
from benchmarks.records import is_finished, read_record, write_record

PROJECT_ROOT = Path(__file__).resolve().parents[2]


class JobsFailed(RuntimeError):
    """Raised in a task when some of its jobs failed, so that Ray retries the task."""

    def __init__(self, job_ids: list[str], errors: list[str]) -> None:
        super().__init__(f"{len(job_ids)} job(s) failed: " + "; ".join(f"{j}: {e}" for j, e in zip(job_ids, errors)))
        self.job_ids = job_ids
        self.errors = errors

    def __reduce__(self):  # keep the fields through pickling (Ray ships the exception back)
        return (type(self), (self.job_ids, self.errors))


# ---------------------------------------------------------------------- cluster
def worker_runtime_env() -> dict[str, Any]:
    """Environment of every worker: the project (and the driver's cwd) importable, plugins named.

    The package is installed in editable mode, so workers on this machine import it
    anyway; the explicit absolute PYTHONPATH also covers modules that are only on the
    path (tests, ``UAD_BENCH_PLUGINS`` modules) and nodes of a cluster that share the
    file system.
    """
    paths = [str(PROJECT_ROOT), os.getcwd()]
    paths += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env_vars = {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}
    if os.environ.get(PLUGINS_ENV_VAR):
        env_vars[PLUGINS_ENV_VAR] = os.environ[PLUGINS_ENV_VAR]
    return {"env_vars": env_vars}


def connect(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None, log_to_driver: bool = False) -> bool:
    """Join the cluster at ``address`` or start a local one; True if this call started Ray.

    An already initialised Ray (e.g. a test's ``ray.init(num_cpus=2)``) is used as is.
    Worker output is not forwarded by default: per-job bars are off in workers and errors
    come back in the records, so the driver's status line stays readable.
    """
    import ray

    if ray.is_initialized():
        return False
    common = dict(runtime_env=worker_runtime_env(), log_to_driver=log_to_driver, logging_level=logging.WARNING)
    if address:
        ray.init(address=address, **common)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, num_gpus=num_gpus, include_dashboard=False, **common)
    return True


def task_runtime_env() -> dict[str, Any] | None:
    """A per-task runtime env, only when Ray was started by someone else without ours."""
    import ray

    wanted = worker_runtime_env()["env_vars"]
    current = (ray.get_runtime_context().runtime_env or {}).get("env_vars") or {}
    if all(current.get(k) == v for k, v in wanted.items()):
        return None  # the job-level env already has it; keep the shared worker pool
    return {"env_vars": wanted}


def default_gpus_per_job(gpus_per_job: float | None, device: str) -> float:
    """1 GPU per job if the cluster has GPUs (and the run is not forced to the CPU), else 0."""
    if gpus_per_job is not None:
        if gpus_per_job < 0:
            raise ValueError(f"--gpus-per-job must be >= 0, got {gpus_per_job}")
        return float(gpus_per_job)
    import ray

    if device == "cpu":
        return 0.0
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def task_options(cpus_per_job: float, gpus_per_job: float, retries: int) -> dict[str, Any]:
    if cpus_per_job <= 0 and gpus_per_job <= 0:
        raise ValueError("a job needs some resources: --cpus-per-job or --gpus-per-job must be > 0")
    if retries < 0:
        raise ValueError(f"--retries must be >= 0, got {retries}")
    return {"num_cpus": cpus_per_job, "num_gpus": gpus_per_job, "max_retries": retries, "retry_exceptions": True}


def _capacity(cpus_per_job: float, gpus_per_job: float) -> int:
    """How many tasks the cluster can run at once (for the running/queued split)."""
    import ray

    resources = ray.cluster_resources()
    limits = []
    if cpus_per_job > 0:
        limits.append(int(resources.get("CPU", 0) // cpus_per_job))
    if gpus_per_job > 0:
        limits.append(int(resources.get("GPU", 0) // gpus_per_job))
    return max(1, min(limits)) if limits else 1


# ---------------------------------------------------------------------- inside a task
def worker_context(ctx: RunContext, cpus: float) -> RunContext:
    """The context a task runs with: its GPU (Ray sets CUDA_VISIBLE_DEVICES), no bars."""
    import ray

    device = ctx.device
    if device == "auto":
        device = "cuda:0" if ray.get_gpu_ids() else "cpu"
    threads = ctx.threads or max(1, math.floor(cpus))
    return dataclasses.replace(ctx, device=device, progress=False, threads=threads)


def group_task(jobs: list[Job], ctx: RunContext, cpus: float) -> list[dict[str, Any]]:
    """Body of a Ray task: run one group; raise if a job failed so that Ray retries."""
    load_plugins()
    records = run_group(jobs, worker_context(ctx, cpus))
    failed = [r for r in records if r.get("status") not in ("ok", "skipped")]  # skipped: another run owns the job
    if failed:
        raise JobsFailed([r["job_id"] for r in failed], [str(r.get("error")) for r in failed])
    return records


# ---------------------------------------------------------------------- driver
def training_signature(job: Job) -> tuple | None:
    """What decides the trained model of ``job`` (None if its config is invalid)."""
    from methods.registry import create_method

    try:
        profile, overrides = job.variant.resolve(job.profile)
        method = create_method(job.method, profile, seed=job.seed, **overrides)
        family, key = method.family(), method.training_key()
    except Exception:
        return None  # the task will fail and record why
    # the training family, not the method: THOR's group waits for DDPM's, which trains their shared network
    return (family, job.data, job.modality, key)


def _dependencies(groups: list[list[Job]]) -> list[set[int]]:
    """For each group, the earlier groups that train one of its models (chained, not parallel)."""
    owner: dict[tuple, int] = {}
    deps: list[set[int]] = []
    for index, group in enumerate(groups):
        signatures = {s for s in map(training_signature, group) if s is not None}
        deps.append({owner[s] for s in signatures if s in owner})
        owner.update({s: index for s in signatures})
    return deps


def _error_text(exc: BaseException) -> tuple[str, BaseException]:
    """A one-line error and the original exception behind a Ray error."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}", cause
    first = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {first[0] if first else ''}", exc


def records_after_failure(group: list[Job], exc: BaseException, out: Path, since_ns: int, attempts: int) -> list[dict[str, Any]]:
    """Records of a group whose task failed for good: keep the ones the task wrote, fill the rest."""
    message, cause = _error_text(exc)
    records = []
    for job in group:
        path = job.record_path(out)
        with job_lock(path) as owned:
            if not owned:  # another run on the same --out computes it now: never overwrite its work
                records.append(elsewhere_record(job, "running in another process"))
                continue
            record = read_record(path)
            fresh = record is not None and path.stat().st_mtime_ns >= since_ns
            if record is not None and (record.get("status") == "ok" or (fresh and isinstance(cause, JobsFailed))):
                records.append(record)  # run_group wrote it with the job's own error
                continue
            try:
                raise RuntimeError(f"task failed after {attempts} attempt(s): {message}") from cause
            except RuntimeError as wrapped:
                record = _failed_record(job, wrapped)
            record["traceback"] = str(exc)  # the remote traceback, when Ray has one
            write_record(record, path)
        records.append(record)
    return records


def run_ray(
    jobs: list[Job],
    ctx: RunContext,
    address: str | None = None,
    gpus_per_job: float | None = None,
    cpus_per_job: float = 1.0,
    retries: int = 1,
    poll_interval: float = 1.0,
    **_: Any,
) -> list[dict[str, Any]]:
    """Run ``jobs`` as Ray tasks (one per group); returns one record per job, in job order."""
    load_plugins()
    if not jobs:
        return []
    out = Path(ctx.out)
    since_ns = time.time_ns()
    groups = group_jobs(jobs)
    finished = {job for job in jobs if is_finished(job.record_path(out))}
    todo = [g for g in groups if any(job not in finished for job in g)]
    by_id: dict[str, dict[str, Any]] = {}
    for group in groups:
        if group not in todo:
            by_id.update({j.job_id: r for j in group if (r := read_record(j.record_path(out))) is not None})
    if not todo:
        return [by_id[j.job_id] for j in jobs if j.job_id in by_id]

    import ray

    started = connect(address)
    try:
        gpus = default_gpus_per_job(gpus_per_job, ctx.device)
        options = task_options(cpus_per_job, gpus, retries)
        env = task_runtime_env()
        remote = ray.remote(group_task).options(**options, **({"runtime_env": env} if env else {}))
        capacity = _capacity(cpus_per_job, gpus)
        deps = _dependencies(todo)
        waiting = set(range(len(todo)))
        in_flight: dict[Any, int] = {}  # ObjectRef -> index in todo, in submission order
        progress = JobProgress(len(jobs), skipped=len(finished), enabled=ctx.progress)
        print(
            f"ray: {len(todo)} task(s) of {len(jobs) - len(finished)} job(s) on {ray.cluster_resources().get('CPU', 0):g} CPU(s), "
            f"{ray.cluster_resources().get('GPU', 0):g} GPU(s); {cpus_per_job:g} CPU(s) and {gpus:g} GPU(s) per task, "
            f"{retries} retr{'y' if retries == 1 else 'ies'}",
            file=sys.stderr,
        )

        def submit_ready() -> None:
            for index in sorted(waiting):
                if not deps[index]:
                    waiting.discard(index)
                    in_flight[remote.remote(todo[index], ctx, cpus_per_job)] = index

        def pending_jobs(group: list[Job]) -> list[Job]:
            return [job for job in group if job not in finished]

        with progress:
            submit_ready()
            while in_flight:
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=poll_interval)
                for ref in ready:
                    index = in_flight.pop(ref)
                    group = todo[index]
                    try:
                        records = ray.get(ref)
                    except (ray.exceptions.RayError, JobsFailed) as exc:
                        if ctx.fail_fast:
                            for other in in_flight:
                                ray.cancel(other, force=True)
                            raise
                        records = records_after_failure(group, exc, out, since_ns, retries + 1)
                    by_id.update({r["job_id"]: r for r in records})
                    new = {j.job_id for j in pending_jobs(group)}
                    ok = sum(1 for r in records if r["job_id"] in new and r.get("status") == "ok")
                    progress.advance(ok=ok, failed=len(new) - ok, draw=False)
                    for other in waiting:
                        deps[other].discard(index)
                    submit_ready()
                _show_in_flight(progress, [todo[i] for i in in_flight.values()], capacity, finished, out, since_ns)
                if ready:
                    progress.draw(force=True)
    except KeyboardInterrupt:
        print("\nray: interrupted; finished jobs are recorded, a rerun resumes", file=sys.stderr)
        raise
    finally:
        if started:
            ray.shutdown()
    return [by_id[j.job_id] for j in jobs if j.job_id in by_id]


def _show_in_flight(progress: JobProgress, groups: list[list[Job]], capacity: int, finished: set[Job], out: Path, since_ns: int) -> None:
    """Per-job progress inside running groups, from the records they have written so far."""
    written = running = 0
    for position, group in enumerate(groups):
        pending = [job for job in group if job not in finished]
        done = sum(1 for job in pending if _written_since(job.record_path(out), since_ns))
        written += done
        if position < capacity:  # Ray starts tasks roughly in submission order
            running += len(pending) - done
    progress.update(running=running, partial=written)


def _written_since(path: Path, since_ns: int) -> bool:
    try:
        return path.stat().st_mtime_ns >= since_ns
    except OSError:
        return False
