"""The dynamic batcher, on fake workers: sizes, the delay window, grouping, reassembly."""

from __future__ import annotations

import asyncio
import time

import torch

from service.engine.engine import Engine
from service.metrics import Metrics
from tests.engine.conftest import blocked, queued, run, running
from tests.engine.fakes import Script, classes, item, settings, specs


def test_batches_never_exceed_the_maximum_size(script: Script) -> None:
    async def test() -> None:
        async with running(script, max_batch_size=4) as engine:
            blocker = await blocked(engine, script)
            requests = await queued(engine, script, *(engine.submit([item(tag)]) for tag in range(10)))
            script.gate.set()
            answers = await asyncio.gather(blocker, *requests)
            assert [classes(a) for a in answers[1:]] == [[tag] for tag in range(10)]
            assert [len(batch) for batch in script.batches] == [1, 4, 4, 2]
            assert script.computed_tags()[1:] == list(range(10))

    run(test)


def test_the_delay_is_counted_from_the_oldest_queued_image(script: Script) -> None:
    # With a one-hour window counted from when the batcher picks the image up, this image
    # would wait an hour; counted from its arrival an hour ago, it goes at once.
    async def test() -> None:
        async with running(script, max_batch_size=8, max_batch_delay_ms=3_600_000) as engine:
            old = item(1, enqueued=time.monotonic() - 3601)
            assert classes(await engine.submit([old])) == [1]
            assert script.batches == [[1]]

    run(test)


def test_a_batch_waits_within_its_window_for_more_images(script: Script) -> None:
    async def test() -> None:
        async with running(script, max_batch_size=3, max_batch_delay_ms=3_600_000) as engine:
            requests = [asyncio.ensure_future(engine.submit([item(tag)])) for tag in (1, 2, 3)]
            answers = await asyncio.gather(*requests)
            assert [classes(a) for a in answers] == [[1], [2], [3]]
            assert script.batches == [[1, 2, 3]]
            assert {result.batch_size for a in answers for result in a} == {3}

    run(test)


def test_only_compatible_images_share_a_batch_and_the_rest_keep_their_order(script: Script) -> None:
    async def test() -> None:
        async with running(script, max_batch_size=8) as engine:
            blocker = await blocked(engine, script)
            cam = ("gradcam",)
            requests = await queued(
                engine, script,
                engine.submit([item(1, methods=cam)]),
                engine.submit([item(2, model="other", methods=cam)]),
                engine.submit([item(3, methods=cam)]),
                engine.submit([item(4)]),  # classification only
                engine.submit([item(5, model="other", methods=cam)]),
                engine.submit([item(6, methods=("gradcam", "layercam"))]),
                engine.submit([item(7, methods=cam)]),
            )
            script.gate.set()
            answers = await asyncio.gather(blocker, *requests)
            assert [classes(a) for a in answers[1:]] == [[1], [2], [3], [4], [5], [6], [7]]
            assert script.batches[1:] == [[1, 3, 7], [2, 5], [4], [6]]

    run(test)


def test_a_request_is_spread_over_batches_and_reassembled_in_order(script: Script) -> None:
    async def test() -> None:
        async with running(script, max_batch_size=2) as engine:
            answer = await engine.submit([item(tag) for tag in (10, 11, 12, 13, 14)])
            assert classes(answer) == [10, 11, 12, 13, 14]
            assert script.batches == [[10, 11], [12, 13], [14]]

    run(test)


def test_a_batch_can_hold_images_of_several_requests(script: Script) -> None:
    async def test() -> None:
        async with running(script, max_batch_size=4) as engine:
            blocker = await blocked(engine, script)
            first, second = await queued(
                engine, script, engine.submit([item(1), item(2), item(3)]), engine.submit([item(4), item(5)])
            )
            script.gate.set()
            await blocker
            assert classes(await first) == [1, 2, 3]
            assert classes(await second) == [4, 5]
            assert script.batches[1:] == [[1, 2, 3, 4], [5]]

    run(test)


def test_warm_up_runs_at_the_batch_sizes_it_will_see_before_ready(script: Script) -> None:
    async def test() -> None:
        script.bind()
        script.warm_gate.clear()
        engine = Engine(settings(max_batch_size=8), specs(), script.factory, Metrics())
        starting = asyncio.create_task(engine.start())
        await script.until(lambda: script.built == 1, "the worker was built")
        assert engine.state == "starting"
        script.warm_gate.set()
        await starting
        assert engine.state == "ready"
        assert script.warmed == [[1, 2, 3, 4, 5, 6, 7, 8]]
        await engine.stop()

    run(test)


def test_one_worker_per_device_and_they_compute_at_the_same_time(script: Script) -> None:
    async def test() -> None:
        devices = [torch.device("cpu"), torch.device("cpu")]
        async with running(script, devices=devices, max_batch_size=4) as engine:
            assert script.built == 2 and len(engine.workers) == 2
            script.gate.clear()
            requests = [asyncio.ensure_future(engine.submit([item(1)]))]
            await script.until(lambda: len(script.batches) == 1, "one worker computes")
            requests.append(asyncio.ensure_future(engine.submit([item(2)])))
            # The first worker is held at the gate, so only the second can take image 2.
            await script.until(lambda: len(script.batches) == 2, "the other worker computes too")
            script.gate.set()
            assert [classes(a) for a in await asyncio.gather(*requests)] == [[1], [2]]

    run(test)
