"""Print what each enabled benchmark measured (its ``extra_info``) in pytest's own summary.

pytest-benchmark's table shows timings only; the ratios and throughputs a benchmark
computes (loop / exact, slices/s, MFU) go into ``benchmark.extra_info`` and would
otherwise be visible only in the JSON or with ``-s``.
"""

from __future__ import annotations

from typing import Any

import pytest

_MEASURED: list[tuple[str, dict[str, Any]]] = []


@pytest.fixture(autouse=True)
def _collect_extra_info(request: pytest.FixtureRequest):
    bench = request.getfixturevalue("benchmark") if "benchmark" in request.fixturenames else None
    yield
    if bench is not None and not bench.disabled and bench.extra_info:
        _MEASURED.append((request.node.nodeid, dict(bench.extra_info)))


def _text(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _MEASURED:
        return
    terminalreporter.section("uad-bench measurements (benchmark extra_info)")
    for nodeid, info in _MEASURED:
        terminalreporter.write_line(f"{nodeid}: " + ", ".join(f"{k}={_text(v)}" for k, v in info.items()))
