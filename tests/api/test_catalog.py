"""/models, /models/{name}, /methods, health, docs and the UI redirect."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient


def test_models_lists_the_embedded_default(client: TestClient) -> None:
    models = client.get("/models").json()["models"]
    default = next(m for m in models if m["name"] == "mobilenet_v2")
    assert default["default"] is True
    assert default["num_classes"] == 1000
    assert default["input_size"] == [224, 224]
    assert default["default_layer"] == "features.18"
    assert default["device"] == "cpu"


def test_model_detail_lists_4d_layers(client: TestClient) -> None:
    detail = client.get("/models/mobilenet_v2").json()
    layers = {layer["name"]: layer for layer in detail["layers"]}
    assert layers["features.18"]["shape"] == [1280, 7, 7]
    assert layers["features.0.0"]["kind"] == "Conv2d"
    assert "classifier" not in layers and "classifier.1" not in layers  # 2-D outputs
    assert all(len(layer["shape"]) == 3 for layer in detail["layers"])


def test_unknown_model_detail_is_404(client: TestClient) -> None:
    response = client.get("/models/nope")
    assert response.status_code == 404
    assert "mobilenet_v2" in response.json()["error"]["message"]


def test_methods_describe_gradcam(client: TestClient) -> None:
    methods = {m["name"]: m for m in client.get("/methods").json()["methods"]}
    gradcam = methods["gradcam"]
    assert gradcam["family"] == "gradient"
    assert gradcam["uses_gradients"] is True
    assert "1610.02391" in gradcam["paper"]


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["state"] == "ready"


def test_docs_and_ui(client: TestClient) -> None:
    assert "swagger-ui" in client.get("/docs").text.lower()
    root = client.get("/", follow_redirects=False)
    assert root.status_code in (302, 307) and root.headers["location"] == "/ui"
    page = client.get("/ui")
    assert page.status_code == 200 and "<html" in page.text.lower()


def test_methods_say_what_they_cost_here(client: TestClient) -> None:
    methods = {m["name"]: m for m in client.get("/methods").json()["methods"]}
    gradcam, scorecam, sscam = (methods[n]["cost"] for n in ("gradcam", "scorecam", "sscam"))
    assert gradcam["heavy"] is False and gradcam["passes"] <= 3
    assert scorecam["heavy"] is True and scorecam["passes"] >= 1280  # a pass per channel of features.18
    assert sscam["passes"] == pytest.approx(35 * (scorecam["passes"] - 2) + 2, rel=0.01)
    assert sscam["seconds"] > scorecam["seconds"] > gradcam["seconds"] > 0
    assert {c["model"] for c in (gradcam, scorecam)} == {"mobilenet_v2"} and gradcam["layer"] == "features.18"
