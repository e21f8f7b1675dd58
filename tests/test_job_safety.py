"""Jobs never clobber each other: a lock per job, a failing method (even sys.exit) fails only its
job, and an unusable checkpoint is moved aside and retrained."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from benchmarks.execute import RunContext, job_lock, run_group
from benchmarks.jobs import Job, Variant
from benchmarks.run import main
from datasets.format import save_slices
from methods import MethodConfig, UADMethod, register_method
from tests.conftest import make_tiny_slices


@dataclass
class _ExitConfig(MethodConfig):
    pass


class _Exits(UADMethod):
    """Calls sys.exit in fit, as a careless plugin might."""

    Config = _ExitConfig
    profiles = {"paper": {}, "quick": {}, "tiny": {}}

    def networks(self):
        return {}

    def _fit(self, train, val):
        sys.exit(3)

    def _score_batch(self, images, brain_masks):
        return images.mean(dim=1)


@pytest.fixture
def exiting_method():
    """Registered for one test only (the conformance test must not meet it)."""
    from methods import registry

    register_method("test-sys-exit")(_Exits)
    yield "test-sys-exit"
    registry._REGISTRY.pop("test-sys-exit", None)
    registry._SOURCES.pop("test-sys-exit", None)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return save_slices(make_tiny_slices(n_train=8, n_val=3, n_test=5, size=32), tmp_path / "tiny-set")


def _job(data: Path, method: str = "ae", seed: int = 0) -> Job:
    return Job("S1", method, str(data), "tiny", "T1", seed, "tiny", Variant())


def test_a_job_locked_by_another_run_is_skipped_not_claimed(data: Path, tmp_path: Path) -> None:
    ctx = RunContext(out=str(tmp_path / "run"), checkpoints=str(tmp_path / "run" / "checkpoints"), progress=False)
    job = _job(data)
    with job_lock(job.record_path(tmp_path / "run")) as owned:
        assert owned
        (record,) = run_group([job], ctx)
    assert record["status"] == "skipped" and "another process" in record["status_note"]
    assert not job.record_path(tmp_path / "run").exists()  # nothing claimed, nothing written
    (record,) = run_group([job], ctx)  # the lock is free again: the job runs
    assert record["status"] == "ok"


def test_sys_exit_in_fit_fails_only_its_job(data: Path, tmp_path: Path, exiting_method: str) -> None:
    out = tmp_path / "run"
    code = main(["--protocol", "S1", "--methods", "test-sys-exit,ae", "--profile", "tiny", "--data", str(data), "--out", str(out), "--no-progress"])
    assert code == 1  # one job failed
    records = {json.loads(p.read_text())["method"]: json.loads(p.read_text()) for p in (out / "records").rglob("*.json")}
    assert records["test-sys-exit"]["status"] == "failed" and "SystemExit" in records["test-sys-exit"]["error"]
    assert records["ae"]["status"] == "ok"  # the next method ran


def test_an_unusable_checkpoint_is_moved_aside_and_retrained(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    argv = ["--protocol", "S1", "--methods", "ae", "--profile", "tiny", "--data", str(data), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    (record_path,) = (out / "records").rglob("*.json")
    checkpoint = Path(json.loads(record_path.read_text())["checkpoint"])
    (checkpoint / "weights.pt").write_bytes(b"truncated")
    record_path.unlink()
    assert main(argv) == 0
    again = json.loads(record_path.read_text())
    assert again["status"] == "ok" and again["timings"]["reused_checkpoint"] is False
    assert "checkpoint_replaced" in again["notes"]
    assert list(checkpoint.parent.glob(f"{checkpoint.name}.unusable-*"))  # kept for a look
    assert "could not be loaded" in capsys.readouterr().err
    torch.load(checkpoint / "weights.pt", weights_only=True)  # a good checkpoint again


def test_ray_chains_the_methods_of_one_training_family(data: Path) -> None:
    """THOR and AutoDDPM wait for DDPM's group (their shared network), AnoDDPM does not."""
    from benchmarks.executors.ray_executor import _dependencies
    from benchmarks.jobs import group_jobs

    groups = group_jobs([_job(data, method) for method in ("ddpm", "thor", "anoddpm", "autoddpm")])
    assert _dependencies(groups) == [set(), {0}, set(), {1}]


def test_ray_never_records_a_job_another_run_owns_as_failed(data: Path, tmp_path: Path) -> None:
    """A job locked by another process is 'skipped' for Ray: no retry, no failed record over the owner's work."""
    from benchmarks.executors.ray_executor import records_after_failure

    out = tmp_path / "run"
    job = _job(data)
    with job_lock(job.record_path(out)):
        (record,) = records_after_failure([job], RuntimeError("task died"), out, since_ns=0, attempts=2)
    assert record["status"] == "skipped" and not job.record_path(out).exists()
    (record,) = records_after_failure([job], RuntimeError("task died"), out, since_ns=0, attempts=2)
    assert record["status"] == "failed" and job.record_path(out).exists()  # unowned: recorded as before
