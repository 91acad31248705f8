"""Metrics with bounded labels: whatever clients send, the scrape stops growing.

Thousands of requests with the CAM methods in every order, unknown methods, random paths and
made-up HTTP methods, in two rounds: the second round (as large again, all new orderings,
paths and verbs) must add no series, and the scrape must stay small. Fake workers, so each
request costs microseconds. /metrics behind the API key is tested here too.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.main import create_app
from tests.engine.fakes import Script, fake_client, settings, tiny_png

METHODS = ["gradcam", "gradcampp", "xgradcam", "layercam", "hirescam", "eigencam"]
ORDERINGS = list(itertools.permutations(METHODS))  # 720
MAX_SCRAPE_BYTES = 64 * 1024


def png() -> bytes:
    return tiny_png(8, 5)


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    yield from fake_client()


def series(text: str) -> int:
    return sum(len(family.samples) for family in text_string_to_metric_families(text))


def odd_round(client: TestClient, orderings: list[tuple[str, ...]], rng: random.Random) -> None:
    image = png()
    for index, ordering in enumerate(orderings):
        methods = list(ordering)
        if index % 3 == 0:  # duplicates and case: the same methods, spelt otherwise
            methods = [m.upper() if i % 2 else m for i, m in enumerate(methods + methods[:2])]
        response = client.post("/explain", files={"file": ("x.png", image, "image/png")},
                               data={"methods": ",".join(methods), "outputs": "mask"})
        assert response.status_code == 200, response.text
        unknown = f"nosuch{rng.getrandbits(64):x}"
        assert client.post("/explain", files={"file": ("x.png", image, "image/png")},
                           data={"methods": f"gradcam,{unknown}"}).status_code == 422
        assert client.get(f"/no/such/{rng.getrandbits(64):x}").status_code == 404
        verb = f"X{rng.getrandbits(32):X}"
        assert client.request(verb, f"/predict/{rng.getrandbits(32):x}").status_code in (404, 405)
        assert client.post(f"/v1/models/m{rng.getrandbits(32):x}:predict", json={}).status_code in (
            404, 400, 422)


def test_thousands_of_odd_requests_leave_the_scrape_small_and_bounded(client: TestClient) -> None:
    rng = random.Random(21)
    orderings = ORDERINGS[:]
    rng.shuffle(orderings)
    client.get("/metrics")  # the scrape's own series
    odd_round(client, orderings[:360], rng)  # 5 requests each: 1,800
    first = client.get("/metrics").text
    odd_round(client, orderings[360:], rng)  # 1,800 more, every value new
    second = client.get("/metrics").text
    assert series(second) == series(first)
    assert len(second.encode()) < MAX_SCRAPE_BYTES, len(second)
    for family in text_string_to_metric_families(second):
        for sample in family.samples:
            assert "nosuch" not in str(sample.labels) and "/no/such" not in str(sample.labels)
            assert "," not in sample.labels.get("cam_method", "")
    per_method = {s.labels["cam_method"]: s.value for f in text_string_to_metric_families(second)
                  for s in f.samples if s.name == "camserve_cam_method_requests_total"
                  and s.labels["status"] == "200"}
    assert per_method == {name: float(len(ORDERINGS)) for name in METHODS}


def test_metrics_behind_the_key_when_asked() -> None:
    app = create_app(settings(api_key="k3y", metrics_require_key=True), worker_factory=Script().factory)
    with TestClient(app) as client:
        refused = client.get("/metrics")
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "unauthorized"
        assert client.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
        allowed = client.get("/metrics", headers={"Authorization": "Bearer k3y"})
        assert allowed.status_code == 200 and "camserve_request_duration_seconds" in allowed.text
        assert client.get("/healthz").status_code == 200


def test_metrics_stay_public_by_default_even_with_a_key() -> None:
    app = create_app(settings(api_key="k3y"), worker_factory=Script().factory)
    with TestClient(app) as client:
        assert client.get("/metrics").status_code == 200
