"""API key, CORS and the limits, on an app built with those settings changed."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app
from tests.conftest import ready_client
from tests.imaging import samples

KEY = "k3y-with-enough-entropy-0123456789"
ORIGIN = "https://review.example.org"


@pytest.fixture(scope="module")
def guarded() -> Iterator[TestClient]:
    settings = Settings(api_key=KEY, cors_origins=f"{ORIGIN}, https://other.example.org",
                        max_upload_mb=1, max_frames=2, max_image_pixels=5000,
                        max_images_per_request=3, warmup=False)
    yield from ready_client(create_app(settings))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def image() -> dict[str, tuple[str, bytes]]:
    return {"file": ("x.png", samples.still("png-rgb"))}


PROTECTED = [("GET", "/models"), ("GET", "/models/mobilenet_v2"), ("GET", "/methods"),
             ("POST", "/predict"), ("POST", "/explain"), ("GET", "/v1/models"),
             ("GET", "/v1/models/mobilenet_v2"), ("POST", "/v1/models/mobilenet_v2:predict"),
             ("POST", "/v1/models/mobilenet_v2:explain")]


def call(client: TestClient, method: str, path: str, headers: dict[str, str]) -> Any:
    if path.startswith("/v1/") and method == "POST":
        payload = {"instances": [{"image": {"b64": base64.b64encode(samples.still("png-rgb")).decode()}}],
                   "parameters": {"outputs": "mask"} if path.endswith(":explain") else None}
        return client.post(path, headers=headers, json=payload)
    files = image() if method == "POST" else None
    data = {"outputs": "mask"} if path == "/explain" else None
    return client.request(method, path, headers=headers, files=files, data=data)


@pytest.mark.parametrize("method, path", PROTECTED)
@pytest.mark.parametrize("headers", [
    {}, bearer("wrong"), bearer(KEY + "x"), bearer(KEY[:-1]), {"Authorization": f"Basic {KEY}"},
    {"Authorization": KEY},
])
def test_without_the_right_key_it_is_401(
    guarded: TestClient, method: str, path: str, headers: dict[str, str]
) -> None:
    response = call(guarded, method, path, headers)
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"] == "Bearer"
    error = response.json()["error"]
    assert error["code"] == "unauthorized" and "Bearer" in error["message"]
    assert KEY not in response.text


@pytest.mark.parametrize("method, path", PROTECTED)
def test_with_the_key_it_answers(guarded: TestClient, method: str, path: str) -> None:
    response = call(guarded, method, path, bearer(KEY))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"])
def test_health_docs_and_metrics_need_no_key(guarded: TestClient, path: str) -> None:
    assert guarded.get(path).status_code == 200


def test_without_a_configured_key_nothing_is_asked(client: TestClient) -> None:
    assert client.get("/models").status_code == 200


def test_a_file_path_in_place_of_a_file_is_not_read(guarded: TestClient) -> None:
    response = guarded.post("/predict", headers=bearer(KEY), data={"file": "/etc/hostname"})
    assert response.status_code in (400, 422), response.text
    assert "hostname" not in response.json()["error"]["message"].replace("/etc/hostname", "")


# CORS ------------------------------------------------------------------------------------

def preflight(client: TestClient, origin: str, method: str = "POST") -> object:
    return client.options("/explain", headers={
        "Origin": origin, "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization, content-type",
    })


def test_a_listed_origin_passes_preflight(guarded: TestClient) -> None:
    response = preflight(guarded, ORIGIN)
    assert response.status_code == 200  # type: ignore[attr-defined]
    headers = response.headers  # type: ignore[attr-defined]
    assert headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert "authorization" in headers["Access-Control-Allow-Headers"].lower()


@pytest.mark.parametrize("origin", ["https://evil.example.com", "https://review.example.org.evil.com",
                                    "http://review.example.org", "null"])
def test_an_unlisted_origin_is_not_granted(guarded: TestClient, origin: str) -> None:
    response = preflight(guarded, origin)
    assert response.status_code == 400  # type: ignore[attr-defined]
    assert "Access-Control-Allow-Origin" not in response.headers  # type: ignore[attr-defined]
    simple = guarded.get("/models", headers={"Origin": origin, **bearer(KEY)})
    assert "Access-Control-Allow-Origin" not in simple.headers


def test_a_listed_origin_gets_simple_responses_and_their_request_id(guarded: TestClient) -> None:
    response = guarded.get("/models", headers={"Origin": ORIGIN, **bearer(KEY)})
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    exposed = response.headers["Access-Control-Expose-Headers"].lower()
    assert "x-request-id" in exposed and "server-timing" in exposed
    refused = guarded.get("/models", headers={"Origin": ORIGIN})  # the browser can read the 401
    assert refused.status_code == 401
    assert refused.headers["Access-Control-Allow-Origin"] == ORIGIN


def test_a_browser_can_read_the_upload_limit_refusal(guarded: TestClient) -> None:
    headers = {"Origin": ORIGIN, **bearer(KEY)}
    response = guarded.post("/explain", headers=headers, files={"file": ("big.png", b"\x00" * 2_000_000)})
    assert response.status_code == 413
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert response.json()["error"]["code"] == "payload_too_large"


def test_the_second_listed_origin_is_granted_too(guarded: TestClient) -> None:
    response = guarded.get("/healthz", headers={"Origin": "https://other.example.org"})
    assert response.headers["Access-Control-Allow-Origin"] == "https://other.example.org"


def test_without_configured_origins_no_origin_is_granted(client: TestClient) -> None:
    response = client.get("/models", headers={"Origin": ORIGIN})
    assert "Access-Control-Allow-Origin" not in response.headers
    assert "Access-Control-Allow-Origin" not in preflight(client, ORIGIN).headers  # type: ignore[attr-defined]


# Limits set lower than their defaults ----------------------------------------------------

def post_files(client: TestClient, *files: tuple[str, bytes]) -> Any:
    return client.post("/predict", headers=bearer(KEY), files=[("file", f) for f in files])


def test_max_frames_bounds_each_file(guarded: TestClient) -> None:
    assert post_files(guarded, ("two.gif", samples.animated("GIF", 2, 8, 8))).status_code == 200
    response = post_files(guarded, ("three.gif", samples.animated("GIF", 3, 8, 8)))
    assert response.status_code == 413
    assert "at most 2" in response.json()["error"]["message"]


def test_max_image_pixels_bounds_each_frame(guarded: TestClient) -> None:
    def png(width: int, height: int) -> bytes:
        return samples.save(samples.rgb().resize((width, height)), "PNG")

    assert post_files(guarded, ("ok.png", png(100, 50))).status_code == 200
    response = post_files(guarded, ("big.png", png(100, 51)))
    assert response.status_code == 413
    assert "5100 pixels" in response.json()["error"]["message"]


def test_max_images_per_request_counts_frames(guarded: TestClient) -> None:
    still = ("s.png", samples.still("png-grey"))
    assert post_files(guarded, still, still, still).status_code == 200
    assert post_files(guarded, still, still, still, still).status_code == 413
    assert post_files(guarded, still, still, ("two.gif", samples.animated("GIF", 2, 8, 8))).status_code == 413
    kserve = {"instances": [{"image": {"b64": base64.b64encode(still[1]).decode()}}] * 4}
    response = guarded.post("/v1/models/mobilenet_v2:predict", headers=bearer(KEY), json=kserve)
    assert response.status_code == 413
