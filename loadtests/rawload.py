"""A lean load client: several processes, each an asyncio loop of raw HTTP/1.1 keep-alive connections.

One Python process with ``httpx.AsyncClient`` spends about 2.6-3 ms of CPU per /explain request
(building the multipart body, header objects, the connection pool), so it tops out at a few
hundred requests a second: against a service meant to answer thousands it measures the client.
Here the request is built once, as bytes (by httpx, so it is the same form ``bench_serving.load``
sends), and each connection only writes those bytes and reads the answer: the status line, the
headers, and the body by its ``Content-Length`` (or its chunks, or to the end of the connection
where the server says neither). ``concurrency`` connections are split over several client
processes so one GIL is not the limit either.

What counts:

- a request is recorded only once its whole answer has been read; a 200 adds its latency (and
  its ``Server-Timing`` stages when asked), any other status is counted as an error under it;
- a connection that breaks before the answer is complete (refused, reset, closed mid-body, a
  malformed answer, no answer within the timeout) is an error with status 0, and the next
  request opens a new connection;
- ``Connection: close`` from the server (or an HTTP/1.0 answer without keep-alive) closes the
  connection after the answer; a kept connection the server has already closed is reopened
  before sending, which is not an error: nothing was lost.

The client processes are ``python -m loadtests.rawload --serve-share``, given their share by a
pickle on stdin and answering by pickles on stdout. They are plain subprocesses rather than
``multiprocessing``'s spawn children because those import the caller's ``__main__`` again (for
``service.gpucheck``, torch) in every client. All of them start sending at one agreed instant
(CLOCK_MONOTONIC is one clock for every process on Linux) and stop starting requests at another;
requests in flight then are finished and recorded, as ``bench_serving.load`` does.
"""

from __future__ import annotations

import asyncio
import mimetypes
import os
import pickle
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from loadtests import bench_serving as bs

REQUEST_TIMEOUT_S = 120.0  # as bench_serving's httpx client
BOUNDARY = "camserve-rawload-3f9c2d"  # fixed, so the same arguments build the same bytes


class ProtocolError(Exception):
    """The server's answer is not HTTP/1.1 this client can read."""


def build_request(
    base: str, image: bytes, form: dict[str, str], path: str = "/explain", filename: str = "chelsea.png"
) -> bytes:
    """The multipart POST as it goes on the wire: the form fields and the file exactly as
    ``bench_serving.load`` posts them (httpx builds both); the part's type follows ``filename``."""
    import httpx

    boundary = BOUNDARY
    if boundary.encode() in image:
        raise ValueError("the image holds the multipart boundary")
    request = httpx.Request("POST", base.rstrip("/") + path, data=form,
                            files={"file": (filename, image, mimetypes.guess_type(filename)[0]
                                            or "application/octet-stream")},
                            headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    body = request.read()
    target = request.url.raw_path.decode()
    lines = [f"POST {target} HTTP/1.1"] + [f"{k}: {v}" for k, v in request.headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass
class Share:
    """What one client process is asked to do."""

    host: str
    port: int
    request: bytes
    clients: int
    keep_timings: bool = False
    timeout_s: float = REQUEST_TIMEOUT_S


@dataclass
class Result:
    """What one client process (or all of them, merged) measured."""

    latencies: list[float] = field(default_factory=list)
    timings: list[dict[str, float]] = field(default_factory=list)
    errors: dict[int, int] = field(default_factory=dict)  # status (0: no complete answer) -> count
    body_bytes: int = 0  # of the 200 answers recorded: every byte of each body was read
    connections: int = 0  # connections opened, warm-up included
    cpu_s: float = 0.0  # the client processes' CPU while recording
    finished: float = 0.0  # time.monotonic() when the last recorded request ended

    def add(self, other: Result) -> None:
        self.latencies += other.latencies
        self.timings += other.timings
        for status, count in other.errors.items():
            self.errors[status] = self.errors.get(status, 0) + count
        self.body_bytes += other.body_bytes
        self.connections += other.connections
        self.cpu_s += other.cpu_s
        self.finished = max(self.finished, other.finished)


class Connection:
    """One keep-alive connection, reopened when the server closed it or it broke."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.opened = 0

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def exchange(self, request: bytes) -> tuple[int, dict[str, str], int]:
        """Send ``request`` and read the whole answer: (status, headers, body length)."""
        if self.reader is None or self.reader.at_eof():  # never opened, or closed by the server
            self.close()
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            self.opened += 1
        reader, writer = self.reader, self.writer
        assert writer is not None
        writer.write(request)
        while True:  # skip interim answers (100 Continue, 103 Early Hints)
            version, status, headers = _parse_head(await reader.readuntil(b"\r\n\r\n"))
            if not 100 <= status < 200 or status == 101:
                break
        tokens = headers.get("connection", "").lower()
        keep = "close" not in tokens if version == "HTTP/1.1" else "keep-alive" in tokens
        if "chunked" in headers.get("transfer-encoding", "").lower():
            length = await _read_chunked(reader)
        elif "content-length" in headers:
            length = int(headers["content-length"])
            await reader.readexactly(length)
        elif status in (204, 304):
            length = 0
        else:  # delimited by the end of the connection
            length = len(await reader.read())
            keep = False
        if not keep:
            self.close()
        return status, headers, length


def _parse_head(head: bytes) -> tuple[str, int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest.partition(" ")[0]
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise ProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, sep, value = line.partition(":")
            if not sep:
                raise ProtocolError(f"malformed header line: {line[:80]!r}")
            headers[name.strip().lower()] = value.strip()
    return version, int(code), headers


async def _read_chunked(reader: asyncio.StreamReader) -> int:
    total = 0
    while True:
        size_line = await reader.readuntil(b"\r\n")
        try:
            size = int(size_line.split(b";")[0].strip(), 16)
        except ValueError as exc:
            raise ProtocolError(f"bad chunk size {size_line[:40]!r}") from exc
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, up to the blank line
                pass
            return total
        await reader.readexactly(size)
        if await reader.readexactly(2) != b"\r\n":
            raise ProtocolError("a chunk not followed by CRLF")
        total += size


_BROKEN = (OSError, EOFError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ProtocolError,
           TimeoutError, ValueError)  # ValueError: a non-numeric Content-Length


async def run_share(share: Share, warm_from: float, start_at: float, stop_at: float) -> Result:
    """``share.clients`` connections posting back to back from ``warm_from`` (time.monotonic()),
    unrecorded until ``start_at``, then recorded until ``stop_at``: every request that began
    meanwhile is finished and recorded. The connections stay open from warm-up to the end."""
    parse = _stage_parser() if share.keep_timings else None
    result = Result()
    connections = [Connection(share.host, share.port) for _ in range(share.clients)]

    async def one(connection: Connection, record: bool) -> None:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(share.timeout_s):
                status, headers, length = await connection.exchange(share.request)
        except _BROKEN:
            connection.close()
            if record:
                result.errors[0] = result.errors.get(0, 0) + 1
            return
        seconds = time.perf_counter() - started
        if not record:
            return
        if status != 200:
            result.errors[status] = result.errors.get(status, 0) + 1
            return
        result.latencies.append(seconds)
        result.body_bytes += length
        if parse is not None and "server-timing" in headers:
            result.timings.append(parse(headers["server-timing"]))

    async def client(connection: Connection) -> None:
        while time.monotonic() < start_at:
            await one(connection, record=False)
        while time.monotonic() < stop_at:
            await one(connection, record=True)

    cpu_before: list[float] = []

    async def read_cpu_at_start() -> None:
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        cpu_before.append(_own_cpu_s())

    await asyncio.sleep(max(0.0, warm_from - time.monotonic()))
    await asyncio.gather(read_cpu_at_start(), *(client(c) for c in connections))
    result.finished = time.monotonic()
    result.cpu_s = _own_cpu_s() - cpu_before[0]
    result.connections = sum(c.opened for c in connections)
    for connection in connections:
        connection.close()
    return result


def _stage_parser() -> Callable[[str], dict[str, float]]:
    from service.api.pipeline import parse_server_timing  # imported before the clock starts

    return parse_server_timing


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def split(concurrency: int, processes: int) -> list[int]:
    """``concurrency`` connections over at most ``processes`` processes, as evenly as they go."""
    processes = max(1, min(processes, concurrency))
    return [concurrency // processes + (1 if i < concurrency % processes else 0) for i in range(processes)]


class Clients:
    """The client processes, started and waiting (:meth:`start`), then run once (:meth:`run`)."""

    def __init__(self, base: str, request: bytes, concurrency: int, processes: int,
                 keep_timings: bool = False) -> None:
        url = urlsplit(base)
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"only plain http:// is spoken here, not {base!r}")
        self.shares = [Share(url.hostname, url.port or 80, request, n, keep_timings)
                       for n in split(concurrency, processes)]
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(bs.REPO), os.environ.get("PYTHONPATH", "")) if p)}
        for share in self.shares:
            process = subprocess.Popen([sys.executable, "-m", "loadtests.rawload", "--serve-share"],
                                       cwd=bs.REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            self.processes.append(process)
            _send(process, share)
        for process in self.processes:
            if _receive(process) != "ready":
                raise RuntimeError("a load client process did not start")

    def run(self, warm_up_s: float, duration_s: float,
            on_start: Callable[[], None] = lambda: None) -> tuple[Result, float]:
        """Warm up, then record for ``duration_s``: the merged result and the seconds from the
        start of recording to the end of the last recorded request. ``on_start`` is called as
        recording starts (to read the server's CPU clock)."""
        start_at = time.monotonic() + 0.1 + warm_up_s  # every process has its schedule by then
        stop_at = start_at + duration_s
        for process in self.processes:
            _send(process, (start_at - warm_up_s, start_at, stop_at))
        time.sleep(max(0.0, start_at - time.monotonic()))
        on_start()
        merged = Result()
        for process in self.processes:
            answer = _receive(process)
            if not isinstance(answer, Result):
                raise RuntimeError(f"a load client process failed: {answer!r}")
            merged.add(answer)
        return merged, max(0.0, merged.finished - start_at)

    def stop(self) -> None:
        for process in self.processes:
            if process.stdin is not None:
                process.stdin.close()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes = []

    def __enter__(self) -> Clients:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def _send(process: subprocess.Popen[bytes], message: Any) -> None:
    assert process.stdin is not None
    pickle.dump(message, process.stdin)
    process.stdin.flush()


def _receive(process: subprocess.Popen[bytes]) -> Any:
    assert process.stdout is not None
    try:
        return pickle.load(process.stdout)
    except EOFError:
        raise RuntimeError(f"a load client process exited with {process.wait()}") from None


def load(
    base: str, image: bytes, concurrency: int, duration_s: float, outcome: bs.Outcome, warm_up_s: float = 0.0,
    server_pid: int | None = None, form: dict[str, str] | None = None, processes: int = 1,
    filename: str = "chelsea.png",
) -> Result:
    """``bench_serving.load`` with this client in ``processes`` processes: results added to
    ``outcome``, with the server's CPU time meanwhile (every process under ``server_pid``) and
    the client processes' own. Returns the merged :class:`Result` (connections, body bytes)."""
    request = build_request(base, image, form if form is not None else bs.FORM, filename=filename)
    before: dict[str, float | None] = {}

    def read_server_clocks() -> None:
        before["server"] = bs.tree_cpu_s(server_pid) if server_pid else None
        before["torch"] = bs.torch_threads_cpu_s(server_pid) if server_pid else None

    with Clients(base, request, concurrency, processes, keep_timings=True) as clients:
        result, elapsed = clients.run(warm_up_s, duration_s, on_start=read_server_clocks)
    server_after = bs.tree_cpu_s(server_pid) if server_pid else None
    torch_after = bs.torch_threads_cpu_s(server_pid) if server_pid else None
    outcome.latencies += result.latencies
    outcome.timings += result.timings
    for status, count in result.errors.items():
        outcome.errors[status] = outcome.errors.get(status, 0) + count
    outcome.elapsed += elapsed
    outcome.client_cpu_s += result.cpu_s
    server_before, torch_before = before.get("server"), before.get("torch")
    if server_before is not None and server_after is not None:
        outcome.server_cpu_s = (outcome.server_cpu_s or 0.0) + server_after - server_before
    if torch_before is not None and torch_after is not None:
        outcome.torch_cpu_s = (outcome.torch_cpu_s or 0.0) + torch_after - torch_before
    return result


def serve_share(stdin: BinaryIO, stdout: BinaryIO) -> None:
    """A client process: its :class:`Share`, then ``ready``; then a schedule (warm-up start,
    recording start, stop); warm-up, the recorded run, its :class:`Result`."""
    share: Share = pickle.load(stdin)
    if share.keep_timings:
        _stage_parser()  # the import, now rather than on the clock
    pickle.dump("ready", stdout)
    stdout.flush()
    try:
        warm_from, start_at, stop_at = pickle.load(stdin)
    except EOFError:
        return  # stopped before running
    try:
        result: Any = asyncio.run(run_share(share, warm_from, start_at, stop_at))
    except Exception as exc:  # the parent says which process failed and how
        result = repr(exc)
    pickle.dump(result, stdout)
    stdout.flush()


if __name__ == "__main__":
    if sys.argv[1:] != ["--serve-share"]:
        raise SystemExit("python -m loadtests.rawload --serve-share: a client process of loadtests.rawload")
    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but the pickles on the pipe
    from loadtests import rawload  # so the pickles name loadtests.rawload's classes, not __main__'s

    rawload.serve_share(sys.stdin.buffer, out)
