"""Overload, deadlines, disconnects, bad inputs, crashed workers and draining, on fake workers."""

from __future__ import annotations

import asyncio

import pytest

from service.engine.engine import ClientDisconnected
from service.engine.worker import warm_batch_sizes
from service.errors import DeadlineExceeded, QueueFull, ServiceError, ServiceUnavailable
from tests.engine.conftest import blocked, queued, run, running
from tests.engine.fakes import Script, classes, item


def test_a_full_queue_refuses_at_once_with_retry_after(script: Script) -> None:
    async def test() -> None:
        async with running(script, max_queue=3) as engine:
            blocker = await blocked(engine, script)
            (waiting,) = await queued(engine, script, engine.submit([item(1), item(2), item(3)]))
            with pytest.raises(QueueFull) as refused:
                await engine.submit([item(4)])
            assert refused.value.status_code == 503
            assert int(refused.value.headers["Retry-After"]) >= 1
            assert engine.queue_depth == 3
            script.gate.set()
            await blocker
            assert classes(await waiting) == [1, 2, 3]
            assert classes(await engine.submit([item(5)])) == [5]  # room again
            assert 4 not in script.computed_tags()

    run(test)


def test_work_whose_deadline_passed_in_the_queue_is_never_computed(script: Script) -> None:
    async def test() -> None:
        async with running(script) as engine:
            blocker = await blocked(engine, script)
            with pytest.raises(DeadlineExceeded) as late:
                await engine.submit([item(7, deadline_s=0.05)])
            assert late.value.status_code == 504
            script.gate.set()
            await blocker
            assert classes(await engine.submit([item(8)])) == [8]  # queued after 7: 7 was skipped
            assert 7 not in script.computed_tags()

    run(test)


def test_the_batcher_drops_an_expired_image_and_answers_504(script: Script) -> None:
    async def test() -> None:
        async with running(script) as engine:
            blocker = await blocked(engine, script)
            # The request's own wait lasts as long as its longest deadline; the expired image
            # is caught by the batcher, which fails the request without computing that image.
            (request,) = await queued(engine, script, engine.submit([item(7, deadline_s=-1), item(8)]))
            script.gate.set()
            await blocker
            with pytest.raises(DeadlineExceeded):
                await request
            assert 7 not in script.computed_tags()

    run(test)


def test_a_client_that_disconnects_has_its_unstarted_work_dropped(script: Script) -> None:
    async def test() -> None:
        async with running(script) as engine:
            blocker = await blocked(engine, script)
            gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            (request,) = await queued(engine, script, engine.submit([item(7), item(8)], disconnected=gone))
            gone.set_result(None)
            with pytest.raises(ClientDisconnected):
                await request
            script.gate.set()
            await blocker
            assert classes(await engine.submit([item(9)])) == [9]
            assert script.computed_tags() == [200, 9]

    run(test)


def test_a_poisoned_image_fails_alone_and_its_neighbours_succeed(script: Script) -> None:
    async def test() -> None:
        script.poison = {2}
        async with running(script) as engine:
            blocker = await blocked(engine, script)
            good, bad, other = await queued(
                engine, script, engine.submit([item(1)]), engine.submit([item(2)]), engine.submit([item(3)])
            )
            script.gate.set()
            await blocker
            assert classes(await good) == [1]
            assert classes(await other) == [3]
            with pytest.raises(ServiceError) as failed:
                await bad
            assert failed.value.status_code == 500
            assert script.batches[1:] == [[1, 2, 3], [1], [2], [3]]
            assert classes(await engine.submit([item(4)])) == [4]  # still serving

    run(test)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the crash
def test_a_dead_worker_thread_is_replaced_and_the_next_request_served(script: Script) -> None:
    async def test() -> None:
        script.killers = {7}
        async with running(script) as engine:
            with pytest.raises(ServiceError) as failed:
                await engine.submit([item(7)])
            assert failed.value.status_code == 500
            assert script.built == 2  # the factory built a replacement
            assert engine.state == "ready"
            assert classes(await engine.submit([item(8)])) == [8]
            assert engine.metrics is not None and engine.metrics.worker_restarts._value.get() == 1

    run(test)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the crash
def test_neighbours_of_an_image_that_kills_the_worker_are_computed_again(script: Script) -> None:
    async def test() -> None:
        script.killers = {7}
        async with running(script) as engine:
            blocker = await blocked(engine, script)
            first, killer, last = await queued(
                engine, script, engine.submit([item(6)]), engine.submit([item(7)]), engine.submit([item(8)])
            )
            script.gate.set()
            await blocker
            assert classes(await first) == [6]
            assert classes(await last) == [8]
            with pytest.raises(ServiceError):
                await killer
            assert script.built == 3  # once for the batch, once for the image alone

    run(test)


def test_out_of_memory_splits_the_batch_and_retries(script: Script) -> None:
    async def test() -> None:
        script.oom_above = 1
        async with running(script, max_batch_size=4) as engine:
            blocker = await blocked(engine, script)
            requests = await queued(engine, script, *(engine.submit([item(tag)]) for tag in (1, 2, 3, 4)))
            script.gate.set()
            await blocker
            assert [classes(await r) for r in requests] == [[1], [2], [3], [4]]
            assert script.batches[1:] == [[1, 2, 3, 4], [1, 2], [1], [2], [3, 4], [3], [4]]

    run(test)


def test_draining_refuses_new_work_and_finishes_accepted_work(script: Script) -> None:
    async def test() -> None:
        async with running(script) as engine:
            blocker = await blocked(engine, script)
            (waiting,) = await queued(engine, script, engine.submit([item(1), item(2)]))
            draining = asyncio.create_task(engine.drain(timeout_s=60))
            await script.until(lambda: engine.state == "draining", "the engine drains")
            with pytest.raises(ServiceUnavailable) as refused:
                await engine.submit([item(3)])
            assert refused.value.status_code == 503
            assert not draining.done()
            script.gate.set()
            assert await draining is True
            assert classes(await blocker) == [200]
            assert classes(await waiting) == [1, 2]
            assert 3 not in script.computed_tags()

    run(test)


def test_stopping_after_a_drain_timeout_still_answers_every_request(script: Script) -> None:
    async def test() -> None:
        async with running(script) as engine:
            blocker = await blocked(engine, script)
            (waiting,) = await queued(engine, script, engine.submit([item(1)]))
            await engine.stop(drain_timeout_s=0)
            for request in (blocker, waiting):
                with pytest.raises(ServiceUnavailable):
                    await request
            assert engine.state == "stopped"

    run(test)


def test_a_cancelled_request_has_its_unstarted_work_dropped(script: Script) -> None:
    # What the disconnect middleware does when the client goes away: cancel the handler.
    async def test() -> None:
        async with running(script) as engine:
            blocker = await blocked(engine, script)
            (request,) = await queued(engine, script, engine.submit([item(7)]))
            request.cancel()
            with pytest.raises(asyncio.CancelledError):
                await request
            script.gate.set()
            await blocker
            assert classes(await engine.submit([item(8)])) == [8]
            assert 7 not in script.computed_tags()

    run(test)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the crash
def test_a_worker_that_cannot_be_replaced_fails_readiness_and_answers_503(script: Script) -> None:
    async def test() -> None:
        script.killers, script.builds_allowed = {7}, 1
        async with running(script) as engine:
            with pytest.raises(ServiceUnavailable):
                await engine.submit([item(7)])
            assert engine.state == "failed"
            assert engine.failure is not None and "could not be replaced" in engine.failure
            with pytest.raises(ServiceUnavailable):
                await engine.submit([item(8)])

    run(test)


def test_warm_up_covers_every_small_batch_size_then_powers_of_two() -> None:
    assert warm_batch_sizes(1) == [1]
    assert warm_batch_sizes(8) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert warm_batch_sizes(100) == [*range(1, 17), 32, 64, 100]
