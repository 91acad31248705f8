"""A real ``python -m service`` on a free loopback port, for tests of what only a real
server shows: connection timeouts, the connection bound, the drain and the exit status."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
START_S = 120.0  # upper bound on start-up (the model loads on shared CPUs)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def poll(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Re-check ``condition`` every 20 ms until it holds; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    pause = threading.Event()
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for: {what}"
        pause.wait(0.02)


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=30)

    def log(self) -> list[dict[str, Any]]:
        records = []
        for line in self.log_path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records

    def logged(self, predicate: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        """The first log record matching ``predicate``, waited for (bounded)."""
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            found[:] = [r for r in self.log() if predicate(r)]
            return bool(found)

        poll(seen, what, timeout_s=30)
        return found[0]

    def descriptors(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))


@contextmanager
def running(tmp_path: Path, **settings: object) -> Iterator[Server]:
    """Start the server with ``CAMSERVE_<NAME>`` settings, wait until it is ready, and stop
    it afterwards (killed if a test left it running)."""
    port = free_port()
    env = {**os.environ, "CAMSERVE_DEVICE": "cpu", "CAMSERVE_WARMUP": "false"}
    env.pop("CAMSERVE_API_KEY", None)
    env.update({f"CAMSERVE_{name.upper()}": str(value) for name, value in settings.items()})
    log_path = tmp_path / f"server-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port)],
                                   cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = Server(process, port, log_path)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:

            def ready() -> bool:
                assert process.poll() is None, log_path.read_text()
                try:
                    return client.get("/readyz").status_code == 200
                except httpx.TransportError:
                    return False

            poll(ready, "the server to be ready", timeout_s=START_S)
        yield server
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
