"""`--help` and argument errors answer at once: the CLIs load torch, Ray and pandas only after parsing."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "ray", "pandas", "matplotlib", "monai", "diffusers")


@pytest.mark.parametrize("module", ["benchmarks.run", "benchmarks.ablate", "benchmarks.leaderboard"])
def test_help_imports_no_heavy_module(module: str) -> None:
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['{module}', '--help']\n"
        "try:\n"
        f"    runpy.run_module('{module}', run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n"
        f"loaded = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
        "assert not loaded, f'--help imported {loaded}'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


def test_argument_error_is_one_line_without_heavy_imports() -> None:
    code = (
        "import runpy, sys\n"
        "sys.argv = ['benchmarks.run', '--protocol', 'S3']\n"
        "try:\n"
        "    runpy.run_module('benchmarks.run', run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 2, exc.code\n"
        "assert 'torch' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "invalid choice: 'S3'" in done.stderr and "Traceback" not in done.stderr


def _options(parser) -> dict[str, str]:
    return {opt: action.help or "" for action in parser._actions for opt in action.option_strings}


def test_run_and_ablate_share_one_vocabulary_and_every_option_has_help() -> None:
    from benchmarks import ablate, run

    run_opts, ablate_opts = _options(run.build_parser()), _options(ablate.build_parser())
    assert not [o for o, h in {**run_opts, **ablate_opts}.items() if not h and o not in ("-h", "--help")]
    shared = {"--protocol", "--methods", "--data", "--profile", "--seeds", "--modalities", "--set", "--device", "--out",
              "--checkpoints", "--executor", "--address", "--gpus-per-job", "--cpus-per-job", "--retries", "--threads",
              "--examples", "--replace-changed", "--no-progress"}
    assert shared <= set(run_opts) and shared <= set(ablate_opts)
    same_help = shared - {"--methods", "--out"}
    assert {o: run_opts[o] for o in same_help} == {o: ablate_opts[o] for o in same_help}


def test_ablate_set_takes_the_run_spelling() -> None:
    from benchmarks.ablate import parse_base_overrides
    from benchmarks.run import UsageError

    assert parse_base_overrides(["madad:gamma=0.4", "sigma=0"], "madad") == {"gamma": "0.4", "sigma": "0"}
    with pytest.raises(UsageError, match="not among --methods"):
        parse_base_overrides(["ae:epochs=3"], "madad")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--threads", "-1"], "--threads -1: give at least 1"),
        (["--threads", "0"], "--threads 0"),
        (["--retries", "-1"], "--retries -1: give 0 or more"),
        (["--seeds", "0,1,0"], "given twice"),
        (["--variants", "ae:epochs="], "non-empty values"),
        (["--variants", "ae:epochs=3,,4"], "non-empty values"),
        (["--set", "ae:epochs=-3"], "epochs: must be at least 1"),
        (["--set", "ae:epochs=true"], "epochs: expected int"),
        (["--set", "ae:epochs=1.5"], "epochs: expected int"),
        (["--set", "ae:epochs=none"], "none is not allowed"),
        (["--set", "ae:lr=0"], "learning rate must be > 0"),
        (["--set", "ae:lr=NaN"], "must be finite"),
        (["--set", "ae:lr=nan"], "expected a float"),
    ],
)
def test_bad_values_fail_before_any_work_in_one_line(extra: list[str], message: str, tmp_path, capsys) -> None:
    from benchmarks.run import main

    with pytest.raises(SystemExit) as exc:
        main(["--protocol", "S1", "--methods", "ae", "--out", str(tmp_path / "run"), *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing was started


def test_out_that_is_a_file_or_unwritable_fails_at_once(tmp_path, capsys, monkeypatch) -> None:
    import benchmarks.run as run

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(SystemExit):
        run.main(["--protocol", "S1", "--methods", "ae", "--out", str(a_file)])
    assert "this is a file, not a folder" in capsys.readouterr().err
    # root may write anywhere, so the permission answer is simulated: nothing here is writable
    monkeypatch.setattr(run.os, "access", lambda path, mode: False)
    with pytest.raises(SystemExit):
        run.main(["--protocol", "S1", "--methods", "ae", "--out", str(tmp_path / "new" / "run")])
    assert f"{tmp_path} is not writable" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["benchmarks.run", "benchmarks.ablate"])
def test_a_broken_plugin_is_one_line(module: str) -> None:
    import os

    env = dict(os.environ, UAD_BENCH_PLUGINS="nosuchmod_xyz")
    done = subprocess.run([sys.executable, "-m", module, "--protocol", "S1", "--methods", "ae"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2
    assert "cannot import plugin module 'nosuchmod_xyz'" in done.stderr and "Traceback" not in done.stderr


def test_default_threads_leave_busy_cores_alone() -> None:
    from benchmarks.run import default_threads

    assert default_threads("local", 1.0, cores=2, load=0.1) == 2  # idle machine: every core
    assert default_threads("local", 1.0, cores=2, load=2.3) == 1  # another job on both cores: never oversubscribe
    assert default_threads("local", 1.0, cores=16, load=6.0) == 10
    assert default_threads("ray", 2.0, cores=16, load=0.0) == 2  # each Ray job its CPU share
    assert default_threads("ray", 0.5, cores=16, load=0.0) == 1
