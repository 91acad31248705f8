"""Whose turn it is on a device: light work first, heavy work in turns, one holder at a time.

Every computation on a device holds its turn while it runs: the worker thread's light batches
and one-off calls, and each heavy explanation's own thread. A heavy explanation gives its turn
back at every pass boundary (:meth:`DeviceTurns.pass_turn`, called by
:mod:`service.cams.passes`); the next holder is then the oldest waiting light call if there
is one, else the heavy explanation that has waited longest, so light requests wait for at most
one chunk of heavy work and heavy requests advance round robin, none starving another.

Plain threading: the holders are threads, and a turn changes hands between two torch calls.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager


class DeviceTurns:
    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._holder: object | None = None
        self._light: deque[object] = deque()
        self._heavy: deque[object] = deque()

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
    def heavy(self, holder: object) -> Iterator[None]:
        """Hold the device for ``holder``'s heavy explanation, between its pass boundaries."""
        self._acquire(holder, self._heavy)
        try:
            yield
        finally:
            self._release(holder)

    def pass_turn(self, holder: object) -> None:
        """At a pass boundary: let waiting work have the device, then wait for it back."""
        with self._changed:
            if self._holder is not holder:
                raise RuntimeError("pass_turn by a thread that does not hold the device")
            if not self._light and not self._heavy:
                return
            self._heavy.append(holder)
            self._holder = None
            self._grant()
            while self._holder is not holder:
                self._changed.wait()

    @property
    def waiting(self) -> tuple[int, int]:
        """(light, heavy) holders waiting for the device."""
        with self._changed:
            return len(self._light), len(self._heavy)

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
                for line in (self._light, self._heavy):
                    if holder in line:
                        line.remove(holder)
            self._grant()

    def _grant(self) -> None:
        if self._holder is None:
            if self._light:
                self._holder = self._light.popleft()
            elif self._heavy:
                self._holder = self._heavy.popleft()
        self._changed.notify_all()
