"""Real workers on several devices (two CPU slots here, two GPUs in production) start: their
models are loaded one slot after the other, since torch.fx tracing during one slot's load
would capture another slot's forward on another thread."""

from __future__ import annotations

import asyncio

import torch

from service.engine.engine import Engine
from service.models.spec import embedded_default
from tests.engine.fakes import settings


def test_an_engine_with_two_real_workers_starts() -> None:
    async def test() -> None:
        engine = Engine(settings(warmup=True, max_batch_size=2), [embedded_default()],
                        devices=[torch.device("cpu")] * 2)
        await engine.start()
        try:
            assert engine.state == "ready", engine.failure
            assert len(engine.workers) == 2
        finally:
            await engine.stop(5)

    asyncio.run(test())
