"""Whose turn it is on a device: light work first, heavy work in turns, one holder at a time.

Every computation on a device holds its turn while it runs: the worker thread's light batches
and one-off calls, and each heavy explanation's own thread. A heavy explanation gives its turn
back at every pass boundary (:meth:`DeviceTurns.pass_turn`, called by
:mod:`service.cams.passes`); the next holder is then the oldest waiting light call if there
is one, else the heavy explanation of a synchronous request that has waited longest, else the
job (background) that has, so light requests wait for at most one chunk of heavy work and heavy
requests advance round robin. Jobs give way to synchronous heavy requests, which have a client
waiting on a deadline, but never starve: after :data:`BACKGROUND_EVERY` turns in a row went to
synchronous heavy work while a job waited, the next goes to the job.

Plain threading: the holders are threads, and a turn changes hands between two torch calls.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

BACKGROUND_EVERY = 4  # a waiting job gets at least one heavy turn in this many


class DeviceTurns:
    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._holder: object | None = None
        self._light: deque[object] = deque()
        self._heavy: deque[object] = deque()
        self._background: deque[object] = deque()
        self._in_background: set[int] = set()  # ids of background holders
        self._passed_over = 0  # heavy turns given to synchronous work while a job waited

    @contextmanager
    def light(self) -> Iterator[None]:
        """Hold the device for a light call, ahead of every heavy explanation."""
        holder = object()
        self._acquire(holder, self._light)
        try:
            yield
        finally:
            self._release(holder)

    @contextmanager
    def heavy(self, holder: object, background: bool = False) -> Iterator[None]:
        """Hold the device for ``holder``'s heavy explanation, between its pass boundaries;
        ``background`` for a job's."""
        if background:
            self._in_background.add(id(holder))
        try:
            self._acquire(holder, self._line(holder))
            try:
                yield
            finally:
                self._release(holder)
        finally:
            self._in_background.discard(id(holder))

    def pass_turn(self, holder: object) -> None:
        """At a pass boundary: let waiting work have the device, then wait for it back."""
        with self._changed:
            if self._holder is not holder:
                raise RuntimeError("pass_turn by a thread that does not hold the device")
            if not self._light and not self._heavy and not self._background:
                return
            self._line(holder).append(holder)
            self._holder = None
            self._grant()
            while self._holder is not holder:
                self._changed.wait()

    @property
    def waiting(self) -> tuple[int, int]:
        """(light, heavy) holders waiting for the device."""
        with self._changed:
            return len(self._light), len(self._heavy) + len(self._background)

    def _line(self, holder: object) -> deque[object]:
        return self._background if id(holder) in self._in_background else self._heavy

    def _acquire(self, holder: object, line: deque[object]) -> None:
        with self._changed:
            line.append(holder)
            self._grant()
            while self._holder is not holder:
                self._changed.wait()

    def _release(self, holder: object) -> None:
        with self._changed:
            if self._holder is holder:
                self._holder = None
            else:  # never granted (an error while waiting): just leave the line
                for line in (self._light, self._heavy, self._background):
                    if holder in line:
                        line.remove(holder)
            self._grant()

    def _grant(self) -> None:
        if self._holder is None:
            if self._light:
                self._holder = self._light.popleft()
            elif self._heavy and not (self._background and self._passed_over >= BACKGROUND_EVERY - 1):
                self._holder = self._heavy.popleft()
                self._passed_over = self._passed_over + 1 if self._background else 0
            elif self._background:
                self._holder = self._background.popleft()
                self._passed_over = 0
        self._changed.notify_all()
