"""Progress bars for long loops (training epochs, scoring batches).

One switch for a whole run: ``UAD_BENCH_PROGRESS=0`` hides every bar (the runner's
``--no-progress`` sets it). It is read at each call, so it also reaches Ray workers that
inherit the environment and tests that toggle it.

A runner may also *observe* the bars: :func:`observe_progress` registers a callback that
receives ``(desc, done, total, unit)`` after every step of every bar in this process, so
the run's status line can say what the running job is doing and when that will end.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")

PROGRESS_ENV = "UAD_BENCH_PROGRESS"

#: ``(desc, done, total, unit)`` after each step of a bar; ``total`` may be None.
ProgressListener = Callable[[str, int, "int | None", str], None]
_listener: ProgressListener | None = None


def progress_enabled() -> bool:
    return os.environ.get(PROGRESS_ENV, "1") != "0"


@contextmanager
def observe_progress(listener: ProgressListener) -> Iterator[None]:
    """Send every bar's steps to ``listener`` while the context is open (one listener at a time)."""
    global _listener
    previous, _listener = _listener, listener
    try:
        yield
    finally:
        _listener = previous


class _ObservedBar:
    """A tqdm bar that also reports each finished step to the listener."""

    def __init__(self, bar: Any, listener: ProgressListener, desc: str, unit: str, total: int | None) -> None:
        self._bar, self._listener, self._desc, self._unit, self._total = bar, listener, desc, unit, total

    def __iter__(self) -> Iterator[Any]:
        self._listener(self._desc, 0, self._total, self._unit)
        for done, item in enumerate(self._bar, start=1):
            yield item  # resumes when the caller's loop body has finished this step
            self._listener(self._desc, done, self._total, self._unit)

    def __getattr__(self, name: str) -> Any:  # set_postfix, close, ...
        return getattr(self._bar, name)


def progress_bar(iterable: Iterable[T], desc: str, unit: str = "it", enabled: bool = True):
    """A tqdm bar over ``iterable`` (cleared when done), or a silent one when switched off."""
    from tqdm.auto import tqdm

    bar = tqdm(iterable, desc=desc, unit=unit, leave=False, disable=not (enabled and progress_enabled()))
    if _listener is None:
        return bar
    total = len(iterable) if hasattr(iterable, "__len__") else None  # type: ignore[arg-type]
    return _ObservedBar(bar, _listener, desc, unit, total)
