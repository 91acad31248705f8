"""Pure ASGI middleware: request ids, the upload limit, and a last-resort 500.

Written as plain ASGI (not ``BaseHTTPMiddleware``) so bodies stream through untouched.
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import error_body

log = logging.getLogger(__name__)

_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once a streamed body passes the limit. FastAPI's body parsing
    re-raises an HTTPException unchanged, so its handler answers 413; where nothing handles
    it, this middleware does."""

    def __init__(self, detail: str) -> None:
        super().__init__(413, detail)


class RequestContextMiddleware:
    """Gives every request an id (the client's ``X-Request-ID`` when it is sane), echoes it on
    every response, refuses bodies over the limit before reading them, and turns any fault
    that escaped the handlers into the contract's JSON 500."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        client_id = headers.get("x-request-id", "")
        request_id = client_id if _CLIENT_ID.match(client_id) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        id_header = (b"x-request-id", request_id.encode("latin-1"))
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), id_header]
            await send(message)

        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await _send_json(send_with_id, 413, error_body(
                "payload_too_large", self._too_large(int(declared)), request_id))
            return

        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self._too_large(received))
            return message

        try:
            await self.app(scope, counting_receive, send_with_id)
        except BodyTooLarge as exc:
            if not started:
                await _send_json(send_with_id, 413, error_body("payload_too_large", exc.detail, request_id))
        except Exception:
            log.exception("unhandled fault", extra={"request_id": request_id})
            if not started:
                await _send_json(send_with_id, 500, error_body(
                    "internal", "a fault in the service; the request failed, please retry",
                    request_id))

    def _too_large(self, size: int) -> str:
        limit_mb = self.max_body_bytes / (1024 * 1024)
        return (f"the request body ({size} bytes or more) is over the {limit_mb:g} MB limit "
                f"({self.max_body_bytes} bytes)")


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    payload = orjson.dumps(body)
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode())],
    })
    await send({"type": "http.response.body", "body": payload})
