"""Engines built on the fake worker, run inside ``asyncio.run`` with an overall bound."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import pytest
import torch

from service.engine.engine import Engine
from service.metrics import Metrics
from tests.engine.fakes import WAIT_S, Script, item, settings, specs


@asynccontextmanager
async def running(
    script: Script, devices: list[torch.device] | None = None, **overrides: object
) -> AsyncIterator[Engine]:
    """A started engine on fake workers; stopped (gate opened first) on the way out."""
    script.bind()
    engine = Engine(settings(**overrides), specs(), script.factory, Metrics(), devices)
    await engine.start()
    assert engine.state == "ready", engine.failure
    try:
        yield engine
    finally:
        script.gate.set()
        await engine.stop(drain_timeout_s=WAIT_S)


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(3 * WAIT_S):
            await test()

    asyncio.run(bounded())


async def blocked(engine: Engine, script: Script, tag: int = 200) -> asyncio.Task[Any]:
    """Close the gate and occupy the (single) worker with one image; returns its request."""
    script.gate.clear()
    before = len(script.batches)
    task = asyncio.create_task(engine.submit([item(tag)]))
    await script.until(lambda: len(script.batches) > before, "the worker took the blocking image")
    return task


async def queued(engine: Engine, script: Script, *submissions: Awaitable[Any]) -> list[asyncio.Task[Any]]:
    """Start submissions in order, each queued before the next starts."""
    tasks = []
    for submission in submissions:
        depth = engine.queue_depth
        tasks.append(asyncio.ensure_future(submission))
        await script.until(lambda d=depth: engine.queue_depth > d, "the request was queued")  # type: ignore[misc]
    return tasks


@pytest.fixture
def script() -> Script:
    return Script()
