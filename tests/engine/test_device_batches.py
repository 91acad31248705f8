"""Per-device batch sizes: unset, CAMSERVE_MAX_BATCH_SIZE follows the slot's device kind (8 on
the CPU, 64 on CUDA); set, it is the size on every device. Fake workers on a fake "cuda"
device (constructing torch.device("cuda", 0) needs no GPU), so no test needs one."""

from __future__ import annotations

import asyncio
import threading

import torch
from prometheus_client import generate_latest

from service.config import BATCH_DEFAULTS, Settings
from service.engine.engine import Engine
from service.engine.worker import warm_batch_sizes
from service.main import create_app
from tests.engine.conftest import run, running
from tests.engine.fakes import Script, classes, item, settings

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def test_the_default_follows_the_device_kind_and_an_explicit_setting_wins() -> None:
    unset = Settings(device="cpu")
    assert unset.max_batch_size is None
    assert (unset.batch_size_for("cpu"), unset.batch_size_for("cuda")) == (8, 64)
    assert unset.batch_size_for("mps") == BATCH_DEFAULTS["cpu"]
    explicit = Settings(device="cpu", max_batch_size=12)
    assert (explicit.batch_size_for("cpu"), explicit.batch_size_for("cuda")) == (12, 12)
    # What may be sized before the devices are known: auto may be CUDA, cpu never is.
    assert Settings(device="cpu").largest_batch_size() == 8
    assert Settings(device="auto").largest_batch_size() == 64
    assert Settings(device="cpu,cuda:1").largest_batch_size() == 64
    assert Settings(device="auto", max_batch_size=4).largest_batch_size() == 4


async def _burst(engine: Engine, tags: range) -> list[int]:
    """One request of these images, queued at once; the batch size each was computed in."""
    results = await engine.submit([item(tag) for tag in tags])
    assert classes(results) == list(tags)
    return [result.batch_size for result in results]


def test_a_cuda_slot_forms_batches_of_its_default_size(script: Script) -> None:
    async def test() -> None:
        async with running(script, devices=[CUDA], max_batch_size=None, max_queue=256) as engine:
            sizes = await _burst(engine, range(100))
            assert [len(b) for b in script.batches] == [64, 36]
            assert sizes == [64] * 64 + [36] * 36
            assert script.warmed_on == {"cuda": warm_batch_sizes(64)}

    run(test)


def test_a_cpu_slot_keeps_batches_of_eight(script: Script) -> None:
    async def test() -> None:
        async with running(script, devices=[CPU], max_batch_size=None, max_queue=256) as engine:
            await _burst(engine, range(100))
            assert [len(b) for b in script.batches] == [8] * 12 + [4]
            assert script.warmed_on == {"cpu": list(range(1, 9))}

    run(test)


def test_an_explicit_size_wins_on_cuda(script: Script) -> None:
    async def test() -> None:
        async with running(script, devices=[CUDA], max_batch_size=16, max_queue=256) as engine:
            await _burst(engine, range(100))
            assert [len(b) for b in script.batches] == [16] * 6 + [4]
            assert script.warmed_on == {"cuda": warm_batch_sizes(16)}

    run(test)


async def _hold(engine: Engine, script: Script, kind: str) -> asyncio.Task[object]:
    """Single images until the slot of ``kind`` (gate closed) holds one; the others pass."""
    for tag in range(200, 256):
        before = len(script.device_batches)
        task: asyncio.Task[object] = asyncio.create_task(engine.submit([item(tag)]))
        await script.until(lambda b=before: len(script.device_batches) > b, "a slot took the image")  # type: ignore[misc]
        if script.device_batches[before][0] == kind:
            return task
        await task
    raise AssertionError(f"no {kind} slot took an image")


def test_cuda_and_cpu_slots_side_by_side_each_form_their_own_size(script: Script) -> None:
    async def test() -> None:
        cpu_gate, cuda_gate = threading.Event(), threading.Event()
        script.gates.update(cpu=cpu_gate, cuda=cuda_gate)
        cpu_gate.set()
        async with running(script, devices=[CUDA, CPU], max_batch_size=None, max_queue=256) as engine:
            assert script.warmed_on == {"cuda": warm_batch_sizes(64), "cpu": list(range(1, 9))}
            # The CUDA slot busy: the CPU slot takes a burst in batches of 8 at most.
            held = await _hold(engine, script, "cuda")
            start = len(script.device_batches)
            await _burst(engine, range(20))
            assert script.device_batches[start:] == [("cpu", list(range(8))), ("cpu", list(range(8, 16))),
                                                     ("cpu", list(range(16, 20)))]
            cuda_gate.set()
            await held
            # The CPU slot busy: the CUDA slot takes a burst in batches of up to 64.
            cpu_gate.clear()
            held = await _hold(engine, script, "cpu")
            start = len(script.device_batches)
            await _burst(engine, range(100))
            assert [(kind, len(tags)) for kind, tags in script.device_batches[start:]] == [
                ("cuda", 64), ("cuda", 36)]
            cpu_gate.set()
            await held

    run(test)


def test_the_batch_size_histogram_reaches_the_largest_device_size() -> None:
    def buckets(**overrides: object) -> str:
        devices = overrides.pop("devices", None)
        app = create_app(settings(**overrides), worker_factory=Script().factory, devices=devices)  # type: ignore[arg-type]
        app.state.metrics.observe_batch("mobilenet_v2", "x", 1, [], 0.0)
        return generate_latest(app.state.metrics.registry).decode()

    assert 'le="64.0"' in buckets(max_batch_size=None, devices=[CUDA])
    assert 'le="64.0"' in buckets(max_batch_size=None, device="auto")
    cpu = buckets(max_batch_size=None, device="cpu")
    assert 'le="8.0"' in cpu and 'le="16.0"' not in cpu
    assert 'le="16.0"' not in buckets(max_batch_size=4, devices=[CUDA])
