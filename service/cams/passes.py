"""Long explanations as a sequence of bounded passes, with room for other work in between.

A method that runs many forward passes (the Score-CAM family's masked inputs, Ablation-CAM's
ablated channels, Smooth Grad-CAM++'s noisy copies, faithfulness curves, ``aug_smooth``'s
variants) runs them in chunks through :func:`chunked` or, for one pass at a time,
:func:`step`. Outside a scheduled run (a test, the benchmark, a light request) chunks are the
method's own ``batch_size`` and nothing else happens. Inside one (:func:`active`, set by the
worker for heavy requests) every chunk boundary:

- stops the explanation with :class:`PassesCancelled` when its request was cancelled (client
  gone, job cancelled) or its deadline has passed, so its remaining chunks never run;
- hands the device to waiting work (:class:`Turn`): light requests first, then the other heavy
  ones in turn, but only while this thread holds no hook (:mod:`service.models.hooks`), so
  nothing of this request stays on the model while another request's pass runs through it;
- counts the passes done, for progress and the measured pass rate;
- sizes the next chunk so it takes about ``budget_s`` at the rate measured so far (never more
  rows than the method's ``batch_size``), so a chunk is bounded by time, not by a count that
  would mean 50 ms on one device and 2 s on another.

No tensor is touched here: the engine and the methods both import it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

from service.models import hooks

_local = threading.local()


class PassesCancelled(Exception):
    """The explanation was stopped at a pass boundary; ``reason`` is ``cancelled`` or ``deadline``."""

    def __init__(self, reason: str, done: int) -> None:
        super().__init__(f"stopped at a pass boundary ({reason}) after {done} passes")
        self.reason = reason
        self.done = done


class Turn(Protocol):
    """The device's turn as a scheduled run holds it (:class:`service.engine.turns.DeviceTurns`)."""

    def pass_turn(self, holder: object) -> None:
        """Give the device to waiting work, if any, and return once it is this holder's again."""


@dataclass
class PassRun:
    """One heavy explanation's passes: how far it is, and whether it may go on."""

    deadline: float  # time.monotonic() after which no further pass runs
    total: float  # passes expected, in forward-pass equivalents (an estimate until the run ends; never below ``done``)
    budget_s: float = 0.1  # target duration of one chunk
    seconds_per_pass: float = 0.02  # first guess at one image's forward pass on this device
    turn: Turn | None = None
    on_progress: Callable[[PassRun], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: float = 0.0  # forward-pass equivalents run so far (a tail pass counts less than one)
    busy_s: float = 0.0  # seconds spent computing chunks (not waiting for the device)
    _rates: dict[str, float] = field(default_factory=dict)

    def boundary(self) -> None:
        """Between two chunks: stop if asked to, let waiting work run, stop if asked meanwhile."""
        self._check()
        if self.turn is not None and hooks.held() == 0:
            self.turn.pass_turn(self)
            self._check()

    def count(self, passes: float, seconds: float) -> None:
        self.done += passes
        self.busy_s += seconds
        self.total = max(self.total, self.done)
        if self.on_progress is not None:
            self.on_progress(self)

    def rows_for(self, key: str, limit: int) -> int:
        """Rows for the next chunk of ``key``'s passes: about ``budget_s`` of work."""
        per_row = self._rates.get(key, self.seconds_per_pass)
        return max(1, min(limit, int(self.budget_s / max(per_row, 1e-6))))

    def measured(self, key: str, rows: int, seconds: float) -> None:
        self._rates[key] = seconds / max(rows, 1)

    def rate_of(self, key: str) -> float | None:
        """Seconds per pass last measured for ``key``'s chunks (None if none ran)."""
        return self._rates.get(key)

    @property
    def pass_rate(self) -> float | None:
        """Passes per second of compute so far (None before the first chunk)."""
        return self.done / self.busy_s if self.busy_s > 0 and self.done else None

    def _check(self) -> None:
        # The deadline first: a passed deadline also cancels the request's future.
        if time.monotonic() > self.deadline:
            raise PassesCancelled("deadline", round(self.done))
        if self.cancelled.is_set():
            raise PassesCancelled("cancelled", round(self.done))


def current() -> PassRun | None:
    """The scheduled run of the calling thread, if any."""
    return getattr(_local, "run", None)


@contextmanager
def active(run: PassRun) -> Iterator[PassRun]:
    """Make ``run`` the calling thread's scheduled run while the block runs."""
    previous = current()
    _local.run = run
    try:
        yield run
    finally:
        _local.run = previous


def chunked(count: int, limit: int, key: str = "", weight: float = 1.0) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` slices covering ``range(count)``, each a chunk of passes.

    ``limit`` is the most rows one chunk may hold (the method's ``batch_size``); ``key`` names
    the kind of pass, whose measured cost sizes its later chunks; ``weight`` is what one row
    counts in forward-pass equivalents, the unit of the run's estimate and progress (the
    method's ``extra_pass_cost`` for passes through the network's tail only).
    """
    run = current()
    start = 0
    while start < count:
        if run is None:
            stop = min(count, start + max(1, limit))
            yield start, stop
            start = stop
            continue
        run.boundary()
        stop = min(count, start + run.rows_for(key, max(1, limit)))
        began = time.perf_counter()
        yield start, stop
        seconds = time.perf_counter() - began
        run.measured(key, stop - start, seconds)
        run.count((stop - start) * weight, seconds)
        start = stop


def boundary(passes: int = 1) -> None:
    """A point between passes that are not chunked by :func:`chunked` (an ``aug_smooth``
    variant's shared pass): stop or yield there, and count ``passes`` about to run."""
    run = current()
    if run is not None:
        run.boundary()
        run.count(passes, 0.0)
