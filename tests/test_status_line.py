"""The run's status line names the running job, its phase, and the phase's own progress."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from benchmarks.progress import JobProgress
from benchmarks.run import main
from datasets.format import save_slices
from methods.progress import observe_progress, progress_bar
from tests.conftest import make_tiny_slices


def test_line_shows_job_phase_and_phase_eta() -> None:
    now = [0.0]
    stream = io.StringIO()
    progress = JobProgress(4, stream=stream, clock=lambda: now[0], min_interval=0, inplace=False)
    progress.running = 1
    progress.enter_phase("ae T1 seed 0", "fit")
    assert "now: ae T1 seed 0 [fit, 0s in]" in stream.getvalue()
    assert "ETA after the first job" in progress.line()  # no finished job yet, no invented total
    now[0] = 20.0
    progress.on_step("fit ae", 4, 10, "epoch")
    line = progress.line()
    assert "fit ae 4/10 epoch" in line and "20s in" in line
    assert progress.phase_eta_seconds() == pytest.approx(20.0 * 6 / 4)
    assert "about 30s left" in line


def test_log_prints_a_heartbeat_when_nothing_changes() -> None:
    now = [0.0]
    stream = io.StringIO()
    progress = JobProgress(2, stream=stream, clock=lambda: now[0], min_interval=0, heartbeat=30, inplace=False)
    progress.running = 1
    progress.enter_phase("ae T1 seed 0", "fit")
    before = len(stream.getvalue().splitlines())
    now[0] = 10.0
    progress.draw()
    assert len(stream.getvalue().splitlines()) == before  # nothing new, within the heartbeat
    now[0] = 45.0
    progress.draw()
    assert len(stream.getvalue().splitlines()) == before + 1


def test_bars_report_every_finished_step() -> None:
    seen: list[tuple] = []
    with observe_progress(lambda *step: seen.append(step)):
        for _ in progress_bar(range(3), desc="fit x", unit="epoch", enabled=False):
            pass
    assert seen == [("fit x", 0, 3, "epoch"), ("fit x", 1, 3, "epoch"), ("fit x", 2, 3, "epoch"), ("fit x", 3, 3, "epoch")]
    assert list(progress_bar(range(2), desc="quiet", enabled=False)) == [0, 1]  # no listener: a plain bar


def test_a_real_run_reports_its_phases(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = save_slices(make_tiny_slices(n_train=8, n_val=3, n_test=5, size=32), tmp_path / "tiny-set")
    argv = ["--protocol", "S1", "--methods", "ae", "--profile", "tiny", "--data", str(data), "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    for phase in ("build data", "fit", "score test", "metrics"):
        assert f"now: ae T1 seed 0 [{phase}" in err
    assert "fit ae" in err and "epoch" in err
    import json

    record = json.loads(next((tmp_path / "run" / "records").rglob("*.json")).read_text())
    assert record["timings"]["threads"] >= 1  # the timings table states the threads behind them
