"""Device faults on fake workers: a sticky CUDA error ends the service's serving (503 to all,
health checks 503, the exit callback), and out-of-memory splits after the error is let go and
caps later batches at what fitted."""

from __future__ import annotations

import pytest
import torch

from service.engine.pool import is_fatal_device_error, is_out_of_memory
from service.errors import ServiceUnavailable
from tests.engine.conftest import blocked, queued, run, running
from tests.engine.fakes import FATAL_MESSAGE, Script, classes, item


@pytest.mark.parametrize("error", [
    RuntimeError(FATAL_MESSAGE),
    RuntimeError("CUDA error: an illegal memory access was encountered\nCompile with "
                 "`TORCH_USE_CUDA_DSA` to enable device-side assertions."),
    RuntimeError("CUDA error: unspecified launch failure"),
    RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"),
    RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle)`"),
    torch.AcceleratorError("CUDA error: misaligned address"),
])
def test_sticky_cuda_errors_are_fatal(error: BaseException) -> None:
    assert is_fatal_device_error(error)
    assert not is_out_of_memory(error)


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA error: out of memory"),
    RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"),
    RuntimeError("the assert on my input failed"),  # no CUDA error named
    ValueError("CUDA error: device-side assert triggered"),  # not what torch raises
])
def test_ordinary_errors_and_out_of_memory_are_not_fatal(error: BaseException) -> None:
    assert not is_fatal_device_error(error)


def test_a_fatal_device_error_answers_everything_503_and_calls_back_once(script: Script) -> None:
    async def test() -> None:
        script.fatal = {66}
        reasons: list[str] = []
        async with running(script) as engine:
            engine.on_fatal = reasons.append
            failing = await blocked(engine, script, tag=66)
            waiting = await queued(engine, script, engine.submit([item(1)]),
                                   engine.submit([item(2), item(3)]))
            script.gate.set()
            for request in (failing, *waiting):
                with pytest.raises(ServiceUnavailable) as refused:
                    await request
                assert refused.value.status_code == 503
                assert "restarting" in str(refused.value)
            assert engine.state == "fatal"
            assert engine.failure is not None and "device-side assert triggered" in engine.failure
            assert len(reasons) == 1 and "device-side assert" in reasons[0]
            # Not retried image by image on a poisoned device, and nothing after it computed.
            assert script.batches == [[66]]
            with pytest.raises(ServiceUnavailable):
                await engine.submit([item(4)])
            assert script.batches == [[66]]
            assert engine.queue_depth == 0

    run(test)


def test_a_fatal_device_error_in_the_heavy_lane_is_fatal_too(script: Script) -> None:
    async def test() -> None:
        script.fatal = {77}
        reasons: list[str] = []
        async with running(script) as engine:
            engine.on_fatal = reasons.append
            heavy = item(77)
            heavy.heavy = True
            with pytest.raises(ServiceUnavailable):
                await engine.submit([heavy])
            assert engine.state == "fatal" and len(reasons) == 1
            with pytest.raises(ServiceUnavailable):
                await engine.submit([item(5)])
            assert 5 not in script.computed_tags()

    run(test)


def test_the_engine_stays_fatal_when_stopped(script: Script) -> None:
    async def test() -> None:
        script.fatal = {66}
        async with running(script) as engine:
            with pytest.raises(ServiceUnavailable):
                await engine.submit([item(66)])
            await engine.stop(drain_timeout_s=1)
            assert engine.state == "fatal"  # the health checks keep saying so until the exit

    run(test)


def test_out_of_memory_releases_memory_splits_and_caps_later_batches(script: Script) -> None:
    async def test() -> None:
        script.oom_above = 2
        async with running(script, max_batch_size=4) as engine:
            blocker = await blocked(engine, script)
            first = await queued(engine, script, *(engine.submit([item(tag)]) for tag in (1, 2, 3, 4)))
            script.gate.set()
            await blocker
            assert [classes(await r) for r in first] == [[1], [2], [3], [4]]
            assert script.batches[1:] == [[1, 2, 3, 4], [1, 2], [3, 4]]
            assert script.released == 1  # released before the halves ran
            # Later batches of the same kind are formed at the size that fitted.
            blocker = await blocked(engine, script)
            later = await queued(engine, script, *(engine.submit([item(tag)]) for tag in (5, 6, 7, 8)))
            script.gate.set()
            await blocker
            assert [classes(await r) for r in later] == [[5], [6], [7], [8]]
            assert script.batches[4:] == [[200], [5, 6], [7, 8]]
            assert script.released == 1  # no second out-of-memory error

    run(test)


def test_the_cap_is_per_kind_of_batch(script: Script) -> None:
    async def test() -> None:
        script.oom_above = 2
        async with running(script, max_batch_size=4) as engine:
            blocker = await blocked(engine, script)
            plain = await queued(engine, script, *(engine.submit([item(tag)]) for tag in (1, 2, 3, 4)))
            script.gate.set()
            await blocker
            for request in plain:
                await request
            # Another model's batches were never too big: they keep the full size (and split).
            script.oom_above = None
            blocker = await blocked(engine, script)
            other = await queued(engine, script,
                                 *(engine.submit([item(tag, model="other")]) for tag in (5, 6, 7, 8)))
            script.gate.set()
            await blocker
            assert [classes(await r) for r in other] == [[5], [6], [7], [8]]
            assert script.batches[-1] == [5, 6, 7, 8]

    run(test)


def test_the_split_halves_do_not_wait_for_the_cyclic_collector(script: Script) -> None:
    """The failed batch's error is let go before the halves run: nothing but the collector
    could free a tensor held by its traceback, so count what is alive at the second call."""
    import gc
    import weakref

    class Held:
        pass

    alive: list[weakref.ref[Held]] = []
    calls = 0

    async def test() -> None:
        nonlocal calls
        async with running(script, max_batch_size=4) as engine:
            worker = engine.workers[0]
            original = worker.compute

            def compute(items):  # type: ignore[no-untyped-def]
                nonlocal calls
                calls += 1
                if calls == 2:  # the first call is the blocker's
                    tensor = Held()  # a local of the failing frame, like the batch's activations
                    alive.append(weakref.ref(tensor))
                    raise torch.OutOfMemoryError("CUDA out of memory (fake)")
                if calls == 3:
                    assert alive[0]() is None, "the failed batch's locals were still alive"
                return original(items)

            worker.compute = compute  # type: ignore[method-assign]
            gc.disable()
            try:
                blocker = await blocked(engine, script)
                requests = await queued(engine, script, *(engine.submit([item(t)]) for t in (1, 2)))
                script.gate.set()
                await blocker
                assert [classes(await r) for r in requests] == [[1], [2]]
            finally:
                gc.enable()

    run(test)
    assert calls == 4

