"""The one way this service puts hooks on a model's modules.

Every hook is registered through :func:`forward_hook`, :func:`forward_pre_hook` or
:func:`forward_hooks`, context managers that remove them in ``finally``, even when the pass
raises (a hook left behind would run in every later request's pass). They also count, per
thread, how many hooks that thread holds: the pass scheduler (:mod:`service.cams.passes`) lets
other work onto the device between two chunks of a long explanation only while the thread
holds none, so another request's forward pass can never run through a hook that is not its own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

Hook = Callable[..., Any]

_held = threading.local()


def held() -> int:
    """How many hooks the calling thread has registered and not yet removed."""
    return int(getattr(_held, "count", 0))


def _modules(modules: nn.Module | Iterable[nn.Module]) -> list[nn.Module]:
    return [modules] if isinstance(modules, nn.Module) else list(modules)


def forward_hook(modules: nn.Module | Iterable[nn.Module], hook: Hook) -> AbstractContextManager[None]:
    """``hook`` as a forward hook on ``modules`` (one module or several) while active; a
    hook that returns a value replaces the module's output."""
    return forward_hooks((module, hook) for module in _modules(modules))


def forward_pre_hook(
    modules: nn.Module | Iterable[nn.Module], hook: Hook
) -> AbstractContextManager[None]:
    """``hook`` as a forward pre-hook on ``modules`` while active."""
    return _registered([partial(module.register_forward_pre_hook, hook) for module in _modules(modules)])


def forward_hooks(pairs: Iterable[tuple[nn.Module, Hook]]) -> AbstractContextManager[None]:
    """Each ``(module, hook)`` pair's hook as a forward hook on its module while active,
    registered in the given order."""
    return _registered([partial(module.register_forward_hook, hook) for module, hook in pairs])


@contextmanager
def _registered(registrations: list[Callable[[], RemovableHandle]]) -> Iterator[None]:
    handles: list[RemovableHandle] = []
    _held.count = held() + len(registrations)
    try:
        for register in registrations:
            handles.append(register())
        yield
    finally:
        for handle in handles:
            handle.remove()
        _held.count = held() - len(registrations)
