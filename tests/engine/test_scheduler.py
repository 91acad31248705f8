"""The pass scheduler with the real model: heavy explanations never stall light ones.

Each test runs a real engine (the embedded mobilenet_v2 on the CPU) and reads the order of
events, never the clock: which request was answered while which was still running, how far a
heavy explanation had come when it was stopped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.cams.passes import PassRun
from service.config import Settings
from service.engine.engine import ClientDisconnected, Engine
from service.engine.jobs import ExplainSpec, ItemResult, WorkItem
from service.errors import DeadlineExceeded, InvalidOption, ServiceUnavailable
from service.metrics import Metrics
from service.models.spec import registered_specs
from tests.conftest import DATA

LIMIT_S = 240.0
# Score-CAM on its 256 most active channels: heavy (256 masked passes), a few seconds here.
SCORECAM = (("scorecam", (("top_k_channels", 256),)),)
CAT = np.asarray(Image.open(DATA / "chelsea.png").convert("RGB").resize((224, 224)))
COFFEE = np.asarray(Image.open(DATA / "coffee.png").convert("RGB").resize((224, 224)))


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(LIMIT_S):
            await test()

    asyncio.run(bounded())


@asynccontextmanager
async def real_engine(**overrides: Any) -> AsyncIterator[Engine]:
    settings = Settings(warmup=False, **overrides)
    engine = Engine(settings, list(registered_specs(None).values()), metrics=Metrics())
    await engine.start()
    assert engine.state == "ready", engine.failure
    try:
        yield engine
    finally:
        await engine.stop(drain_timeout_s=60)


def item(
    pixels: np.ndarray = CAT,
    methods: tuple[str, ...] = ("gradcam",),
    params: tuple[tuple[str, tuple[tuple[str, object], ...]], ...] = (),
    deadline_s: float = 120.0,
    on_progress: Callable[[int, int], None] | None = None,
) -> WorkItem:
    spec = ExplainSpec(methods=methods, layers=("features.18",), classes=None, mask_size=(224, 224),
                       display_size=None, method_params=params)
    return WorkItem(model="mobilenet_v2", pixels=pixels, topk=1, explain=spec,
                    deadline=time.monotonic() + deadline_s,
                    future=asyncio.get_running_loop().create_future(), on_progress=on_progress)


class Progress:
    """Progress reports of one heavy item, and an event for 'it has started its passes'."""

    def __init__(self) -> None:
        self.reports: list[tuple[int, int]] = []
        self.started = asyncio.Event()

    def __call__(self, done: int, total: int) -> None:
        self.reports.append((done, total))
        self.started.set()


async def until_idle(engine: Engine) -> None:
    """Wait for the engine's in-flight work to reach zero (its own change signal, bounded)."""
    async with asyncio.timeout(60):
        while engine.in_flight:
            engine._changed.clear()
            await engine._changed.wait()


def hooks_left(engine: Engine) -> int:
    def count(module: Any) -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())

    worker: Any = engine.workers[0]
    return sum(count(m.module) for m in worker.models.values()) + sum(
        count(m.lean.module) for m in worker.models.values() if m.lean is not None
    )


def test_light_requests_are_answered_while_a_heavy_one_runs() -> None:
    async def scenario() -> None:
        async with real_engine() as engine:
            progress = Progress()
            heavy = item(methods=("scorecam",), params=SCORECAM, on_progress=progress)
            answer = asyncio.ensure_future(engine.submit([heavy]))
            await progress.started.wait()
            light_while_heavy_ran = []
            for pixels in (CAT, COFFEE, CAT, COFFEE, CAT):
                (result,) = await engine.submit([item(pixels)])
                assert result.explanations[0].method == "gradcam"
                light_while_heavy_ran.append(not answer.done())
            assert all(light_while_heavy_ran), light_while_heavy_ran
            (heavy_result,) = await answer
            done = [d for d, _ in progress.reports]
            assert done == sorted(done) and done[-1] >= 256  # progress never went back
            assert heavy.heavy and heavy_result.explanations[0].method == "scorecam"

            # The map is the one the same method gives outside the scheduler, in one batch.
            worker: Any = engine.workers[0]
            reference = await asyncio.to_thread(
                worker.compute, [item(methods=("scorecam",), params=SCORECAM)]
            )
            np.testing.assert_allclose(
                heavy_result.explanations[0].mask, reference[0].explanations[0].mask, atol=1e-4
            )
            assert hooks_left(engine) == 0

    run(scenario)


def test_two_heavy_requests_progress_together() -> None:
    async def scenario() -> None:
        async with real_engine() as engine:
            events: list[str] = []
            first = Progress()
            second = Progress()

            def log(name: str, progress: Progress) -> Callable[[int, int], None]:
                def report(done: int, total: int) -> None:
                    events.append(name)
                    progress(done, total)
                return report

            a = asyncio.ensure_future(engine.submit(
                [item(methods=("scorecam",), params=SCORECAM, on_progress=log("a", first))]))
            await first.started.wait()
            b = asyncio.ensure_future(engine.submit(
                [item(COFFEE, methods=("scorecam",), params=SCORECAM, on_progress=log("b", second))]))
            await a
            events.append("a finished")
            await b
            before_a_finished = events[:events.index("a finished")]
            assert "b" in before_a_finished, "the second heavy request waited for the first"
            # Turns alternate: b's passes interleave with a's, not all after them.
            last_a = len(before_a_finished) - 1 - before_a_finished[::-1].index("a")
            assert before_a_finished.index("b") < last_a

    run(scenario)


def test_a_disconnect_stops_the_heavy_request_at_its_next_pass_boundary() -> None:
    async def scenario() -> None:
        async with real_engine() as engine:
            progress = Progress()
            heavy = item(methods=("scorecam",), params=SCORECAM, on_progress=progress)
            gone = asyncio.get_running_loop().create_future()
            answer = asyncio.ensure_future(engine.submit([heavy], disconnected=gone))
            await progress.started.wait()
            gone.set_result(None)
            with pytest.raises(ClientDisconnected):
                await answer
            await until_idle(engine)
            stopped = heavy.run
            assert isinstance(stopped, PassRun) and stopped.cancelled.is_set()
            assert stopped.done < heavy.passes - 2, "the remaining chunks still ran"
            assert hooks_left(engine) == 0
            (light,) = await engine.submit([item()])  # the worker is free again
            assert light.explanations

    run(scenario)


def test_a_passed_deadline_stops_the_heavy_request() -> None:
    async def scenario() -> None:
        async with real_engine() as engine:
            engine._seconds_per_pass = 1e-5  # an optimistic estimate lets the request in
            progress = Progress()
            heavy = item(methods=("scorecam",), params=SCORECAM, deadline_s=1.0, on_progress=progress)
            with pytest.raises(DeadlineExceeded):
                await engine.submit([heavy])
            await until_idle(engine)
            assert isinstance(heavy.run, PassRun) and heavy.run.done < heavy.passes - 2
            (light,) = await engine.submit([item()])
            assert light.explanations

    run(scenario)


def test_drain_finishes_heavy_work_and_stop_answers_what_is_left() -> None:
    async def scenario() -> None:
        async with real_engine() as engine:
            progress = Progress()
            answer = asyncio.ensure_future(engine.submit(
                [item(methods=("scorecam",), params=SCORECAM, on_progress=progress)]))
            await progress.started.wait()
            assert await engine.drain(120.0)
            results: list[ItemResult] = await answer
            assert results[0].explanations[0].method == "scorecam"

        async with real_engine() as engine:
            progress = Progress()
            answer = asyncio.ensure_future(engine.submit(
                [item(methods=("scorecam",), params=SCORECAM, on_progress=progress)]))
            await progress.started.wait()
            await engine.stop(drain_timeout_s=0.05)
            with pytest.raises(ServiceUnavailable):
                await answer

    run(scenario)


def test_requests_over_the_pass_budget_or_the_deadline_are_refused_before_queueing() -> None:
    async def scenario() -> None:
        async with real_engine(max_request_passes=100) as engine:
            with pytest.raises(InvalidOption, match="forward passes; at most 100"):
                await engine.submit([item(methods=("scorecam",), params=SCORECAM)])
            # Exact SS-CAM (35 noisy copies of 1,280 channels) cannot finish in 30 s here.
            with pytest.raises(InvalidOption, match="forward passes"):
                await engine.submit([item(methods=("sscam",), deadline_s=30.0)])
            assert engine.queue_depth == 0 and engine.in_flight == 0
        async with real_engine() as engine:
            with pytest.raises(InvalidOption, match="before its deadline"):
                await engine.submit([item(methods=("scorecam",), deadline_s=0.5)])

    run(scenario)


def test_a_heavy_request_is_not_stuck_behind_long_jobs() -> None:
    async def scenario() -> None:
        async with real_engine(heavy_concurrency=2) as engine:
            jobs = []
            for pixels in (CAT, COFFEE, CAT):  # more long jobs than places in the heavy lane
                job = item(pixels, methods=("scorecam",), deadline_s=600.0)
                job.background = True
                jobs.append(asyncio.ensure_future(engine.submit([job])))
            started = Progress()
            foreground = item(methods=("scorecam",), params=SCORECAM, on_progress=started)
            answer = asyncio.ensure_future(engine.submit([foreground]))
            (result,) = await answer
            assert result.explanations[0].method == "scorecam"
            assert not any(job.done() for job in jobs), "a job finished before the request"
            for job in jobs:
                job.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)
            await until_idle(engine)

    run(scenario)


def test_the_deadline_estimate_counts_the_heavy_requests_already_running() -> None:
    async def scenario() -> None:
        async with real_engine() as engine:
            engine._seconds_per_pass = 0.01
            alone = item(methods=("scorecam",), params=SCORECAM, deadline_s=4.0)
            assert engine.price([alone]) == alone.passes  # 258 passes, about 2.6 s: it fits
            started = Progress()
            first = asyncio.ensure_future(engine.submit(
                [item(methods=("scorecam",), params=SCORECAM, on_progress=started)]))
            await started.started.wait()
            with pytest.raises(InvalidOption, match="sharing the device with 1 other"):
                engine.price([item(methods=("scorecam",), params=SCORECAM, deadline_s=4.0)])
            await first

    run(scenario)


def test_tail_passes_count_what_the_estimate_counts_them() -> None:
    """Ablation-CAM's passes through the network's tail count a quarter of a forward each, in
    the estimate and in the progress alike: the total a job shows at the start holds to the end
    (it was re-estimated upwards fourfold when each tail pass counted as a whole forward)."""
    async def scenario() -> None:
        async with real_engine() as engine:
            progress = Progress()
            heavy = item(methods=("ablationcam",), on_progress=progress)
            (result,) = await engine.submit([heavy])
            assert heavy.heavy and result.explanations[0].method == "ablationcam"
            first_total = progress.reports[0][1]
            assert first_total == heavy.passes
            running = progress.reports[1:-1]
            assert running, progress.reports  # it reported while its passes ran
            assert {total for _, total in running} == {first_total}
            done = [d for d, _ in progress.reports]
            assert done == sorted(done)
            # What ran is what was estimated, give or take the channels that were already zero.
            assert 0.5 * first_total <= done[-1] <= first_total

    run(scenario)
