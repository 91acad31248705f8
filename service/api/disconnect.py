"""Cancel a request's handler when its client disconnects, so its unstarted work is dropped.

Starlette keeps running a handler whose client has gone; for a service with a queue that means
computing answers nobody reads. Once the request body has been read, this middleware listens
for ``http.disconnect`` and cancels the handler: :meth:`Engine.submit` then cancels the
request's queued images, which the batcher skips. Pure ASGI, so bodies stream through.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)


class DisconnectMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_done = asyncio.Event()
        gone = asyncio.Event()
        response_done = False

        async def app_receive() -> Message:
            if body_done.is_set():  # only the listener reads from the server now
                await gone.wait()
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.disconnect":
                gone.set()
            elif not message.get("more_body", False):
                body_done.set()
            return message

        async def app_send(message: Message) -> None:
            nonlocal response_done
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                response_done = True
            await send(message)

        async def run_app() -> None:
            await self.app(scope, app_receive, app_send)

        handler = asyncio.create_task(run_app())

        async def listen() -> None:
            await body_done.wait()
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()
            if not response_done and not handler.done():
                scope.setdefault("state", {})["disconnected"] = True
                log.info("client disconnected; cancelling its request",
                         extra={"request_id": scope["state"].get("request_id", "")})
                handler.cancel()

        listener = asyncio.create_task(listen())
        try:
            await handler
        except asyncio.CancelledError:
            if not scope.get("state", {}).get("disconnected"):
                raise  # cancelled from outside (shutdown), not by the client
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
            if not handler.done():
                handler.cancel()
