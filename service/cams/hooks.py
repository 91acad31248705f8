"""The one way this service puts hooks on a model's modules.

Every hook is registered through :func:`forward_hook` (or :func:`forward_pre_hook`), a context
manager that removes it in ``finally``, even when the pass raises. It also counts, per thread,
how many hooks that thread holds: the pass scheduler (:mod:`service.cams.passes`) lets other
work onto the device between two chunks of a long explanation only while the thread holds
none, so another request's forward pass can never run through a hook that is not its own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

_held = threading.local()


def held() -> int:
    """How many hooks the calling thread has registered and not yet removed."""
    return int(getattr(_held, "count", 0))


@contextmanager
def forward_hook(modules: nn.Module | Iterable[nn.Module], hook: Callable[..., Any]) -> Iterator[None]:
    """``hook`` as a forward hook on ``modules`` (one module or several) while active."""
    with _registered(modules, lambda module: module.register_forward_hook(hook)):
        yield


@contextmanager
def forward_pre_hook(modules: nn.Module | Iterable[nn.Module], hook: Callable[..., Any]) -> Iterator[None]:
    """``hook`` as a forward pre-hook on ``modules`` while active."""
    with _registered(modules, lambda module: module.register_forward_pre_hook(hook)):
        yield


@contextmanager
def _registered(
    modules: nn.Module | Iterable[nn.Module], register: Callable[[nn.Module], Any]
) -> Iterator[None]:
    targets = [modules] if isinstance(modules, nn.Module) else list(modules)
    handles = []
    _held.count = held() + len(targets)
    try:
        for module in targets:
            handles.append(register(module))
        yield
    finally:
        for handle in handles:
            handle.remove()
        _held.count = held() - len(targets)
