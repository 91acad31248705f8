"""Connections on a real ``python -m service``: idle, slow-header and slow-body clients are
closed after ``CAMSERVE_CLIENT_TIMEOUT_S`` with one log line each, the connection bound holds
(descriptors stay bounded, ``/healthz`` keeps answering), and a client still uploading a body
over the limit reads its 413 instead of a broken pipe."""

from __future__ import annotations

import json
import select
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.connections import MAX_HEAD_BYTES
from tests.server_process import Server, poll, running

TIMEOUT_S = 1
STEPS = 100  # bound on any byte-by-byte loop: 100 steps of 0.2 s
CAT = (Path(__file__).parent / "data" / "chelsea.png").read_bytes()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running(tmp_path_factory.mktemp("connections"), client_timeout_s=TIMEOUT_S,
                 max_upload_mb=1) as server:
        yield server


def closed_by_server(sock: socket.socket, trickle: bytes = b"") -> tuple[bool, bytes]:
    """Send ``trickle`` one byte per 0.2 s step (nothing if empty) until the server closes
    the connection; (closed, what the server sent)."""
    received = b""
    for step in range(STEPS):
        readable, _, _ = select.select([sock], [], [], 0.2)
        try:
            if readable:
                data = sock.recv(65536)
                if not data:
                    return True, received
                received += data
            elif step < len(trickle):
                sock.send(trickle[step:step + 1])
        except (BrokenPipeError, ConnectionResetError):
            return True, received
    return False, received


def logged_close(server: Server, reason: str, port: int) -> dict[str, object]:
    return server.logged(lambda r: r.get("reason") == reason and str(r.get("client", "")).endswith(
        f":{port}"), f"the log line for {reason} (client port {port})")


def assert_still_serving(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.get("/healthz").status_code == 200
        answer = client.post("/predict", files={"file": ("cat.png", CAT, "image/png")})
        assert answer.status_code == 200, answer.text


def test_an_idle_connection_is_closed_and_logged(server: Server) -> None:
    with server.connect() as sock:
        port = sock.getsockname()[1]
        closed, sent = closed_by_server(sock)
    assert closed and sent == b""
    record = logged_close(server, "idle connection", port)
    assert record["timeout_s"] == TIMEOUT_S
    assert_still_serving(server)


def test_an_idle_keep_alive_connection_is_closed_and_logged(server: Server) -> None:
    with server.connect() as sock:
        port = sock.getsockname()[1]
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        closed, sent = closed_by_server(sock)
    assert closed and sent.startswith(b"HTTP/1.1 200")
    logged_close(server, "idle keep-alive connection", port)


def test_slow_headers_are_closed_and_logged(server: Server) -> None:
    head = b"GET /healthz HTTP/1.1\r\nHost: test\r\nUser-Agent: " + b"s" * 200 + b"\r\n\r\n"
    with server.connect() as sock:
        port = sock.getsockname()[1]
        closed, sent = closed_by_server(sock, head)
    assert closed and sent == b""  # never answered: the headers never ended
    record = logged_close(server, "slow request headers", port)
    assert record["level"] == "warning" and int(str(record["bytes_received"])) > 0
    assert_still_serving(server)


def test_a_slow_body_is_closed_and_logged(server: Server) -> None:
    boundary = "b0undary"
    head = (f"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Length: 100000\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode()
    part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + b"x" * 1000
    with server.connect() as sock:
        port = sock.getsockname()[1]
        sock.sendall(head)
        closed, _ = closed_by_server(sock, part)
    assert closed
    record = logged_close(server, "slow request body", port)
    assert int(str(record["bytes_in_window"])) < int(str(record["min_bytes"]))
    assert_still_serving(server)


def read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def test_a_client_still_uploading_reads_its_413(server: Server) -> None:
    body = b"x" * (8 << 20)  # 8 MB against a 1 MB limit: answered 413 before it is sent
    with server.connect() as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: application/octet-stream"
                     b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        sock.sendall(body)  # a broken pipe here is what lingering close prevents
        head, answer = read_response(sock)
    assert head.startswith(b"HTTP/1.1 413"), head
    assert b"connection: close" in head.lower()
    assert json.loads(answer)["error"]["code"] == "payload_too_large"
    assert_still_serving(server)


def test_a_streamed_upload_over_the_limit_reads_its_413(server: Server) -> None:
    def chunks() -> Iterator[bytes]:
        yield (b'--zz\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
               b"Content-Type: image/png\r\n\r\n")
        for _ in range(128):  # 8 MB in 64 KiB chunks, no Content-Length: the limit trips mid-way
            yield b"y" * 65536

    with httpx.Client(base_url=server.url, timeout=30) as client:
        response = client.post("/predict", content=chunks(),
                               headers={"Content-Type": "multipart/form-data; boundary=zz"})
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "payload_too_large"


def test_the_connection_bound_holds_and_healthz_answers(tmp_path: Path) -> None:
    bound = 40
    # A long timeout, so only the bound (not the idle timeout) can close these connections.
    with running(tmp_path, client_timeout_s=60, max_connections=bound) as server:
        base = server.descriptors()
        idle = [server.connect() for _ in range(3 * bound)]
        try:
            def evicted() -> int:
                gone = 0
                for sock in idle:
                    readable, _, _ = select.select([sock], [], [], 0)
                    if readable and sock.recv(1, socket.MSG_PEEK) == b"":
                        gone += 1
                return gone

            poll(lambda: evicted() >= 2 * bound, "the oldest idle connections to be closed")
            assert server.descriptors() <= base + bound + 4
            with httpx.Client(base_url=server.url, timeout=30) as client:
                for _ in range(5):
                    assert client.get("/healthz").status_code == 200
            record = server.logged(lambda r: r.get("message") == "connection limit reached",
                                   "the connection limit's summary line")
            assert record["max_connections"] == bound and int(str(record["idle_closed"])) > 0
        finally:
            for sock in idle:
                sock.close()


def test_at_the_bound_with_no_idle_connection_a_new_one_gets_a_json_503(tmp_path: Path) -> None:
    bound = 8
    with running(tmp_path, client_timeout_s=60, max_connections=bound) as server:
        busy = []
        try:
            for _ in range(bound):  # each one in a request: headers in, body still coming
                sock = server.connect()
                sock.sendall(b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n"
                             b"Content-Type: multipart/form-data; boundary=q\r\n\r\n--q\r\n")
                busy.append(sock)
            poll(lambda: server.descriptors() >= bound, "the busy connections to be accepted")
            with server.connect() as extra:
                head, body = read_response(extra)
            assert head.startswith(b"HTTP/1.1 503"), head
            assert json.loads(body)["error"]["code"] == "unavailable"
        finally:
            for sock in busy:
                sock.close()


def test_a_request_head_over_the_limit_is_a_json_431(server: Server) -> None:
    with server.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Big: " + b"b" * (MAX_HEAD_BYTES + 1))
        head, body = read_response(sock)
    assert head.startswith(b"HTTP/1.1 431"), head
    assert json.loads(body)["error"]["code"] == "bad_request"
    server.logged(lambda r: r.get("message") == "refused a request head over the limit",
                  "the log line of the oversized head")
    assert_still_serving(server)


def test_a_malformed_request_gets_a_json_400(server: Server) -> None:
    with server.connect() as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        head, body = read_response(sock)
    assert head.startswith(b"HTTP/1.1 400"), head
    assert json.loads(body)["error"]["code"] == "bad_request"


def test_a_client_that_stops_reading_is_closed_and_logged(server: Server) -> None:
    with server.connect() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        port = sock.getsockname()[1]
        # 200 pipelined requests for the schema (over 20 MB of answers), none of them read.
        sock.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: test\r\n\r\n" * 200)
        record = logged_close(server, "client not reading its response", port)
    assert record["level"] == "warning"
    assert_still_serving(server)


def test_an_upload_slower_than_the_timeout_but_steady_is_served(server: Server) -> None:
    """The body rule is a rate floor, not a deadline: an upload taking several timeouts at a
    steady pace is answered."""
    boundary = "st3ady"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"cat.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + CAT + f"\r\n--{boundary}--\r\n".encode()
    pieces = [body[i:i + 4096] for i in range(0, len(body), 4096)]
    pace = threading.Event()
    with server.connect() as sock:
        sock.sendall(f"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Length: {len(body)}\r\n"
                     f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n".encode())
        step = 3 * TIMEOUT_S / len(pieces)  # the whole body over three timeouts, 4 KiB a step
        for piece in pieces:
            sock.sendall(piece)
            pace.wait(step)
        head, answer = read_response(sock)
    assert head.startswith(b"HTTP/1.1 200"), head + answer[:300]
