"""SIGTERM with work outlasting ``CAMSERVE_DRAIN_TIMEOUT_S`` on a real ``python -m service``:
the requests still running get the JSON 503, the log says how many were cut short, and the
process exits 0 (it used to answer text/plain 500s and abort with exit status 134)."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests import sse
from tests.server_process import poll, running

CAT = (Path(__file__).parent / "data" / "chelsea.png").read_bytes()
IMAGES = (2, 1)  # two requests: Score-CAM over every channel takes far longer than the drain


def accepted_images(client: httpx.Client) -> float:
    text = client.get("/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "camserve_images_accepted_total")


def test_work_outlasting_the_drain_gets_json_503s_and_the_process_exits_0(tmp_path: Path) -> None:
    with running(tmp_path, drain_timeout_s=1, max_batch_size=1) as server:

        def explain(images: int) -> httpx.Response:
            files = [("file", (f"cat{i}.png", CAT, "image/png")) for i in range(images)]
            with httpx.Client(base_url=server.url, timeout=120) as own:
                return own.post("/explain", files=files, headers={"X-Request-Timeout": "600"},
                                data={"methods": "scorecam", "outputs": "mask"})

        with httpx.Client(base_url=server.url, timeout=30) as client, ThreadPoolExecutor(2) as pool:
            answers = [pool.submit(explain, n) for n in IMAGES]
            poll(lambda: accepted_images(client) == sum(IMAGES), "every image to be queued")
            server.process.send_signal(signal.SIGTERM)
            responses = [answer.result(timeout=120) for answer in answers]
        for response in responses:
            assert response.status_code == 503, response.text
            assert response.headers["content-type"] == "application/json"
            assert response.json()["error"]["code"] == "unavailable"
        assert server.process.wait(timeout=60) == 0
        record = server.logged(lambda r: "cut_short" in r, "the drain's cut-short line")
        assert record["cut_short"] == len(IMAGES)
        output = server.log_path.read_text()
        assert "terminate called" not in output and "Traceback" not in output


def test_a_job_cut_short_by_the_drain_ends_cancelled_on_its_event_stream(tmp_path: Path) -> None:
    with running(tmp_path, drain_timeout_s=1) as server:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            job = client.post("/jobs", files={"file": ("cat.png", CAT, "image/png")},
                              data={"methods": "scorecam", "outputs": "mask"}).json()
            events: list[tuple[str, dict[str, object]]] = []
            with client.stream("GET", f"/jobs/{job['job_id']}/events") as stream:
                for event in sse.events(stream.iter_lines()):
                    events.append(event)
                    if event[0] == "progress" and len(events) == 2:
                        server.process.send_signal(signal.SIGTERM)
        assert events[-1][0] == "done"
        final = events[-1][1]
        assert final["status"] == "cancelled"
        assert final["error"]["code"] == "shutdown"  # type: ignore[index]
        assert server.process.wait(timeout=60) == 0
