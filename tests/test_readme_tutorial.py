"""The README's plug-in tutorial must run as written (and stay under 40 lines)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # Ray / Tune / a subprocess run: deselect with -m 'not slow'

ROOT = Path(__file__).resolve().parent.parent


def _tutorial_code() -> str:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    tutorial = [b for b in blocks if "register_method" in b]
    assert len(tutorial) == 1, "the README has exactly one plug-in tutorial"
    return tutorial[0]


def test_tutorial_is_short_and_runs_end_to_end(tmp_path):
    code = _tutorial_code()
    assert len(code.strip().splitlines()) <= 40
    (tmp_path / "my_method.py").write_text(code)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "my_method.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = list((tmp_path / "results" / "runs" / "meandev" / "records").rglob("*.json"))
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    assert record["status"] == "ok" and record["method"] == "meandev" and record["protocol"]["name"] == "S1"
    assert 0 < record["metrics"]["max_dice"] <= 1
