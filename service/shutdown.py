"""What the drain needs to see and answer HTTP requests: :class:`InFlight`.

An ASGI wrapper around the app, outermost, that knows which requests are being handled (the
drain logs how many it cut short) and answers the contract's JSON 503 to any request that
the server's shutdown cancels before its response started, instead of uvicorn's text/plain
500.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

PROBES = frozenset({"/healthz", "/readyz", "/metrics"})


class InFlight:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.paths: dict[int, str] = {}  # id(scope) -> path of each request being handled
        self._states: dict[int, dict[str, object]] = {}  # id(scope) -> its request state
        self._idle: asyncio.Event | None = None
        self._cut: set[int] = set()  # requests in flight at the drain deadline, probes not counted
        self._answered_503 = 0

    def requests(self) -> int:
        """Requests being handled, probes not counted."""
        return sum(path not in PROBES for path in self.paths.values())

    def deadline_passed(self) -> None:
        """Note the requests being handled now: those answered 503 from here on were cut short."""
        self._cut = {key for key, path in self.paths.items() if path not in PROBES}
        self._answered_503 = 0

    def cut_short(self) -> int:
        """Requests in flight at the deadline answered 503 since, or not answered yet (those
        get the 503 when the shutdown cancels them)."""
        return self._answered_503 + len(self._cut & set(self.paths))

    def admitted(self) -> int:
        """Requests being handled that the engine admitted (``admitted`` in their state): they
        may still be decoding and have images to submit, which a drain must wait for."""
        return sum(bool(self._states.get(key, {}).get("admitted")) for key in self.paths)

    async def wait_admitted_done(self, timeout_s: float) -> bool:
        """Wait until no admitted request is being handled (True) or ``timeout_s`` passed."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while self.admitted():
                    self._idle = self._idle or asyncio.Event()
                    self._idle.clear()
                    await self._idle.wait()
        return not self.admitted()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is being handled (True) or ``timeout_s`` passed (False)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while self.paths:
                    self._idle = self._idle or asyncio.Event()
                    self._idle.clear()
                    await self._idle.wait()
        return not self.paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key = id(scope)
        self.paths[key] = scope.get("path", "")
        self._states[key] = scope.setdefault("state", {})
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if message["status"] == 503 and key in self._cut:
                    self._cut.discard(key)
                    self._answered_503 += 1
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except asyncio.CancelledError:
            if started:
                raise
            # Cancelled by the server's shutdown: answer, then end the task quietly.
            log.warning("request cut short by the shutdown", extra={
                "request_id": scope.get("state", {}).get("request_id", "")})
            if key in self._cut:
                self._cut.discard(key)
                self._answered_503 += 1
            await _send_unavailable(send, scope)
        finally:
            self.paths.pop(key, None)
            # Answered: what it started in the background (a job, which shares this state) is
            # not accepted work of a request in flight, and a drain refuses it as before.
            self._states.pop(key, {})["admitted"] = False
            self._cut.discard(key)  # answered otherwise (200, 504...): not cut short
            if self._idle is not None:  # a waiter re-checks what it waits for
                self._idle.set()


async def _send_unavailable(send: Send, scope: Scope) -> None:
    request_id = str(scope.get("state", {}).get("request_id", ""))
    body = orjson.dumps({"error": {
        "code": "unavailable", "request_id": request_id,
        "message": "the service stopped before this request was answered; retry on another instance"}})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"retry-after", b"1"), (b"connection", b"close")]
    if request_id:
        headers.append((b"x-request-id", request_id.encode("latin-1")))
    with contextlib.suppress(Exception):  # the client may be gone
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})
