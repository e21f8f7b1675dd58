"""The Ray executor on a local CPU-only Ray (2 CPUs): grid, retries, failures, resume, parity.

The toy method (tests/toy_method.py) reaches the Ray workers through UAD_BENCH_PLUGINS,
forwarded by the executor's runtime environment; it logs its fits and scorings to
$UAD_TOY_STATE so the tests can tell what was recomputed.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from benchmarks.execute import RunContext  # noqa: E402
from benchmarks.executors import get_executor  # noqa: E402
from benchmarks.executors.ray_executor import _dependencies, run_ray, worker_runtime_env  # noqa: E402
from benchmarks.jobs import Variant, build_jobs, group_jobs  # noqa: E402
from benchmarks.plugins import ENV_VAR, PluginError, load_plugins  # noqa: E402
from benchmarks.progress import JobProgress, format_seconds  # noqa: E402
from benchmarks.records import read_record  # noqa: E402
from datasets.format import save_slices  # noqa: E402
from tests import toy_method  # noqa: E402  (registers the toy method in this process)
from tests.conftest import make_tiny_slices  # noqa: E402

pytestmark = pytest.mark.slow  # Ray / Tune / a subprocess run: deselect with -m 'not slow'

METHOD = toy_method.NAME


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One local Ray for the module (starting Ray and its workers is the slow part)."""
    root = tmp_path_factory.mktemp("ray-exec")
    state = root / "state"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV_VAR, "tests.toy_method")
        mp.setenv(toy_method.STATE_ENV, str(state))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=worker_runtime_env())
        try:
            data = save_slices(make_tiny_slices(channels=1), root / "tiny")
            yield {"root": root, "state": state, "data": str(data)}
        finally:
            ray.shutdown()


def _jobs(data: str, variants: list[Variant], seeds=(0, 1)):
    return build_jobs("S1", [METHOD], data, "tiny", ["T1"], list(seeds), "quick", {METHOD: variants})


def _ctx(root: Path, name: str) -> RunContext:
    return RunContext(out=str(root / name), checkpoints=str(root / name / "checkpoints"), progress=False, n_examples=1)


GOOD = [Variant(), Variant("gain=2", (("gain", "2"),))]
FAILING = [Variant("fail=once", (("fail", "once"),)), Variant("fail=always", (("fail", "always"),)), Variant("fail=die", (("fail", "die"),))]


def test_grid_retries_and_failures_then_resume_and_parity_with_local(cluster):
    root, state, data = cluster["root"], cluster["state"], cluster["data"]
    jobs = _jobs(data, GOOD + FAILING)
    ctx = _ctx(root, "ray")

    records = run_ray(jobs, ctx, retries=1, poll_interval=0.2)
    by_variant = {(r["seed"], r["variant"]): r for r in records}
    assert len(records) == len(jobs) == 10
    # A raised job and a dead worker are retried and succeed on the second attempt...
    for seed in (0, 1):
        for name in ("default", "gain=2", "fail=once", "fail=die"):
            assert by_variant[(seed, name)]["status"] == "ok", by_variant[(seed, name)].get("error")
        # ...a permanent failure is recorded with its error, without stopping the others.
        failed = by_variant[(seed, "fail=always")]
        assert failed["status"] == "failed" and "injected permanent failure" in failed["error"]
        assert read_record(jobs[0].record_path(Path(ctx.out))) is not None
    # One model per seed, trained once, shared by every variant (retries reuse the checkpoint).
    assert len(toy_method.events(state, "fit")) == 2
    reused = [r for r in records if r["status"] == "ok" and r["variant"] != "default"]
    assert all(r["timings"]["reused_checkpoint"] for r in reused)
    assert {r["device"]["type"] for r in records if r["status"] == "ok"} == {"cpu"}

    # An interrupted run: one record lost, one half-written temp file left behind.
    out = Path(ctx.out)
    lost = next(j for j in jobs if j.seed == 1 and j.variant.name == "gain=2").record_path(out)
    lost.unlink()
    (lost.parent / f".{lost.name}.tmp").write_text('{"schema_version": 1, "status": "o')
    ok_paths = [j.record_path(out) for j in jobs if by_variant[(j.seed, j.variant.name)]["status"] == "ok" and j.record_path(out) != lost]
    stamps = {p: p.stat().st_mtime_ns for p in ok_paths}
    scores_before = len(toy_method.events(state, "score"))
    good_jobs = _jobs(data, GOOD)
    resumed = run_ray(good_jobs, ctx, retries=0, poll_interval=0.2)
    assert {r["status"] for r in resumed} == {"ok"} and len(resumed) == 4
    assert stamps == {p: p.stat().st_mtime_ns for p in ok_paths}  # finished jobs untouched
    rescored = toy_method.events(state, "score")[scores_before:]
    assert rescored and all("seed=1 width=4 gain=2.0 fail= " in e for e in rescored)  # only the lost job
    assert len(toy_method.events(state, "fit")) == 2  # and from the checkpoint on disk
    assert read_record(lost)["timings"]["reused_checkpoint"] is True

    # The local executor gives the same metrics for the same seeds.
    local = get_executor("local")(good_jobs, _ctx(root, "local"))
    metrics = {(r["seed"], r["variant"]): _comparable(r["metrics"]) for r in local}
    assert metrics == {(r["seed"], r["variant"]): _comparable(r["metrics"]) for r in resumed}
    assert all(0.0 <= m["max_dice"] <= 1.0 for m in metrics.values())


def _comparable(metrics: dict[str, float]) -> dict[str, float | str]:
    """NaN (e.g. an empty lesion-size bucket) never equals itself; compare it as text."""
    return {k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in metrics.items()}


def test_failure_outside_jobs_is_recorded_for_every_job_of_the_group(cluster, tmp_path):
    # A group whose data cannot be loaded fails before any job runs: after the retries
    # the executor writes the failed records itself.
    jobs = _jobs(str(tmp_path / "no-such-set"), GOOD, seeds=(0,))
    records = run_ray(jobs, _ctx(tmp_path, "bad"), retries=0, poll_interval=0.2)
    assert [r["status"] for r in records] == ["failed", "failed"]
    assert all("1 attempt(s)" in r["error"] and "no-such-set" in r["error"] for r in records)
    assert all(read_record(j.record_path(tmp_path / "bad"))["status"] == "failed" for j in jobs)


def test_groups_training_the_same_model_are_chained_not_parallel(cluster):
    jobs = _jobs(cluster["data"], GOOD, seeds=(0,))
    # The same model split over two groups (e.g. two calls merged): the second waits.
    split = [[jobs[0]], [jobs[1]], _jobs(cluster["data"], [Variant("width=8", (("width", "8"),))], seeds=(0,))]
    assert _dependencies(split) == [set(), {0}, set()]
    assert _dependencies(group_jobs(_jobs(cluster["data"], GOOD))) == [set(), set()]


def test_progress_line_counts_and_eta():
    now = [0.0]
    stream = io.StringIO()
    progress = JobProgress(10, skipped=2, stream=stream, clock=lambda: now[0], min_interval=0)
    assert progress.eta_seconds() is None and "ETA ?" in progress.line()
    progress.update(running=2)
    now[0] = 30.0
    progress.advance(ok=2, failed=1)
    assert progress.done == 5 and progress.queued == 3
    assert progress.eta_seconds() == pytest.approx(5 * 30.0 / 3)  # skipped jobs do not count
    progress.close()
    lines = stream.getvalue().splitlines()
    assert lines[-1].startswith("jobs 5/10 done, 2 skipped") and "1 failed" in lines[-1] and "ETA 50s" in lines[-1]
    assert format_seconds(3725) == "1h02m"


def test_plugins_name_the_broken_module(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "tests.toy_method, no_such_module_xyz")
    with pytest.raises(PluginError, match="no_such_module_xyz"):
        load_plugins()
    assert worker_runtime_env()["env_vars"][ENV_VAR].startswith("tests.toy_method")
    assert str(Path(__file__).resolve().parents[1]) in worker_runtime_env()["env_vars"]["PYTHONPATH"].split(os.pathsep)
