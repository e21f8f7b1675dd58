"""Live job progress: done / running / queued / failed and an ETA, on one status line.

On a terminal the line is redrawn in place (``\\r``); in a log file (a cluster job, CI)
one line is printed per change, at most every ``min_interval`` seconds, and otherwise
every ``heartbeat`` seconds, so a long job never goes silent. The ETA is the remaining
job count divided by the rate of jobs finished *in this run* (jobs skipped because their
records already existed do not count), so a resumed run does not promise a finish that
is too early.

When jobs run in this process (the local executor), the line also names the running job,
its phase (build data, fit, score, metrics, ...) and, from the phase's own progress bar
(:func:`methods.progress.observe_progress`), how far it is and when the phase will end.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, TextIO

#: ``(job label, phase)`` when a job in this process enters a phase.
PhaseListener = Callable[[str, str], None]
_phase_listener: PhaseListener | None = None


def report_phase(job: str, phase: str) -> None:
    """Say that ``job`` (a short label) enters ``phase``; a no-op unless a runner observes."""
    if _phase_listener is not None:
        _phase_listener(job, phase)


@contextmanager
def observe_phases(listener: PhaseListener) -> Iterator[None]:
    global _phase_listener
    previous, _phase_listener = _phase_listener, listener
    try:
        yield
    finally:
        _phase_listener = previous


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(max(0.0, seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class JobProgress:
    """Counts jobs of one run and renders a status line.

    ``skipped`` jobs were finished before this run started; ``update`` reports how
    many run right now (the rest of the unfinished ones are queued); ``advance`` marks jobs
    finished in this run.
    """

    def __init__(
        self,
        total: int,
        skipped: int = 0,
        enabled: bool = True,
        stream: TextIO | None = None,
        desc: str = "jobs",
        min_interval: float = 1.0,
        heartbeat: float = 30.0,
        inplace: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.skipped = skipped
        self.ok = 0
        self.failed = 0
        self.running = 0
        self.partial = 0  # jobs finished inside groups that are still running
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.desc = desc
        self.min_interval = min_interval
        self.heartbeat = heartbeat
        self._clock = clock
        # the job running in this process: its label, phase, and the phase's own progress
        self.job: str | None = None
        self.phase: str | None = None
        self._phase_start = 0.0
        self._step: tuple[str, int, int | None, str] | None = None
        self._start = clock()
        self._last_draw = float("-inf")
        self._last_counts: tuple = ()
        # Redraw in place only on a terminal, and only when nothing else draws bars there.
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)()) if inplace is None else inplace

    # ------------------------------------------------------------------ counts
    @property
    def done(self) -> int:
        return self.skipped + self.ok + self.failed + self.partial

    @property
    def remaining(self) -> int:
        return max(0, self.total - self.done)

    @property
    def queued(self) -> int:
        return max(0, self.remaining - self.running)

    def elapsed(self) -> float:
        return self._clock() - self._start

    def eta_seconds(self) -> float | None:
        finished = self.ok + self.failed + self.partial
        if self.remaining == 0:
            return 0.0
        if finished == 0:
            return None
        return self.remaining * self.elapsed() / finished

    # ------------------------------------------------------------------ updates
    def update(self, running: int | None = None, partial: int | None = None) -> None:
        """New in-flight counts; redraws (throttled) so elapsed time and ETA stay current."""
        if running is not None:
            self.running = running
        if partial is not None:
            self.partial = partial
        self.draw()

    def enter_phase(self, job: str, phase: str) -> None:
        """The running job entered a new phase (a :data:`PhaseListener`)."""
        self.job, self.phase, self._phase_start, self._step = job, phase, self._clock(), None
        self.draw(force=True)

    def on_step(self, desc: str, done: int, total: int | None, unit: str) -> None:
        """A progress bar of the running job advanced (a ``methods.progress`` listener)."""
        self._step = (desc, done, total, unit)
        self.draw()

    def phase_eta_seconds(self) -> float | None:
        """Time left in the current phase, from its bar's rate so far (None before a step ends)."""
        if self._step is None:
            return None
        _, done, total, _ = self._step
        if not total or done <= 0:
            return None
        return (self._clock() - self._phase_start) * (total - done) / done

    def job_text(self) -> str:
        if self.job is None:
            return ""
        text = f"now: {self.job} [{self.phase}"
        if self._step is not None:
            desc, done, total, unit = self._step
            text += f": {desc} {done}/{total if total else '?'} {unit}"
        text += f", {format_seconds(self._clock() - self._phase_start)} in"
        eta = self.phase_eta_seconds()
        if eta is not None:
            text += f", about {format_seconds(eta)} left"
        return text + "]"

    def advance(self, ok: int = 0, failed: int = 0, draw: bool = True) -> None:
        self.ok += ok
        self.failed += failed
        if draw and (ok or failed):
            self.draw(force=True)

    def line(self) -> str:
        parts = [f"{self.desc} {self.done}/{self.total} done"]
        if self.skipped:
            parts.append(f"{self.skipped} skipped (finished before)")
        parts.append(f"{self.running} running")
        if self.queued:
            parts.append(f"{self.queued} queued")
        parts.append(f"{self.failed} failed")
        parts.append(f"elapsed {format_seconds(self.elapsed())}")
        eta = self.eta_seconds()
        parts.append(f"ETA {format_seconds(eta)}" if eta is not None or self.job is None else "ETA after the first job")
        line = ", ".join(parts)
        return f"{line}; {self.job_text()}" if self.job is not None and self.running else line

    def draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = self._clock()
        text = self.line()
        if not force and (now - self._last_draw < self.min_interval):
            return
        counts = (self.done, self.running, self.failed, self.job, self.phase)
        if not self._tty and counts == self._last_counts and now - self._last_draw < self.heartbeat:
            return  # in a log: a line when something changes, else one per heartbeat
        self._last_draw, self._last_counts = now, counts
        if self._tty:
            self.stream.write("\r\033[K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self.draw(force=True)
        if self._tty:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> "JobProgress":
        self.draw(force=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
