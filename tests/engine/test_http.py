"""The engine behind HTTP, on fake workers: backpressure, fault isolation, readiness, metrics
and logs as a client and an operator see them."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service.api import pipeline
from service.logs import JsonFormatter
from service.main import create_app
from tests.engine.fakes import Script, settings
from tests.holding import held


def png(tag: int) -> bytes:
    """A solid image whose pixels (hence the fake's answer) all equal ``tag``."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 48, 3), tag, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def predict(client: TestClient, tag: int, **headers: str) -> httpx.Response:
    return client.post("/predict", files={"file": ("x.png", png(tag), "image/png")},
                       data={"topk": "1"}, headers=headers)


@pytest.fixture
def script() -> Script:
    return Script()


@contextmanager
def serving(script: Script, **overrides: object) -> Iterator[tuple[FastAPI, TestClient]]:
    app = create_app(settings(**overrides), worker_factory=script.factory)
    with TestClient(app) as client:
        client.portal.call(app.state.engine.wait_ready)
        assert app.state.engine.state == "ready", app.state.engine.failure
        try:
            yield app, client
        finally:
            script.gate.set()


def hold_worker(app: FastAPI, client: TestClient, script: Script, pool: ThreadPoolExecutor) -> Future:
    script.gate.clear()
    before = len(script.batches)
    blocker = pool.submit(predict, client, 200)
    script.wait(lambda: len(script.batches) > before, "the worker took the blocking request")
    return blocker


def test_a_flood_against_a_tiny_queue_gets_only_200s_and_503s_and_the_service_recovers(
    script: Script,
) -> None:
    flood = 16
    with serving(script, max_queue=3) as (app, client):
        engine = app.state.engine
        with ThreadPoolExecutor(flood + 1) as pool:
            blocker = hold_worker(app, client, script, pool)
            answers = [pool.submit(predict, client, tag) for tag in range(flood)]
            script.wait(lambda: sum(a.done() for a in answers) == flood - 3, "the refusals came back")
            assert engine.queue_depth == 3
            script.gate.set()
            responses = [blocker.result(), *(a.result() for a in answers)]
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200] * 4 + [503] * (flood - 3)
        for refused in (r for r in responses if r.status_code == 503):
            assert refused.json()["error"]["code"] == "queue_full"
            assert int(refused.headers["Retry-After"]) >= 1
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200
        assert predict(client, 5).json()["results"][0]["predictions"][0]["class_idx"] == 5


def test_a_poisoned_image_gets_500_with_its_request_id_and_its_neighbours_200(script: Script) -> None:
    script.poison = {7}
    with serving(script) as (app, client):
        with ThreadPoolExecutor(3) as pool:
            blocker = hold_worker(app, client, script, pool)
            bad = pool.submit(predict, client, 7, **{"X-Request-ID": "poisoned-1"})
            script.wait(lambda: app.state.engine.queue_depth == 1, "the poisoned image is queued")
            good = pool.submit(predict, client, 9)
            script.wait(lambda: app.state.engine.queue_depth == 2, "its neighbour is queued")
            script.gate.set()
            assert blocker.result().status_code == 200
            assert good.result().status_code == 200
            failed = bad.result()
        assert [7, 9] in script.batches  # they shared a batch, then were retried alone
        assert failed.status_code == 500
        assert failed.headers["X-Request-ID"] == "poisoned-1"
        assert failed.json()["error"] == {
            "code": "internal", "request_id": "poisoned-1",
            "message": failed.json()["error"]["message"],
        }
        assert "Traceback" not in failed.text
        assert predict(client, 4).status_code == 200


def test_readyz_turns_200_only_after_warm_up(script: Script) -> None:
    script.warm_gate.clear()
    app = create_app(settings(max_batch_size=4), worker_factory=script.factory)
    with TestClient(app) as client:
        script.wait(lambda: script.built == 1, "the worker was built")
        not_ready = client.get("/readyz")
        assert not_ready.status_code == 503
        assert not_ready.json()["state"] == "starting"
        assert predict(client, 1).status_code == 503  # not "unknown model"
        script.warm_gate.set()
        client.portal.call(app.state.engine.wait_ready)
        assert client.get("/readyz").status_code == 200
        assert script.warmed == [[1, 2, 3, 4]]


def metric(client: TestClient, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    text = client.get("/metrics").text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def test_metrics_are_exposed_and_move(script: Script) -> None:
    with serving(script) as (_app, client):
        latency = "camserve_request_duration_seconds_count"
        labels = {"endpoint": "/predict", "method": "POST", "model": "mobilenet_v2", "status": "200"}
        moving = {
            latency: labels,
            "camserve_batch_size_count": {"model": "mobilenet_v2"},
            "camserve_queue_wait_seconds_count": {"model": "mobilenet_v2"},
            "camserve_compute_seconds_count": {"model": "mobilenet_v2"},
            "camserve_encode_seconds_count": {"endpoint": "/predict"},
            "camserve_errors_total": {"code": "not_found"},
        }
        before = {name: metric(client, name, **wanted) for name, wanted in moving.items()}
        assert predict(client, 3).status_code == 200
        assert client.post("/predict", files={"file": ("x.png", png(3), "image/png")},
                           data={"model": "nope"}).status_code == 404
        for name, wanted in moving.items():
            assert metric(client, name, **wanted) == before[name] + 1, name
        text = client.get("/metrics").text
        for gauge in ("camserve_queue_depth", "camserve_in_flight_images", "camserve_in_flight_requests"):
            assert f"\n{gauge} " in text


def test_two_apps_in_one_process_keep_their_own_metrics(script: Script) -> None:
    with serving(script) as (_first, one), serving(Script()) as (_second, two):
        assert predict(one, 1).status_code == 200
        count = "camserve_batch_size_count"
        assert metric(one, count) == 1
        assert metric(two, count) == 0


def test_logs_are_json_with_request_id_model_batch_and_timings_and_no_image(
    script: Script, caplog: pytest.LogCaptureFixture
) -> None:
    with serving(script) as (_app, client):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            assert predict(client, 6, **{"X-Request-ID": "log-me"}).status_code == 200
        lines = [json.loads(JsonFormatter().format(record)) for record in caplog.records]
        access = next(line for line in lines if line["message"] == "request")
        assert access["request_id"] == "log-me"
        assert access["endpoint"] == "/predict" and access["status"] == 200
        assert access["model"] == "mobilenet_v2" and access["batch_sizes"] == [1]
        assert set(access["timing_ms"]) == {"queue", "compute", "encode", "total"}
        batch = next(line for line in lines if line["message"] == "batch computed")
        assert batch["request_ids"] == ["log-me"] and batch["batch_size"] == 1
        assert batch["model"] == "mobilenet_v2" and "compute_ms" in batch
        for line in lines:  # never image content: every line stays short
            assert len(json.dumps(line)) < 2000


def test_healthz_answers_while_a_response_is_being_serialised(
    script: Script, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JSON serialisation runs on a thread: while it is held, the event loop still answers
    /healthz. Were it on the loop, /healthz would wait, the hold would time out and the
    predict fail."""
    with serving(script) as (_app, client), ThreadPoolExecutor(1) as pool:
        with held(monkeypatch, pipeline, "dumps") as entered:
            pending = pool.submit(predict, client, 7)
            assert entered.wait(20), "the predict never reached serialisation"
            assert client.get("/healthz").status_code == 200
        response = pending.result(20)
    assert response.status_code == 200
    assert response.json()["results"][0]["predictions"][0]["class_idx"] == 7
