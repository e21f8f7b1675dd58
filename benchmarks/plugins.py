"""Method plugins named by module: ``UAD_BENCH_PLUGINS=pkg.mod1,pkg.mod2``.

Entry points (``uad_bench.methods``) cover installed packages. A module that is only on
the path (a lab's own method, a test's toy method) registers itself with
``@register_method`` when imported; listing it in ``UAD_BENCH_PLUGINS`` makes every
process import it: the driver, local jobs, Ray tasks and Tune trials (the executors
forward the variable to workers through the Ray runtime environment).
"""

from __future__ import annotations

import importlib
import os

ENV_VAR = "UAD_BENCH_PLUGINS"


class PluginError(ImportError):
    """A module named in UAD_BENCH_PLUGINS could not be imported."""


def plugin_modules(spec: str | None = None) -> list[str]:
    text = os.environ.get(ENV_VAR, "") if spec is None else spec
    return [name.strip() for name in text.split(",") if name.strip()]


def load_plugins(spec: str | None = None) -> list[str]:
    """Import the plugin modules (idempotent: Python caches imports); returns their names."""
    names = plugin_modules(spec)
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # say which variable named the broken module
            raise PluginError(f"{ENV_VAR}: cannot import plugin module {name!r}: {type(exc).__name__}: {exc}") from exc
    return names
