"""A drain takes the images of requests it admitted before it began: a request still decoding
when SIGTERM comes submits afterwards and is computed (not answered 503), while a request that
arrives during the drain, and a job a finished request left behind, are refused as before."""

from __future__ import annotations

import asyncio

import pytest

from service.errors import ServiceUnavailable
from service.logs import request_state
from service.shutdown import InFlight
from tests.engine.conftest import run, running
from tests.engine.fakes import Script, classes, item


def test_a_request_admitted_before_the_drain_still_submits_during_it(script: Script) -> None:
    async def test() -> None:
        async with running(script) as engine:
            accepted: dict[str, object] = {"request_id": "decoding"}
            token = request_state.set(accepted)
            engine.admit(1)  # the route's check before its decode
            request_state.reset(token)
            assert accepted["admitted"] is True

            draining = asyncio.create_task(engine.drain(10))
            await asyncio.sleep(0)
            assert engine.state == "draining"

            late: dict[str, object] = {"request_id": "late"}
            token = request_state.set(late)
            with pytest.raises(ServiceUnavailable, match="draining"):
                engine.admit(1)
            request_state.reset(token)

            token = request_state.set(accepted)
            results = await engine.submit([item(7)])  # its decode is done: it submits
            request_state.reset(token)
            assert classes(results) == [7]
            assert await draining

    run(test)


def test_the_drain_waits_for_admitted_requests_and_clears_the_mark_when_they_are_answered() -> None:
    async def test() -> None:
        finish = asyncio.Event()

        async def app(scope: dict[str, object], receive: object, send: object) -> None:
            state = scope["state"]
            assert isinstance(state, dict)
            if scope["path"] == "/explain":
                state["admitted"] = True  # what Engine.admit leaves in the request's state
            await finish.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
            await send({"type": "http.response.body", "body": b"{}"})  # type: ignore[operator]

        async def send(message: object) -> None:
            return None

        in_flight = InFlight(app)  # type: ignore[arg-type]
        scopes = [{"type": "http", "path": path} for path in ("/explain", "/jobs/1/events")]
        handled = [asyncio.create_task(in_flight(scope, None, send)) for scope in scopes]  # type: ignore[arg-type]
        await asyncio.sleep(0)
        assert in_flight.admitted() == 1, "the event stream was never admitted: not waited for"
        assert not await in_flight.wait_admitted_done(0.05)
        finish.set()
        assert await in_flight.wait_admitted_done(5)
        await asyncio.gather(*handled)
        state = scopes[0]["state"]
        assert isinstance(state, dict) and state["admitted"] is False, "a job it left is refused by a drain"

    asyncio.run(test())


def test_a_job_submitting_after_its_request_was_answered_is_refused_by_a_drain(script: Script) -> None:
    """A job runs with the state of the request that created it; once that request is answered
    (InFlight marks it), the job's later submissions are not re-admitted as accepted work."""
    async def test() -> None:
        async with running(script) as engine:
            answered: dict[str, object] = {"request_id": "made-a-job", "admitted": False}
            token = request_state.set(answered)
            assert classes(await engine.submit([item(3)])) == [3]  # while ready: computed
            draining = asyncio.create_task(engine.drain(10))
            await asyncio.sleep(0)
            with pytest.raises(ServiceUnavailable, match="draining"):
                await engine.submit([item(4)])
            request_state.reset(token)
            assert answered["admitted"] is False
            assert await draining

    run(test)
