"""Hostile and oversized input: a clear 4xx every time, and the service keeps serving."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis import checks

from service.api.errors import install_error_handlers
from service.api.middleware import RequestContextMiddleware
from service.config import Settings
from service.openapi import document
from tests.imaging import samples

LIMIT = 1000  # bytes, for the middleware tests


def assert_error(response: Any, status: int, code: str, *fragments: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["request_id"] == response.headers["X-Request-ID"]
    for fragment in fragments:
        assert fragment in error["message"], error["message"]


# The upload limit, on a bare app: fast, and it shows what reached the handler -------------

@pytest.fixture(scope="module")
def limited() -> tuple[TestClient, list[int]]:
    app = FastAPI()
    install_error_handlers(app)
    seen: list[int] = []

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        body = await request.body()
        seen.append(len(body))
        return {"size": len(body)}

    return TestClient(RequestContextMiddleware(app, max_body_bytes=LIMIT)), seen


def test_a_declared_length_over_the_limit_is_413_unread(limited: tuple[TestClient, list[int]]) -> None:
    client, seen = limited
    seen.clear()
    assert_error(client.post("/echo", content=b"x" * (LIMIT + 1)), 413, "payload_too_large", "limit")
    assert seen == []
    assert client.post("/echo", content=b"x" * LIMIT).json() == {"size": LIMIT}


def test_a_streamed_body_over_the_limit_is_413(limited: tuple[TestClient, list[int]]) -> None:
    client, seen = limited
    seen.clear()

    def chunks() -> Iterator[bytes]:  # no Content-Length: sent chunked
        for _ in range(20):
            yield b"x" * 100

    assert_error(client.post("/echo", content=chunks()), 413, "payload_too_large")
    assert seen == []


def test_a_streamed_body_is_cut_off_at_the_limit_not_read_to_its_end() -> None:
    calls = {"app": 0, "receive": 0}
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        calls["app"] += 1
        while (await receive()).get("more_body"):
            pass

    async def receive() -> dict[str, Any]:
        calls["receive"] += 1
        return {"type": "http.request", "body": b"x" * 100, "more_body": calls["receive"] < 100}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": []}
    asyncio.run(RequestContextMiddleware(app, max_body_bytes=LIMIT)(scope, receive, send))
    assert calls["receive"] == LIMIT // 100 + 1  # 11 of the 100 chunks, then refused
    assert sent[0]["status"] == 413
    assert b"payload_too_large" in sent[1]["body"]


def test_a_declared_length_over_the_limit_never_reaches_the_app() -> None:
    calls = {"app": 0, "receive": 0}
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        calls["app"] += 1

    async def receive() -> dict[str, Any]:
        calls["receive"] += 1
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"content-length", b"999999")]}
    asyncio.run(RequestContextMiddleware(app, max_body_bytes=LIMIT)(scope, receive, send))
    assert calls == {"app": 0, "receive": 0}
    assert sent[0]["status"] == 413


# The real service -------------------------------------------------------------------------

def explain(client: TestClient, *files: tuple[str, bytes]) -> Any:
    return client.post("/explain", files=[("file", f) for f in files])


def test_a_body_over_the_upload_limit_is_413(client: TestClient) -> None:
    limit = Settings().max_upload_bytes
    response = explain(client, ("big.png", b"\x00" * (limit + 1)))
    assert_error(response, 413, "payload_too_large", "MB limit")


def test_an_empty_part_is_400(client: TestClient) -> None:
    assert_error(explain(client, ("empty.png", b"")), 400, "bad_request", "empty.png", "empty")


def test_no_file_part_is_400(client: TestClient) -> None:
    assert_error(client.post("/explain", data={"topk": "3"}), 400, "bad_request", "file")


@pytest.mark.parametrize("name, data", [
    ("notes.png", b"just some text, not an image"),
    ("report.jpg", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj"),
    ("half.png", samples.still("png-rgb")[: len(samples.still("png-rgb")) // 2]),
    ("half.jpg", samples.still("jpeg")[:300]),
    ("cut.gif", samples.animated("GIF", 3)[:100]),
    ("garbage.tif", b"II*\x00" + b"\xff" * 200),
    ("fake.dcm", b"\x00" * 128 + b"DICM" + b"\x01" * 64),
    ("icon.png", samples.save(samples.rgb(), "ICO")),
])
def test_non_images_truncations_and_lies_are_415(client: TestClient, name: str, data: bytes) -> None:
    assert_error(explain(client, (name, data)), 415, "unsupported_media", name)


@pytest.mark.parametrize("data", [
    samples.png_header_only(100_000, 100_000),
    samples.gif_header_only(65_535, 65_535),
    samples.png_bomb(8000, 6500),  # 52 M pixels, valid zlib, about 50 kB on the wire
])
def test_bombs_and_huge_images_are_413(client: TestClient, data: bytes) -> None:
    assert_error(explain(client, ("bomb.png", data)), 413, "payload_too_large", "pixels")


def test_too_many_frames_in_one_file_is_413(client: TestClient) -> None:
    frames = Settings().max_frames + 1
    response = explain(client, ("long.gif", samples.animated("GIF", frames, 2, 2)))
    assert_error(response, 413, "payload_too_large", f"{frames} frames")


def test_too_many_images_in_one_request_is_413(client: TestClient) -> None:
    image = samples.still("png-grey")
    count = Settings().max_images_per_request + 1
    assert_error(explain(client, *[("x.png", image)] * count), 413, "payload_too_large", "at most")


def test_frames_count_towards_the_images_per_request(client: TestClient) -> None:
    count = Settings().max_images_per_request  # one still image plus this many frames: one too many
    gif = samples.animated("GIF", count, 2, 2)
    response = explain(client, ("a.png", samples.still("png-grey")), ("b.gif", gif))
    assert_error(response, 413, "payload_too_large", "split it")


def test_the_service_still_serves_after_hostile_input(client: TestClient) -> None:
    for data in (b"", b"junk", samples.png_header_only(100_000, 100_000)):
        assert explain(client, ("x", data)).status_code in (400, 413, 415)
    response = client.post("/predict", files={"file": ("ok.png", samples.still("png-rgb"))})
    assert response.status_code == 200, response.text
    assert client.get("/healthz").status_code == 200


# Schema-driven fuzzing of every operation ------------------------------------------------

# The document the app generates (what openapi.json holds), built without loading a model.
schema = schemathesis.openapi.from_dict(document())
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
]


def send(client: TestClient, case: schemathesis.Case) -> Any:
    """Send a case through the session's client, whose app is already loaded and serving."""
    kwargs = case.as_transport_kwargs(base_url=str(client.base_url))
    kwargs.pop("cookies", None)
    files = kwargs.pop("files", None)
    if files:
        # Form fields come as (None, value) with values of any JSON type; httpx wants text.
        kwargs["files"] = [
            (name, (part[0], part[1] if isinstance(part[1], str | bytes) else json.dumps(part[1]),
                    *part[2:]))
            for name, part in files
        ]
    data = kwargs.pop("data", None)
    if isinstance(data, str | bytes):
        kwargs["content"] = data
    elif data is not None:
        kwargs["data"] = data
    response = client.request(**kwargs)
    response.request.read()  # schemathesis reads the sent body back when it reports a failure
    return response


@schema.parametrize()
@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_operation_answers_5xx_or_breaks_its_schema(client: TestClient, case: schemathesis.Case) -> None:
    response = send(client, case)
    case.validate_response(response, checks=CHECKS)
