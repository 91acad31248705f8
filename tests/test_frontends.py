"""``python -m service`` with two front-end processes (``CAMSERVE_WORKERS=2``): both serve the
port, a job is seen, streamed and cancelled from the process that did not run it, ``/metrics``
sums both, SIGTERM drains both and exits 0, and a front end exiting 70 stops the service with 70.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.__main__ import EXIT_DEVICE_FAILED
from tests import sse
from tests.server_process import ROOT, START_S, Server, free_port, poll

CAT = (Path(__file__).parent / "data" / "chelsea.png").read_bytes()
HEADER = "x-camserve-frontend"
TOP_K = json.dumps({"scorecam": {"top_k_channels": 64}})
ATTEMPTS = 200  # new connections tried to reach a given front end (the kernel hashes them)


def start(log_dir: Path, module: str = "service", **settings: object) -> Server:
    port = free_port()
    env = {**os.environ, "CAMSERVE_DEVICE": "cpu", "CAMSERVE_WARMUP": "false", "CAMSERVE_WORKERS": "2"}
    env.pop("CAMSERVE_API_KEY", None)
    env.update({f"CAMSERVE_{name.upper()}": str(value) for name, value in settings.items()})
    log_path = log_dir / f"server-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", module, "--port", str(port)],
                                   cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = Server(process, port, log_path)

    def ready(index: int) -> Callable[[], bool]:
        def check() -> bool:
            assert process.poll() is None, log_path.read_text()
            try:
                answer = on(server, index, "GET", "/readyz", attempts=20)
            except (httpx.TransportError, AssertionError):
                return False
            return answer.status_code == 200

        return check

    for index in (0, 1):  # each answers for itself: wait for both
        poll(ready(index), f"front end {index} to be ready", timeout_s=START_S)
    return server


def on(server: Server, index: int, method: str, path: str, attempts: int = ATTEMPTS,
       **kwargs: Any) -> httpx.Response:
    """``method path`` answered by front end ``index``: new connections until one lands there
    (a probe first, then the request on that same kept-alive connection)."""
    for _ in range(attempts):
        with httpx.Client(base_url=server.url, timeout=120) as client:
            if client.get("/healthz").headers[HEADER] != str(index):
                continue
            answer = client.request(method, path, **kwargs)
            assert answer.headers[HEADER] == str(index), "the connection moved"
            return answer
    raise AssertionError(f"no connection reached front end {index} in {attempts} attempts")


def children(server: Server) -> list[int]:
    pid = server.process.pid
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def stop(server: Server) -> int:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
    try:
        return server.process.wait(timeout=120)
    finally:
        if server.process.poll() is None:
            server.process.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    started = start(tmp_path_factory.mktemp("frontends"), drain_timeout_s=120)
    try:
        yield started
    finally:
        if started.process.poll() is None:
            started.process.kill()
            started.process.wait()


def counted(text: str, name: str, **labels: str) -> float:
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_both_front_ends_serve_and_metrics_sum_them(server: Server) -> None:
    assert len(children(server)) == 2  # two server processes under the supervisor
    # The supervisor stays small: torch is loaded by the front ends only.
    assert "libtorch" not in Path(f"/proc/{server.process.pid}/maps").read_text()
    assert all("libtorch" in Path(f"/proc/{pid}/maps").read_text() for pid in children(server))
    served = {0: 0, 1: 0}
    for index in (0, 1, 0, 1):
        answer = on(server, index, "POST", "/predict", files={"file": ("cat.png", CAT, "image/png")})
        assert answer.status_code == 200, answer.text
        served[index] += 1
    for index in (0, 1):  # either one's /metrics counts every process's requests
        text = on(server, index, "GET", "/metrics").text
        assert counted(text, "camserve_request_duration_seconds_count", endpoint="/predict",
                       status="200") == sum(served.values())
        assert counted(text, "camserve_images_accepted_total") == sum(served.values())


def events(server: Server, index: int, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    for _ in range(ATTEMPTS):
        with httpx.Client(base_url=server.url, timeout=120) as client:
            if client.get("/healthz").headers[HEADER] != str(index):
                continue
            with client.stream("GET", f"/jobs/{job_id}/events") as response:
                assert response.status_code == 200 and response.headers[HEADER] == str(index)
                return list(sse.events(response.iter_lines()))
    raise AssertionError(f"no connection reached front end {index}")


def submit(server: Server, index: int) -> dict[str, Any]:
    answer = on(server, index, "POST", "/jobs", files={"file": ("cat.png", CAT, "image/png")},
                data={"methods": "scorecam", "method_params": TOP_K, "outputs": "mask"})
    assert answer.status_code == 202, answer.text
    return dict(answer.json())


def test_a_job_is_followed_from_the_other_front_end_to_its_result(server: Server) -> None:
    job = submit(server, 0)
    seen = events(server, 1, job["job_id"])
    names = [name for name, _ in seen]
    assert names[-1] == "done" and names.count("done") == 1 and "progress" in names
    final = seen[-1][1]
    assert final["status"] == "succeeded" and final["progress"]["done"] == final["progress"]["total"]
    mask = final["result"]["results"][0]["explanations"][0]["mask"]["data"]
    assert len(mask) > 1 and all(0.0 <= v <= 1.0 for row in mask for v in row)
    from_owner = on(server, 0, "GET", f"/jobs/{job['job_id']}").json()
    from_other = on(server, 1, "GET", f"/jobs/{job['job_id']}").json()
    assert from_other == from_owner == final


def test_a_job_is_cancelled_from_the_other_front_end(server: Server) -> None:
    job = submit(server, 1)

    def running() -> bool:
        body = on(server, 0, "GET", f"/jobs/{job['job_id']}").json()
        assert body["status"] in ("queued", "running"), body
        return bool(body["status"] == "running" and body["progress"]["done"] > 0)

    poll(running, "the job to run, seen from the other front end")
    cancelled = on(server, 0, "DELETE", f"/jobs/{job['job_id']}")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled", cancelled.json()
    assert cancelled.json()["error"]["code"] == "cancelled"
    owner = on(server, 1, "GET", f"/jobs/{job['job_id']}").json()
    assert owner["status"] == "cancelled" and owner["progress"]["done"] < owner["progress"]["total"]
    assert on(server, 0, "GET", "/jobs/" + "0" * 32).status_code == 404


def test_sigterm_drains_both_front_ends_and_exits_0(server: Server) -> None:
    front_ends = children(server)

    def explain(index: int) -> httpx.Response:
        return on(server, index, "POST", "/explain", files={"file": ("cat.png", CAT, "image/png")},
                  data={"methods": "scorecam", "outputs": "mask",
                        "method_params": json.dumps({"scorecam": {"top_k_channels": 256}})},
                  headers={"X-Request-Timeout": "300"})

    with ThreadPoolExecutor(2) as pool:
        answers = [pool.submit(explain, index) for index in (0, 1)]

        def both_busy() -> bool:
            text = on(server, 0, "GET", "/metrics").text
            return counted(text, "camserve_in_flight_requests") >= 3  # the two, and this scrape

        poll(both_busy, "a request in flight on each front end")
        assert stop(server) == 0
        for answer in answers:  # accepted work was finished, not cut
            assert answer.result().status_code == 200
    for pid in front_ends:
        assert not Path(f"/proc/{pid}").exists()
    log = server.log_path.read_text()
    assert log.count("drained; shutting down") == 2 and "every front end exited cleanly" in log


def test_a_front_end_exiting_70_stops_the_service_with_70(tmp_path: Path) -> None:
    server = start(tmp_path, module="tests.fatal_server")
    try:
        served = on(server, 0, "POST", "/predict", files={"file": ("x.png", fatal_png(3), "image/png")})
        assert served.status_code == 200
        failed = on(server, 1, "POST", "/predict", files={"file": ("x.png", fatal_png(66), "image/png")})
        assert failed.status_code == 503 and failed.json()["error"]["code"] == "unavailable"
        assert server.process.wait(timeout=120) == EXIT_DEVICE_FAILED
        log = server.log_path.read_text()
        assert "front end 1 (pid" in log
        assert f"exited with status {EXIT_DEVICE_FAILED}; stopping the others" in log
        assert "drained; shutting down" in log  # front end 0 drained as SIGTERM asks
        assert f"exiting with status {EXIT_DEVICE_FAILED}" in log
    finally:
        stop(server)


def test_a_front_end_whose_models_failed_to_load_stops_the_service_with_1(tmp_path: Path) -> None:
    # Left running, it would answer /readyz 503 beside a ready one, by the connection's luck.
    port = free_port()
    env = {**os.environ, "CAMSERVE_DEVICE": "cpu", "CAMSERVE_WARMUP": "false", "CAMSERVE_WORKERS": "2",
           "CAMSERVE_TEST_LOAD_FAILS": "1"}
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "tests.fatal_server", "--port", str(port)],
                                   cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        assert process.wait(timeout=START_S) == 1
        text = log_path.read_text()
        assert "cannot start: the models failed to load" in text and "the device is gone" in text
    finally:
        if process.poll() is None:
            process.kill()


def fatal_png(tag: int) -> bytes:
    from tests.test_fatal_exit import png

    return png(tag)


def test_a_front_end_killed_stops_the_service_with_1(tmp_path: Path) -> None:
    server = start(tmp_path, module="tests.fatal_server")
    try:
        first, second = children(server)
        os.kill(second, signal.SIGKILL)
        assert server.process.wait(timeout=120) == 1
        assert not Path(f"/proc/{first}").exists()  # the other one was stopped, not left behind
        log = server.log_path.read_text()
        assert f"(pid {second}) exited with status -{int(signal.SIGKILL)}; stopping the others" in log
        assert "drained; shutting down" in log
    finally:
        stop(server)


def test_front_ends_stop_when_their_supervisor_is_killed(tmp_path: Path) -> None:
    server = start(tmp_path, module="tests.fatal_server")
    try:
        front_ends = children(server)
        place = json.loads(dict(
            line.split("=", 1) for line in Path(f"/proc/{front_ends[0]}/environ").read_text().split("\0")
            if "=" in line)["_CAMSERVE_FRONTEND"])
        shared = Path(place["shared"])
        assert (shared / "jobs").is_dir()
        server.process.kill()
        server.process.wait()
        # Each notices its parent has gone, drains and exits.
        poll(lambda: not any(Path(f"/proc/{pid}").exists() and "zombie" not in
                             Path(f"/proc/{pid}/status").read_text() for pid in front_ends),
             "the front ends to exit", timeout_s=60)
        assert server.log_path.read_text().count("the supervisor has gone; stopping") == 2
        # The killed supervisor could not remove its folder: the last front end out did.
        assert not shared.exists()
    finally:
        stop(server)


def test_sigterm_while_the_front_ends_start_exits_0(tmp_path: Path) -> None:
    # Sent as soon as the front ends are started, the SIGTERM reaches them while they import
    # torch, before their servers handle it: they die of it, as asked, and that is no failure.
    env = {**os.environ, "CAMSERVE_DEVICE": "cpu", "CAMSERVE_WARMUP": "false", "CAMSERVE_WORKERS": "2"}
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "service", "--port", str(free_port())],
                                   cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        poll(lambda: "serving with 2 front ends" in log_path.read_text(), "the front ends to start",
             timeout_s=START_S)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0, log_path.read_text()
        assert "every front end exited cleanly" in log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
