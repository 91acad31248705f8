"""service.shutdown.InFlight: what the drain counts, and the JSON 503 for a request the
server's shutdown cancels (uvicorn would answer text/plain 500)."""

from __future__ import annotations

import asyncio
import json

from starlette.types import Message, Receive, Scope, Send

from service.shutdown import InFlight


def scope(path: str) -> Scope:
    return {"type": "http", "path": path, "method": "POST", "state": {"request_id": f"id{path}"}}


async def receive() -> Message:
    return {"type": "http.disconnect"}


def test_a_request_cancelled_by_the_shutdown_gets_the_json_503() -> None:
    async def main() -> None:
        started = asyncio.Event()
        answers: dict[str, list[Message]] = {"/explain": [], "/quick": [], "/healthz": []}

        release = asyncio.Event()

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["path"] == "/explain":
                started.set()
                await asyncio.Event().wait()  # work that never ends
            await release.wait()  # the others answer after the deadline
            status = 503 if scope["path"] == "/quick" else 200
            await send({"type": "http.response.start", "status": status, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

        in_flight = InFlight(app)

        def call(path: str) -> asyncio.Task[None]:
            async def send(message: Message) -> None:
                answers[path].append(message)
            return asyncio.create_task(in_flight(scope(path), receive, send))

        slow, quick, probe = call("/explain"), call("/quick"), call("/healthz")
        await started.wait()
        assert in_flight.requests() == 2  # the probe is not counted
        in_flight.deadline_passed()
        release.set()
        await quick
        await probe
        slow.cancel()
        await slow  # InFlight ends the cancelled task quietly, having answered
        assert await in_flight.wait_idle(1.0)
        assert in_flight.cut_short() == 2
        start, body = answers["/explain"]
        assert start["status"] == 503
        assert (b"content-type", b"application/json") in start["headers"]
        error = json.loads(body["body"])["error"]
        assert error["code"] == "unavailable" and error["request_id"] == "id/explain"

    asyncio.run(main())

