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
