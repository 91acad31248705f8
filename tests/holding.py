"""Holding a function of the service mid-call, to see what else still answers meanwhile."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest


@contextmanager
def held(
    monkeypatch: pytest.MonkeyPatch, owner: object, name: str, timeout_s: float = 20.0
) -> Iterator[threading.Event]:
    """Replace ``owner.name`` with a version that waits, once called, until the block ends.

    Yields the event set when a call has entered the hold. A call still held after
    ``timeout_s`` raises, so whatever waited on the held call fails instead of hanging.
    """
    entered, release = threading.Event(), threading.Event()
    real: Callable[..., Any] = getattr(owner, name)

    def holding(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        if not release.wait(timeout_s):
            raise TimeoutError(f"{name} was held for {timeout_s} s")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, holding)
    try:
        yield entered
    finally:
        release.set()
