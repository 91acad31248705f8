"""loadtests.rawload, the lean load client: against a small HTTP server written here, which
answers by a fixed cycle (200s of known sizes, by length, chunked and to the end of the
connection, a 503, ``Connection: close``, a dropped connection, a body cut short), and against
a real ``python -m service`` with two front ends."""

from __future__ import annotations

import asyncio
import re
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from loadtests import bench_serving as bs
from loadtests import rawload
from loadtests.bench_frontends import MODELS_TOML
from loadtests.named_threads import WORKER_PREFIX
from tests.server_process import free_port

IMAGE = bs.IMAGE.read_bytes()
REQUEST = rawload.build_request("http://127.0.0.1:1", IMAGE, bs.FORM)
REQUEST_BODY = REQUEST.partition(b"\r\n\r\n")[2]

# The answers, one per request in turn. "ok*" are 200s the client must count with their bodies;
# "refused" a 503; "dropped" and "cut" end the connection before the answer is complete.
CYCLE = ("ok", "refused", "ok-chunked", "ok-close", "dropped", "ok", "cut", "ok-eof")


@dataclass
class Tally:
    answers: Counter[str] = field(default_factory=Counter)
    ok_bytes: int = 0  # body bytes of every 200 sent
    bad_requests: int = 0  # requests whose body was not the multipart form the client built
    served: int = 0


class CyclingServer:
    """An asyncio HTTP/1.1 server on a free port, in its own thread, answering by :data:`CYCLE`."""

    def __init__(self) -> None:
        self.tally = Tally()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self.handle, "127.0.0.1", 0), self.loop).result(10)
        self.port = int(self.server.sockets[0].getsockname()[1])

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await self.answer(reader, writer):
                pass
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client closed its connection
        finally:
            writer.close()

    async def answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """One request read and answered; False once the connection is to end."""
        head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        body = await reader.readexactly(int(length.group(1))) if length else b""
        if body != REQUEST_BODY:
            self.tally.bad_requests += 1
        index = self.tally.served
        self.tally.served += 1
        kind = CYCLE[index % len(CYCLE)]
        self.tally.answers[kind] += 1
        # Sizes vary by request, every ninth over the client's 64 KiB read buffer.
        payload = bytes([65 + index % 26]) * (100 + index * 37 % 3000 + (200_000 if index % 9 == 0 else 0))
        if kind.startswith("ok"):
            self.tally.ok_bytes += len(payload)
        if kind == "ok":
            head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nserver-timing: total;dur=1.5\r\n\r\n"
            writer.write(head % len(payload) + payload)
        elif kind == "refused":
            writer.write(b'HTTP/1.1 503 Service Unavailable\r\ncontent-length: 14\r\n\r\n{"error":"no"}')
        elif kind == "ok-chunked":
            thirds = [payload[: len(payload) // 3], payload[len(payload) // 3:]]
            chunks = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(c), c) for c in thirds if c)
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunks
                         + b"0\r\nx-trailer: 1\r\n\r\n")
        elif kind == "ok-close":
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\ncontent-length: %d\r\n\r\n" % len(payload)
                         + payload)
        elif kind == "ok-eof":  # HTTP/1.0: the body ends with the connection
            writer.write(b"HTTP/1.0 200 OK\r\n\r\n" + payload)
        elif kind == "cut":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (len(payload) + 10) + payload)
        await writer.drain()
        return kind in ("ok", "refused", "ok-chunked")


@pytest.fixture()
def cycling() -> Iterator[CyclingServer]:
    server = CyclingServer()
    try:
        yield server
    finally:
        server.close()


@pytest.mark.parametrize(("concurrency", "processes"), [(1, 1), (5, 2)])
def test_every_answer_is_counted_as_what_it_was(
    cycling: CyclingServer, concurrency: int, processes: int
) -> None:
    outcome = bs.Outcome("raw")
    result = rawload.load(f"http://127.0.0.1:{cycling.port}", IMAGE, concurrency, 1.5, outcome,
                          processes=processes)
    tally = cycling.tally
    assert tally.bad_requests == 0, "every request arrived whole, as built"
    assert all(tally.answers[kind] > 0 for kind in CYCLE), tally.answers
    oks = sum(n for kind, n in tally.answers.items() if kind.startswith("ok"))
    assert len(outcome.latencies) == oks
    assert result.body_bytes == tally.ok_bytes, "every byte of every 200's body was read, none of the others'"
    broken = tally.answers["dropped"] + tally.answers["cut"]
    assert outcome.errors == {503: tally.answers["refused"], 0: broken}
    assert len(outcome.timings) == tally.answers["ok"] and {t["total"] for t in outcome.timings} == {1.5}
    # One connection to begin with per client, and a new one after every answer that ended one.
    ended = sum(tally.answers[kind] for kind in ("ok-close", "ok-eof", "dropped", "cut"))
    assert concurrency <= result.connections <= concurrency + ended
    assert outcome.elapsed > 0 and outcome.client_cpu_s > 0


def test_a_server_that_is_not_there_gives_errors_and_no_answers() -> None:
    outcome = bs.Outcome("nobody")
    rawload.load(f"http://127.0.0.1:{free_port()}", IMAGE, 3, 0.3, outcome)
    assert outcome.latencies == [] and set(outcome.errors) == {0} and outcome.errors[0] >= 3


def test_the_request_is_the_form_bench_serving_posts() -> None:
    head, _, body = REQUEST.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /explain HTTP/1.1"
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    assert int(headers["content-length"]) == len(body)
    assert headers["content-type"].startswith("multipart/form-data; boundary=")
    for name, value in bs.FORM.items():
        assert f'name="{name}"\r\n\r\n{value}\r\n'.encode() in body
    assert b'name="file"; filename="chelsea.png"\r\nContent-Type: image/png\r\n\r\n' + IMAGE + b"\r\n" in body


@pytest.mark.parametrize(("concurrency", "processes", "shares"),
                         [(16, 4, [4, 4, 4, 4]), (10, 4, [3, 3, 2, 2]), (2, 8, [1, 1]), (5, 0, [5])])
def test_connections_are_split_evenly_over_at_most_one_process_each(
    concurrency: int, processes: int, shares: list[int]
) -> None:
    assert rawload.split(concurrency, processes) == shares


def test_two_front_ends_of_the_real_service_are_loaded_and_their_torch_threads_counted() -> None:
    """``python -m service`` with CAMSERVE_WORKERS=2 (a tiny model): every request answered
    200 with its Server-Timing, and the worker threads of both front ends named and counted."""
    workdir = Path(tempfile.mkdtemp(prefix="camserve-rawload-"))
    (workdir / "models.toml").write_text(MODELS_TOML)
    env = {"CAMSERVE_DEVICE": "cpu", "CAMSERVE_MODELS_FILE": str(workdir / "models.toml"),
           "CAMSERVE_DEFAULT_MODEL": "tiny", "CAMSERVE_WORKERS": "2"}
    config = bs.Config("two", bs.camserve_command("--log-level", "warning"), env, "/readyz")
    (server,) = bs.launch([config], workdir)
    try:
        port = int(server.base.rpartition(":")[2])
        assert bs.wait_front_ends(server.process, port) == 2
        assert bs.listening_sockets(port) == 2
        front_ends = bs.children_of(server.process.pid)
        assert len(front_ends) == 2
        for pid in front_ends:  # started through named_threads.py, as the supervisor was
            names = {p.read_text().strip() for p in Path(f"/proc/{pid}/task").glob("*/comm")}
            assert any(name.startswith(WORKER_PREFIX) for name in names), names
            assert bs.torch_threads_cpu_s(pid) is not None
        outcome = bs.Outcome("two")
        result = rawload.load(server.base, IMAGE, 4, 2.0, outcome, warm_up_s=0.5,
                              server_pid=server.process.pid, processes=2)
    finally:
        bs.stop([server])
    assert outcome.errors == {} and len(outcome.latencies) > 0
    assert len(outcome.timings) == len(outcome.latencies) and all("compute" in t for t in outcome.timings)
    assert result.body_bytes > 50_000 * len(outcome.latencies), "each body holds the 451x300 mask as lists"
    assert outcome.server_cpu_s is not None and outcome.torch_cpu_s is not None
    assert 0 < outcome.torch_cpu_s < outcome.server_cpu_s


def test_the_benchmarks_client_option_reaches_the_raw_client(cycling: CyclingServer) -> None:
    outcome = bs.Outcome("raw")
    bs.measure("raw", f"http://127.0.0.1:{cycling.port}", IMAGE, 2, 0.5, outcome, client_processes=2)
    assert cycling.tally.bad_requests == 0 and cycling.tally.served > 0
    assert len(outcome.latencies) + sum(outcome.errors.values()) == cycling.tally.served
    with pytest.raises(ValueError, match="no load client"):
        bs.measure("curl", f"http://127.0.0.1:{cycling.port}", IMAGE, 1, 0.1, bs.Outcome("x"))
