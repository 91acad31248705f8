"""SIGTERM on a real ``python -m service`` with requests in flight: every one is answered."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
CAT = (Path(__file__).parent / "data" / "chelsea.png").read_bytes()
REQUESTS, IMAGES = 4, 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def poll(condition: Callable[[], bool], what: str, timeout_s: float = 120.0) -> None:
    """Re-check ``condition`` every 50 ms until it holds; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    pause = threading.Event()
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for: {what}"
        pause.wait(0.05)


def accepted_images(client: httpx.Client) -> float:
    text = client.get("/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "camserve_images_accepted_total")


def test_sigterm_drains_in_flight_requests_then_exits(tmp_path: Path) -> None:
    port = free_port()
    # Warm-up is tested on fakes (tests/engine); skipping it here keeps start-up short.
    env = {**os.environ, "CAMSERVE_DEVICE": "cpu", "CAMSERVE_MAX_BATCH_SIZE": "4",
           "CAMSERVE_WARMUP": "false", "CAMSERVE_DRAIN_TIMEOUT_S": "120"}
    env.pop("CAMSERVE_API_KEY", None)
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port)],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=120) as client:

            def ready() -> bool:
                assert server.poll() is None, (tmp_path / "server.log").read_text()
                try:
                    return client.get("/readyz").status_code == 200
                except httpx.TransportError:
                    return False

            poll(ready, "the server to be ready")

            def explain(index: int) -> httpx.Response:
                files = [("file", (f"cat{index}-{i}.png", CAT, "image/png")) for i in range(IMAGES)]
                with httpx.Client(base_url=base, timeout=120) as own:
                    return own.post("/explain", files=files, data={"outputs": "mask"},
                                    headers={"X-Request-Timeout": "600"})

            with ThreadPoolExecutor(REQUESTS) as pool:
                answers = [pool.submit(explain, i) for i in range(REQUESTS)]
                poll(lambda: accepted_images(client) == REQUESTS * IMAGES, "every image to be queued")
                server.send_signal(signal.SIGTERM)
                # Draining: not ready, and new work is refused, while accepted work goes on.
                not_ready = client.get("/readyz")
                assert not_ready.status_code == 503
                assert not_ready.json()["state"] == "draining"
                refused = client.post("/predict", files={"file": ("cat.png", CAT, "image/png")})
                assert refused.status_code == 503
                assert refused.json()["error"]["code"] == "unavailable"
                responses = [answer.result() for answer in answers]
        for response in responses:
            assert response.status_code == 200, response.text
            assert len(response.json()["results"]) == IMAGES
        assert server.wait(timeout=60) == 0
        output = (tmp_path / "server.log").read_text()
        assert "drained; shutting down" in output
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        log.close()
