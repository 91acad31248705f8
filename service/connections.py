"""Connections with timeouts and a bound: the HTTP protocol ``python -m service`` runs.

uvicorn closes an idle keep-alive connection after a while, but a connection that never
sends a byte, sends its headers one byte a second, or trickles its body stays open for good,
and nothing bounds how many are open: 20,000 idle sockets use up the descriptors. This
subclass of uvicorn's httptools protocol adds, per connection, one timeout ``T``
(``CAMSERVE_CLIENT_TIMEOUT_S``):

- **request head**: from the connection's start, or from the end of its previous response,
  the request line and headers must be in within ``T`` (an idle connection and a slow one
  alike), and within :data:`MAX_HEAD_BYTES` (else a JSON 431; a head the parser cannot read
  gets a JSON 400 rather than uvicorn's text);
- **body**: each ``T`` window after the headers must bring :data:`MIN_BODY_RATE` x ``T``
  bytes, or the rest of the body; one byte a second is closed at the end of the first window.
  Time the service itself has stopped reading (the app has not consumed what is buffered) is
  not counted against the client;
- **response**: a client that reads nothing for ``T`` while its answer waits to be written is
  closed.

Each close is one log line (``service.connections``: reason, client, timeout). Open
connections are bounded (``CAMSERVE_MAX_CONNECTIONS``): at the bound a new connection
closes the connection idle the longest (waiting for a request, or its headers); when none is
idle it is answered 503 and closed. So ``/healthz`` keeps answering under a flood of idle
sockets. These events are summed into one log line a second at most, since a flood can bring
thousands a second.

**Lingering close**: when a response (the 413 for a body over the limit, say) is complete
while the client is still sending its body, the response says ``Connection: close``, the
write side is shut (FIN after the response), and the rest of the body is read and
discarded, at most :func:`linger_bytes` of it, until it ends, or ``T``
passes without data, or ``3 T`` in all; only then is the connection closed. Closing at once
would reset it, and a client still uploading would see a broken pipe instead of the answer
(nginx's ``lingering_close`` does the same).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("service.connections")

MAX_HEAD_BYTES = 64 * 1024  # request line and headers; httptools itself sets no bound
MIN_BODY_RATE = 1024  # bytes a second a body must average over each window (a 8 kbit/s link)
LINGER_UPLOADS = 4  # a lingering close discards at most this many upload limits ...
LINGER_MIN_BYTES = 256 << 20  # ... and never less than this: discarding costs no memory
_REASONS = {400: b"Bad Request", 431: b"Request Header Fields Too Large",
            503: b"Service Unavailable"}
_RESERVED_FDS = 64  # descriptors kept for files, pipes and sockets the service opens itself


def descriptor_bound(wanted: int) -> int:
    """The connection bound the process can honour: ``wanted``, or half the descriptor limit
    (raised to its hard limit first, as Go's runtime does) when that is lower, so accepting
    never fails with EMFILE, whose only remedy in asyncio is to stop accepting for a second."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return max(1, min(wanted, (soft - _RESERVED_FDS) // 2))


def linger_bytes(max_upload_bytes: int) -> int:
    """How much of a body a lingering close reads and discards at most."""
    return max(LINGER_UPLOADS * max_upload_bytes, LINGER_MIN_BYTES)


@dataclass
class ConnectionGuard:
    """The limits and the bookkeeping all connections of one server share."""

    timeout_s: float
    max_connections: int
    max_linger_bytes: int
    idle: dict[GuardedHttpToolsProtocol, None] = field(default_factory=dict)  # oldest first
    _limit_events: collections.Counter[str] = field(default_factory=collections.Counter)
    _report: asyncio.TimerHandle | None = None
    _open = 0  # open connections at the latest limit event

    @property
    def min_window_bytes(self) -> int:
        return max(1, int(MIN_BODY_RATE * self.timeout_s))

    def note_limit(self, event: str, open_connections: int) -> None:
        """Count an eviction or a refusal; one summary line a second at most."""
        self._limit_events[event] += 1
        self._open = open_connections
        if self._report is None:
            self._report = asyncio.get_running_loop().call_later(1.0, self._log_limit)

    def _log_limit(self) -> None:
        events, self._limit_events, self._report = dict(self._limit_events), collections.Counter(), None
        log.warning("connection limit reached", extra={
            "max_connections": self.max_connections, "open": self._open,
            "idle_closed": events.get("evicted", 0), "refused": events.get("refused", 0)})

    def protocol(self) -> type[GuardedHttpToolsProtocol]:
        """The protocol class for ``uvicorn.Config(http=...)``, bound to this guard."""
        return type("CamserveHttpProtocol", (GuardedHttpToolsProtocol,), {"guard": self})


class _CycleTransport:
    """The transport a request cycle writes through: its ``close`` waits for the request body
    to end (lingering close) instead of resetting a connection that is still uploading."""

    def __init__(self, protocol: GuardedHttpToolsProtocol) -> None:
        self._protocol = protocol

    def write(self, data: bytes) -> None:
        self._protocol.transport.write(data)

    def is_closing(self) -> bool:
        return self._protocol.transport.is_closing()

    def close(self) -> None:
        self._protocol.close_after_body()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._protocol.transport.get_extra_info(name, default)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    guard: ConnectionGuard  # set by ConnectionGuard.protocol()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._received = 0  # bytes, all along
        self._armed_at_bytes = 0
        self._served = 0  # responses completed
        self._body_done = True
        self._window_bytes = 0
        self._lingering = False
        self._linger_bytes = 0
        self._linger_until = 0.0
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None

    # connection life -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        guard = self.guard
        if len(self.connections) > guard.max_connections:
            victim = next(iter(guard.idle), None)
            if victim is None:
                guard.note_limit("refused", len(self.connections))
                self._refuse()
                return
            guard.note_limit("evicted", len(self.connections))
            victim._drop()
        self._become_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.idle.pop(self, None)
        for timer in (self._head_timer, self._body_timer, self._write_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    def _refuse(self) -> None:
        self._answer_and_close(503, "unavailable", f"too many open connections "
                               f"({self.guard.max_connections}); retry shortly", b"retry-after: 1\r\n")

    def _answer_and_close(self, status: int, code: str, message: str, extra: bytes = b"") -> None:
        """A JSON error written straight to the socket (no request cycle), then close."""
        self.guard.idle.pop(self, None)
        if self.transport.is_closing():
            return
        body = orjson.dumps({"error": {"code": code, "message": message, "request_id": ""}})
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\nconnection: close\r\n"
            % (status, _REASONS[status]) + extra
            + b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        self.transport.close()

    def _drop(self) -> None:
        """Close this idle connection to make room (the bound's summary line logs it)."""
        self.guard.idle.pop(self, None)
        self.transport.close()

    def _close_slow(self, reason: str, **details: Any) -> None:
        self.guard.idle.pop(self, None)
        if self.transport.is_closing():
            return
        client = self._client_name()
        level = logging.INFO if reason.startswith("idle") else logging.WARNING
        log.log(level, "closed a connection: %s", reason, extra={
            "reason": reason, "client": client, "timeout_s": self.guard.timeout_s, **details})
        self.transport.close()

    def _client_name(self) -> str | None:
        return f"{self.client[0]}:{self.client[1]}" if self.client else None

    def _timer(self, delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        return self.loop.call_later(delay, callback)

    # request head: idle and slow headers -----------------------------------------------

    def _become_idle(self) -> None:
        self.guard.idle.pop(self, None)
        self.guard.idle[self] = None  # the newest idle connection goes last
        self._armed_at_bytes = self._received
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self._timer(self.guard.timeout_s, self._head_timeout)

    def _head_timeout(self) -> None:
        self._head_timer = None
        got = self._received - self._armed_at_bytes
        if got:
            self._close_slow("slow request headers", bytes_received=got)
        else:
            self._close_slow("idle keep-alive connection" if self._served else "idle connection")

    def data_received(self, data: bytes) -> None:
        self._received += len(data)
        if self._lingering:
            self._discard(data)
            return
        self._window_bytes += len(data)
        super().data_received(data)
        if self._head_timer is not None and self._received - self._armed_at_bytes > MAX_HEAD_BYTES:
            self._head_timer.cancel()
            self._head_timer = None
            log.warning("refused a request head over the limit", extra={
                "client": self._client_name(), "max_bytes": MAX_HEAD_BYTES})
            self._answer_and_close(431, "bad_request", f"the request line and headers are over "
                                   f"{MAX_HEAD_BYTES} bytes")

    def send_400_response(self, msg: str) -> None:
        # A request the parser cannot read still gets the contract's JSON error.
        self._answer_and_close(400, "bad_request", f"malformed HTTP request: {msg}")

    def on_message_begin(self) -> None:
        self._body_done = False
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        if self._lingering or self.transport.is_closing():
            return  # a request after a lingering close's body: never served
        self.guard.idle.pop(self, None)
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        previous = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is None or cycle is previous:  # an upgrade: another protocol takes over
            return
        cycle.transport = _CycleTransport(self)  # type: ignore[assignment]
        original = cycle.send

        async def send(message: Any) -> None:
            if message["type"] == "http.response.start" and not self._body_done:
                cycle.keep_alive = False  # answered before its body ended: close after it
            await original(message)

        cycle.send = send  # type: ignore[method-assign]
        if not self._body_done:
            self._start_body_window()

    # body: a minimum rate --------------------------------------------------------------

    def _start_body_window(self) -> None:
        self._window_bytes = 0
        self._body_timer = self._timer(self.guard.timeout_s, self._body_window_end)

    def _body_window_end(self) -> None:
        self._body_timer = None
        if self._body_done or self._lingering or self.transport.is_closing():
            return
        waiting = self.cycle is not None and self.cycle.waiting_for_100_continue
        if self.flow.read_paused or waiting:  # the service is not reading yet, not the client's fault
            self._start_body_window()
        elif self._window_bytes < self.guard.min_window_bytes:
            self._close_slow("slow request body", bytes_in_window=self._window_bytes,
                             min_bytes=self.guard.min_window_bytes)
        else:
            self._start_body_window()

    def on_message_complete(self) -> None:
        self._body_done = True
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        if self._lingering:
            self.transport.close()
            return
        super().on_message_complete()

    # response: a client that stops reading ---------------------------------------------

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self._timer(
                self.guard.timeout_s, lambda: self._close_slow("client not reading its response"))

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def on_response_complete(self) -> None:
        if self._lingering:
            self.server_state.total_requests += 1
            self._served += 1
            self.flow.resume_reading()
            return
        pipelined = bool(self.pipeline)
        super().on_response_complete()
        self._served += 1
        if not pipelined and not self.transport.is_closing():
            self._unset_keepalive_if_required()  # replaced by the head timer, which logs
            self._become_idle()

    # lingering close -------------------------------------------------------------------

    def close_after_body(self) -> None:
        """Close now if the request body is in; else shut the write side and discard the rest
        of the body (bounded) first, so the client reads its answer."""
        transport = self.transport
        if self._body_done or transport.is_closing():
            transport.close()
            return
        if self._lingering:
            return
        self._lingering = True
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        self._linger_until = time.monotonic() + 3 * self.guard.timeout_s
        self.guard.idle[self] = None  # answered: it may make room for another
        if transport.can_write_eof():
            transport.write_eof()  # FIN once the response has gone out
        self._linger_timer = self._timer(self.guard.timeout_s, self._linger_timeout)

    def _discard(self, data: bytes) -> None:
        self._linger_bytes += len(data)
        if self._linger_bytes > self.guard.max_linger_bytes or time.monotonic() > self._linger_until:
            self.transport.close()
            return
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        self._linger_timer = self._timer(self.guard.timeout_s, self._linger_timeout)
        try:
            self.parser.feed_data(data)  # finds the body's end; the cycle drops the bytes
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self.transport.close()

    def _linger_timeout(self) -> None:
        self._linger_timer = None
        self.transport.close()
