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
