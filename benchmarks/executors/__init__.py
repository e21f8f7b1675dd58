"""Executors run groups of jobs: ``local`` (one after another) or ``ray`` (in parallel)."""

from __future__ import annotations

from typing import Any, Callable

EXECUTORS = ("local", "ray")


def get_executor(name: str) -> Callable[..., list[dict[str, Any]]]:
    if name == "local":
        from benchmarks.executors.local import run_local

        return run_local
    if name == "ray":
        from benchmarks.executors.ray_executor import run_ray

        return run_ray
    raise ValueError(f"unknown executor {name!r}; choose from {', '.join(EXECUTORS)}")
