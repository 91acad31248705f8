"""Bounded per request (issue 21), through HTTP with the real model: files that declare far
more than they carry are refused from their headers, responses are estimated before any work
and capped, admission comes before decoding. Each case asserts the status, the response's
size, the server's memory growth and that a normal request is answered right after."""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.api import pipeline
from service.config import Settings
from service.imaging import limits as limits_module
from tests.api.test_hostile import assert_error
from tests.engine.fakes import Script
from tests.engine.test_http import hold_worker, predict, serving
from tests.imaging import hostile, samples

MB = 1024 * 1024
GROWTH_BOUND = 200 * MB  # generous: the same attacks cost 420 MB to 9 GB before
ERROR_BODY_BOUND = 2048


def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


def measured(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, int]:
    """The response and the peak growth of the process's resident memory while it was made
    (the server runs in this process under TestClient)."""
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    before = rss_bytes("VmRSS")
    response = call()
    return response, rss_bytes("VmHWM") - before


def assert_still_serving(client: TestClient, cat_png: bytes) -> None:
    response = client.post("/explain", files={"file": ("chelsea.png", cat_png)})
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["predictions"][0]["class_idx"] == 285
    assert client.get("/healthz").status_code == 200


def post(client: TestClient, files: list[tuple[str, bytes]], **form: str) -> httpx.Response:
    return client.post("/explain", files=[("file", f) for f in files], data=form)


CASES = {
    "jpeg declaring 7000x7000": (
        [("big.jpg", hostile.jpeg_declaring())], 415, "unsupported_media", "truncated"),
    "sixteen of them": (
        [(f"big{i}.jpg", hostile.jpeg_declaring()) for i in range(16)], 415, "unsupported_media",
        "big0.jpg"),
    "gif with a 7000x7000 screen": (
        [("screen.gif", hostile.gif_screen())], 413, "payload_too_large", "MB decoded"),
    "16-bit png at 7000x7000": (
        [("deep.png", hostile.png16())], 413, "payload_too_large", "7000x7000"),
    "tiff of 100,000 pages": (
        [("pages.tif", samples.tiff_pages(100_000))], 413, "payload_too_large", "at least 65 frames"),
}


@pytest.mark.parametrize("case", CASES)
def test_hostile_files_are_refused_from_their_headers(
    client: TestClient, cat_png: bytes, case: str
) -> None:
    files, status, code, fragment = CASES[case]
    assert sum(len(data) for _, data in files) < 12 * MB
    response, growth = measured(lambda: post(client, files))
    assert_error(response, status, code, fragment)
    assert len(response.content) < ERROR_BODY_BOUND
    assert growth < GROWTH_BOUND, f"{growth / MB:.0f} MB"
    assert_still_serving(client, cat_png)


def send_to(client: TestClient, route: str, data: bytes) -> httpx.Response:
    if route.startswith("/v1/"):  # KServe V1: base64 instances in JSON
        body = {"instances": [{"image": {"b64": base64.b64encode(data).decode()}}]}
        return client.post(route, json=body)
    return client.post(route, files={"file": ("x", data)})


@pytest.mark.parametrize("route", ["/predict", "/v1/models/mobilenet_v2:predict",
                                   "/v1/models/mobilenet_v2:explain"])
def test_every_route_that_decodes_refuses_them(client: TestClient, cat_png: bytes, route: str) -> None:
    for data, status in ((hostile.jpeg_declaring(), 415), (hostile.png16(), 413)):
        response, growth = measured(partial(send_to, client, route, data))
        assert response.status_code == status, response.text
        assert growth < GROWTH_BOUND, f"{growth / MB:.0f} MB"
    assert_still_serving(client, cat_png)


def test_a_truncated_file_and_a_normal_one_together_are_refused_as_one(
    client: TestClient, cat_png: bytes
) -> None:
    response = post(client, [("ok.png", cat_png), ("big.jpg", hostile.jpeg_declaring())])
    assert_error(response, 415, "unsupported_media", "big.jpg", "send the whole file")


# Responses within a budget ----------------------------------------------------------------

@pytest.fixture(scope="module")
def photo_7000() -> bytes:
    """A complete 7000x7000 JPEG (a flat picture: under a megabyte)."""
    return samples.save(Image.new("RGB", (7000, 7000), (120, 90, 60)), "JPEG", quality=70)


def test_an_original_size_mask_of_a_7000x7000_photo_is_capped_and_says_so(
    client: TestClient, cat_png: bytes, photo_7000: bytes
) -> None:
    response, growth = measured(lambda: post(
        client, [("photo.jpg", photo_7000)], outputs="mask", mask_size="original"))
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert (result["image"]["width"], result["image"]["height"]) == (7000, 7000)
    mask = result["explanations"][0]["mask"]
    assert mask["shape"] == [1024, 1024]
    assert mask["scale"] == pytest.approx(1024 / 7000, abs=1e-6)
    assert len(response.content) < 30 * MB  # 534 MB before
    assert growth < GROWTH_BOUND, f"{growth / MB:.0f} MB"
    assert_still_serving(client, cat_png)


def test_an_input_size_mask_states_no_scale(client: TestClient, cat_png: bytes) -> None:
    response = post(client, [("cat.png", cat_png)], outputs="mask")
    assert response.json()["results"][0]["explanations"][0]["mask"]["scale"] is None


def test_a_response_estimated_over_the_limit_is_413_before_any_work(
    client: TestClient, cat_png: bytes, photo_7000: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    submitted: list[int] = []
    engine = client.app.state.engine  # type: ignore[attr-defined]
    real_submit = engine.submit

    async def counting_submit(items: Any, *args: Any, **kwargs: Any) -> Any:
        submitted.append(len(items))
        return await real_submit(items, *args, **kwargs)

    monkeypatch.setattr(engine, "submit", counting_submit)
    files = [("a.jpg", photo_7000), ("b.jpg", photo_7000)]
    classes = "1,2,3,4,5,6,7,8"
    response, growth = measured(lambda: post(
        client, files, outputs="mask,overlay", mask_size="original", class_idx=classes))
    limit = Settings().max_response_mb
    assert_error(response, 413, "payload_too_large", "the response would be up to",
                 f"over the limit of {limit:.1f} MB", "16 maps", "mask_encoding=base64",
                 "mask_size=input", "fewer images, classes or methods")
    assert len(response.content) < ERROR_BODY_BOUND
    assert growth < GROWTH_BOUND, f"{growth / MB:.0f} MB"
    assert submitted == []  # refused before anything was queued
    # What the message advises fits.
    smaller = post(client, files, outputs="mask", mask_encoding="base64", class_idx=classes)
    assert smaller.status_code == 200, smaller.text
    assert submitted == [2]
    assert [len(r["explanations"]) for r in smaller.json()["results"]] == [8, 8]
    assert_still_serving(client, cat_png)


# Decoding: its deadline, its pool ---------------------------------------------------------

def test_a_deadline_that_passes_while_decoding_is_504(
    client: TestClient, cat_png: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits_module, "monotonic", lambda: float("inf"))  # every deadline past
    response = post(client, [("slow.gif", samples.animated("GIF", 3))])
    assert_error(response, 504, "deadline_exceeded", "while decoding", "slow.gif")
    monkeypatch.undo()
    assert_still_serving(client, cat_png)


def test_decoding_runs_on_its_own_bounded_pool(
    client: TestClient, cat_png: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[str] = []
    real = pipeline.iter_frames

    def recording(*args: Any, **kwargs: Any) -> Iterator[Any]:
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "iter_frames", recording)
    assert_still_serving(client, cat_png)
    assert len(threads) == 1 and threads[0].startswith("camserve-decode")
    pool = pipeline._decode_pool(Settings().decode_threads or pipeline._cores())
    assert pool._max_workers == pipeline._cores()


def test_a_request_decodes_in_one_trip_and_renders_in_one_other(
    client: TestClient, cat_png: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three files: one hand-over to the decode pool for all of them, then rendering and
    serialising together on one render-pool thread (each hand-over costs the loop and the
    threads CPU on every request)."""
    trips: list[str] = []
    stages: list[tuple[str, str]] = []
    real_decode, real_render, real_serialize = (
        pipeline._decode_all, pipeline._render_explain, pipeline._serialize)

    def decode(*args: Any) -> Any:
        trips.append(threading.current_thread().name)
        return real_decode(*args)

    def render(*args: Any) -> Any:
        stages.append(("render", threading.current_thread().name))
        return real_render(*args)

    def serialize(*args: Any) -> Any:
        stages.append(("json", threading.current_thread().name))
        return real_serialize(*args)

    monkeypatch.setattr(pipeline, "_decode_all", decode)
    monkeypatch.setattr(pipeline, "_render_explain", render)
    monkeypatch.setattr(pipeline, "_serialize", serialize)
    response = post(client, [("a.png", cat_png), ("b.png", cat_png), ("c.png", cat_png)])
    assert response.status_code == 200, response.text
    assert [r["image"]["index"] for r in response.json()["results"]] == [0, 1, 2]
    assert len(trips) == 1 and trips[0].startswith("camserve-decode")
    assert [kind for kind, _ in stages] == ["render", "json"]
    assert stages[0][1] == stages[1][1] and stages[0][1].startswith("camserve-render")


# Admission before decoding (fake workers) --------------------------------------------------

@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the files decoding started on, in order."""
    names: list[str] = []
    real = pipeline.iter_frames

    def recording(data: bytes, limits: Any, filename: str = "", *rest: Any) -> Iterator[Any]:
        names.append(filename)
        return real(data, limits, filename, *rest)

    monkeypatch.setattr(pipeline, "iter_frames", recording)
    return names


def test_a_full_queue_answers_503_before_paying_for_the_decode(decoded: list[str]) -> None:
    script = Script()
    pages = samples.tiff_pages(100_000)  # would be a 413 after its decode
    with serving(script, max_queue=1) as (app, client), ThreadPoolExecutor(2) as pool:
        blocker = hold_worker(app, client, script, pool)  # in the worker
        queued = pool.submit(predict, client, 7)  # the queue's one place
        script.wait(lambda: app.state.engine.queue_depth == 1, "the queue filled")
        decoded.clear()
        for route in ("/predict", "/explain"):
            response = client.post(route, files={"file": ("pages.tif", pages)})
            assert_error(response, 503, "queue_full", "queue is full")
            assert int(response.headers["Retry-After"]) >= 1
        assert decoded == []
        script.gate.set()
        assert blocker.result().status_code == 200
        assert queued.result().status_code == 200
        assert predict(client, 9).json()["results"][0]["predictions"][0]["class_idx"] == 9


def test_a_draining_service_answers_503_before_paying_for_the_decode(decoded: list[str]) -> None:
    with serving(Script()) as (app, client):
        assert predict(client, 3).status_code == 200
        assert decoded == ["x.png"]
        assert client.portal.call(app.state.engine.drain, 1.0) is True
        response = client.post("/explain", files={"file": ("pages.tif", samples.tiff_pages(100_000))})
        assert_error(response, 503, "unavailable", "draining")
        assert decoded == ["x.png"]


def test_files_declaring_more_than_the_request_budget_are_refused_before_any_decode(
    client: TestClient, cat_png: bytes
) -> None:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (5700, 5700), (90, 120, 30)).save(buffer, "PNG")  # ~100 KB, 97 MB decoded
    big = buffer.getvalue()
    response, grown = measured(lambda: post(client, [(f"p{i}.png", big) for i in range(16)]))
    assert_error(response, 413, "payload_too_large")
    assert "declare" in response.json()["error"]["message"]
    assert grown < 100 * 2**20, f"the server grew by {grown / 2**20:.0f} MB before refusing"
    assert_still_serving(client, cat_png)
