"""Jobs over HTTP with the real model: lifecycle, events, cancel, expiry, bounds, shutdown."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.api.jobstore import JobStore
from service.config import Settings
from service.engine.jobs import WorkItem
from service.main import create_app
from tests import sse
from tests.conftest import ready_client

TOP_K = json.dumps({"scorecam": {"top_k_channels": 128}})


def files(image: bytes) -> dict[str, tuple[str, bytes, str]]:
    return {"file": ("cat.png", image, "image/png")}


def events(client: TestClient, job_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """The job's server-sent events as (event, data), until the stream closes."""
    with client.stream("GET", f"/jobs/{job_id}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        yield from sse.events(response.iter_lines())


def test_a_job_runs_with_progress_and_answers_what_explain_answers(
    client: TestClient, cat_png: bytes
) -> None:
    submitted = client.post("/jobs", files=files(cat_png),
                            data={"methods": "scorecam", "method_params": TOP_K, "outputs": "mask"})
    assert submitted.status_code == 202, submitted.text
    job = submitted.json()
    assert submitted.headers["location"] == f"/jobs/{job['job_id']}"
    assert job["status"] in ("queued", "running") and job["result"] is None
    assert job["progress"]["total"] >= 128

    seen = list(events(client, job["job_id"]))
    names = [name for name, _ in seen]
    assert names[-1] == "done" and names.count("done") == 1 and "progress" in names
    done_values = [data["done"] for name, data in seen if name == "progress"]
    assert done_values == sorted(done_values) and len(set(done_values)) > 2  # it advanced, in steps
    final = seen[-1][1]
    assert final["status"] == "succeeded"
    assert final["progress"]["done"] == final["progress"]["total"] and final["eta_s"] == 0.0
    assert final["started_at"] and final["finished_at"]

    again = client.get(f"/jobs/{job['job_id']}").json()
    direct = client.post("/explain", files=files(cat_png), headers={"X-Request-Timeout": "120"},
                         data={"methods": "scorecam", "method_params": TOP_K, "outputs": "mask"}).json()
    job_mask = np.array(again["result"]["results"][0]["explanations"][0]["mask"]["data"])
    direct_mask = np.array(direct["results"][0]["explanations"][0]["mask"]["data"])
    np.testing.assert_allclose(job_mask, direct_mask, atol=1e-4)
    assert again["result"]["results"][0]["predictions"] == direct["results"][0]["predictions"]


def test_cancelling_a_running_score_cam_frees_the_worker(client: TestClient, app: FastAPI,
                                                          cat_png: bytes) -> None:
    submitted = client.post("/jobs", files=files(cat_png), data={"methods": "scorecam"}).json()
    for name, data in events(client, submitted["job_id"]):
        if name == "progress" and data["done"] > 0:
            break
    cancelled = client.delete(f"/jobs/{submitted['job_id']}")
    assert cancelled.status_code == 200
    body = cancelled.json()
    assert body["status"] == "cancelled" and body["error"]["code"] == "cancelled"
    engine = app.state.engine
    deadline = time.monotonic() + 30
    while engine.in_flight and time.monotonic() < deadline:  # its current chunk ends, no more
        time.sleep(0.01)
    assert engine.in_flight == 0
    stopped = client.get(f"/jobs/{submitted['job_id']}").json()
    assert stopped["progress"]["done"] < stopped["progress"]["total"]
    light = client.post("/explain", files=files(cat_png), data={"outputs": "mask"})
    assert light.status_code == 200
    # Deleting a finished job answers its final state.
    assert client.delete(f"/jobs/{submitted['job_id']}").json()["status"] == "cancelled"


def test_unknown_jobs_are_404_and_bad_requests_are_refused_at_once(
    client: TestClient, cat_png: bytes
) -> None:
    for response in (client.get("/jobs/nope"), client.get("/jobs/nope/events"), client.delete("/jobs/nope")):
        assert response.status_code == 404
        assert "nope" in response.json()["error"]["message"]
    refused = client.post("/jobs", files=files(cat_png), data={"methods": "nosuchcam"})
    assert refused.status_code == 422
    bad = client.post("/jobs", files=files(b"not an image"), data={"methods": "scorecam"})
    assert bad.status_code == 415


def test_jobs_over_the_pass_budget_are_refused(cat_png: bytes) -> None:
    app = create_app(Settings(warmup=False, max_request_passes=500))
    for client in ready_client(app):
        refused = client.post("/jobs", files=files(cat_png), data={"methods": "scorecam"})
        assert refused.status_code == 422
        assert "at most 500" in refused.json()["error"]["message"]


def _item() -> WorkItem:
    return WorkItem(model="m", pixels=np.zeros((1, 1, 3), np.uint8), topk=1, explain=None,
                    deadline=time.monotonic() + 60, future=asyncio.get_running_loop().create_future(),
                    passes=10)


def test_the_store_is_bounded_and_finished_jobs_expire() -> None:
    async def scenario() -> None:
        store = JobStore(Settings(max_jobs=2, job_ttl_s=60))
        release = asyncio.Event()

        async def run(_items: object) -> bytes:
            await release.wait()
            return b'{"ok": true}'

        first = store.create([_item()], ("scorecam",), "r1", run)
        store.create([_item()], ("scorecam",), "r2", run)
        with pytest.raises(Exception) as full:
            store.create([_item()], ("scorecam",), "r3", run)
        assert getattr(full.value, "status_code", None) == 503
        assert "Retry-After" in getattr(full.value, "headers", {})
        release.set()
        await asyncio.gather(*(store.get(j).task for j in (first.job_id,)))  # type: ignore[misc]
        await asyncio.sleep(0)
        assert store.get(first.job_id).status == "succeeded"
        assert json.loads(store.get(first.job_id).dumps())["result"] == {"ok": True}
        # A finished job past its TTL is gone, and its place is free again.
        first.finished_at = time.time() - 61
        with pytest.raises(Exception) as gone:
            store.get(first.job_id)
        assert getattr(gone.value, "status_code", None) == 404
        third = store.create([_item()], ("scorecam",), "r3", run)
        await asyncio.gather(third.task)  # type: ignore[arg-type]
        await store.close()

    asyncio.run(scenario())


def test_shutdown_cancels_what_the_drain_did_not_finish(cat_png: bytes) -> None:
    app = create_app(Settings(warmup=False, drain_timeout_s=0.2))
    for client in ready_client(app):
        job = client.post("/jobs", files=files(cat_png), data={"methods": "scorecam"}).json()
        for name, data in events(client, job["job_id"]):
            if name == "progress" and data["done"] > 0:
                break
    # The client's context has closed: the app shut down with the job still running.
    final = app.state.jobs.get(job["job_id"])
    assert final.status == "cancelled"
    assert final.error is not None and final.error["code"] == "shutdown"


def test_jobs_need_the_api_key_when_one_is_set(cat_png: bytes) -> None:
    app = create_app(Settings(warmup=False, api_key="secret"))
    with TestClient(app) as client:
        assert client.post("/jobs", files=files(cat_png)).status_code == 401
        assert client.get("/jobs/x").status_code == 401
        assert client.delete("/jobs/x").status_code == 401


def test_a_full_heavy_lane_refuses_a_job_at_once(cat_png: bytes) -> None:
    app = create_app(Settings(warmup=False, max_queued_passes=2000))
    for client in ready_client(app):
        first = client.post("/jobs", files=files(cat_png), data={"methods": "scorecam"})
        assert first.status_code == 202  # 1,282 passes of the 2,000 the heavy lane holds
        second = client.post("/jobs", files=files(cat_png), data={"methods": "scorecam"})
        assert second.status_code == 503 and "Retry-After" in second.headers
        assert second.json()["error"]["code"] == "queue_full"
        assert len(app.state.jobs.counts()) and app.state.jobs.counts()["failed"] == 0  # none made
        client.delete(f"/jobs/{first.json()['job_id']}")


def _jobs_gauge(client: TestClient, status: str) -> float:
    text = client.get("/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "camserve_jobs" and s.labels.get("status") == status)


def test_the_jobs_gauge_counts_the_jobs_held_when_scraped(client: TestClient, app: FastAPI,
                                                          cat_png: bytes) -> None:
    # It was set only when a job finished: a running job never showed, an expired one stayed.
    submitted = client.post("/jobs", files=files(cat_png), data={"methods": "scorecam"}).json()
    for name, data in events(client, submitted["job_id"]):
        if name == "progress" and data["done"] > 0:
            break
    running = app.state.jobs.counts()["running"]
    assert running >= 1 and _jobs_gauge(client, "running") == running
    cancelled_before = app.state.jobs.counts()["cancelled"]
    assert client.delete(f"/jobs/{submitted['job_id']}").json()["status"] == "cancelled"
    assert _jobs_gauge(client, "running") == running - 1
    assert _jobs_gauge(client, "cancelled") == cancelled_before + 1


def test_a_long_unknown_job_id_is_not_echoed_whole(client: TestClient) -> None:
    job_id = "a" * 5000
    for response in (client.get(f"/jobs/{job_id}"), client.delete(f"/jobs/{job_id}"),
                     client.get(f"/jobs/{job_id}/events")):
        assert response.status_code == 404
        message = response.json()["error"]["message"]
        assert "aaaa" in message and len(message) < 200
