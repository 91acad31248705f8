"""The disconnect middleware cancels a handler whose client has gone, and only then."""

from __future__ import annotations

import asyncio
from typing import Any

from service.api.disconnect import DisconnectMiddleware
from tests.engine.conftest import run


def _client(*messages: dict[str, Any]) -> tuple[asyncio.Queue[dict[str, Any]], Any]:
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for message in messages:
        inbox.put_nowait(message)

    async def receive() -> dict[str, Any]:
        return await inbox.get()

    return inbox, receive


BODY = {"type": "http.request", "body": b"image", "more_body": False}


def test_a_client_that_disconnects_cancels_its_handler() -> None:
    async def test() -> None:
        waiting, cancelled = asyncio.Event(), asyncio.Event()

        async def app(scope: Any, receive: Any, send: Any) -> None:
            assert (await receive())["body"] == b"image"
            waiting.set()
            try:
                await asyncio.Event().wait()  # e.g. awaiting the engine
            except asyncio.CancelledError:
                cancelled.set()
                raise

        async def send(message: Any) -> None:
            raise AssertionError("nothing is sent to a client that has gone")

        inbox, receive = _client(BODY)
        scope: dict[str, Any] = {"type": "http", "state": {}}
        call = asyncio.create_task(DisconnectMiddleware(app)(scope, receive, send))
        await waiting.wait()
        inbox.put_nowait({"type": "http.disconnect"})
        await call
        assert cancelled.is_set()
        assert scope["state"]["disconnected"] is True

    run(test)


def test_a_client_that_stays_gets_its_answer() -> None:
    async def test() -> None:
        sent: list[dict[str, Any]] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await receive()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        async def send(message: Any) -> None:
            sent.append(message)

        _, receive = _client(BODY)  # the server never reports a disconnect
        scope: dict[str, Any] = {"type": "http", "state": {}}
        await DisconnectMiddleware(app)(scope, receive, send)
        assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
        assert "disconnected" not in scope["state"]

    run(test)
