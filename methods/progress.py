"""Progress bars for long loops (training epochs, scoring batches).

One switch for a whole run: ``UAD_BENCH_PROGRESS=0`` hides every bar (the runner's
``--no-progress`` sets it). It is read at each call, so it also reaches Ray workers that
inherit the environment and tests that toggle it.
"""

from __future__ import annotations

import os
from typing import Iterable, TypeVar

T = TypeVar("T")

PROGRESS_ENV = "UAD_BENCH_PROGRESS"


def progress_enabled() -> bool:
    return os.environ.get(PROGRESS_ENV, "1") != "0"


def progress_bar(iterable: Iterable[T], desc: str, unit: str = "it", enabled: bool = True):
    """A tqdm bar over ``iterable`` (cleared when done), or a silent one when switched off."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, unit=unit, leave=False, disable=not (enabled and progress_enabled()))
