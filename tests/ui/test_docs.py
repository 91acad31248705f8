"""Swagger UI and ReDoc in real headless Chromium with no network but the service's own.

Every request the page makes to another host is aborted and recorded, so a page that still
needed a CDN would render nothing and fail here, as it would in a hospital network.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, Response, expect

from tests.ui.conftest import VIEWPORT, LiveServer, only_the_service

DATA = Path(__file__).resolve().parents[1] / "data"
CAT = DATA / "chelsea.png"
COFFEE = DATA / "coffee.png"
EXPLAIN = "#operations-inference-explain_explain_post"
PREDICT = "#operations-inference-predict_predict_post"


@pytest.fixture
def offline_page(browser: Browser, live_server: LiveServer) -> Iterator[tuple[Page, list[str]]]:
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.set_default_timeout(60_000)
    elsewhere = only_the_service(page, live_server.url)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page, elsewhere
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def _open_operation(page: Page, operation: str) -> None:
    page.locator(f"{operation} .opblock-summary").click()
    page.locator(f"{operation} .try-out__btn").click()


def _execute_with_files(page: Page, operation: str, path: str, photos: tuple[Path, ...]) -> Response:
    """Try it out: one file picker per photo in the ``file`` field, Execute, and the answer."""
    _open_operation(page, operation)
    row = page.locator(f'{operation} tr[data-property-name="file"]')
    for photo in photos:
        row.get_by_role("button", name="Add string item").click()
        row.locator("input[type=file]").last.set_input_files(str(photo))
    with page.expect_response(lambda r: r.url.endswith(path)) as answer:
        page.locator(f"{operation} .execute").click()
    return answer.value


def _field(page: Page, operation: str, name: str) -> str:
    row = page.locator(f'{operation} tr[data-property-name="{name}"]')
    return str(row.locator("input:not([type=checkbox]), select").first.input_value())


def test_swagger_ui_renders_from_the_service_alone(
    offline_page: tuple[Page, list[str]], live_server: LiveServer
) -> None:
    page, elsewhere = offline_page
    page.goto(f"{live_server.url}/docs")
    expect(page.locator(EXPLAIN)).to_be_visible()
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("camserve")
    expect(page.locator(".btn.authorize")).to_be_visible()  # the API key's Authorize button
    assert elsewhere == []


def test_redoc_renders_from_the_service_alone(
    offline_page: tuple[Page, list[str]], live_server: LiveServer
) -> None:
    page, elsewhere = offline_page
    page.goto(f"{live_server.url}/redoc")
    heading = page.get_by_role("heading", name="Classify images and explain the predictions with CAMs")
    expect(heading.first).to_be_attached()
    expect(page.locator(".api-info h1")).to_contain_text("camserve")
    assert elsewhere == []


def test_try_it_out_starts_from_the_defaults_not_the_examples(
    offline_page: tuple[Page, list[str]], live_server: LiveServer
) -> None:
    page, _ = offline_page
    page.goto(f"{live_server.url}/docs")
    _open_operation(page, EXPLAIN)
    # Fields with a default start from it; fields whose default is "the server decides" start
    # empty, although the schema gives an example for each of them.
    assert _field(page, EXPLAIN, "methods") == "gradcam"
    assert _field(page, EXPLAIN, "topk") == "5"
    assert _field(page, EXPLAIN, "class_idx") == ""
    assert _field(page, EXPLAIN, "target_layer") == ""
    assert _field(page, EXPLAIN, "method_params") == ""
    spec = httpx.get(f"{live_server.url}/openapi.json").json()
    form = spec["components"]["schemas"]["ExplainForm"]["properties"]
    assert form["class_idx"]["examples"] and form["target_layer"]["examples"]  # still documented


def test_try_it_out_explains_two_uploaded_photos(
    offline_page: tuple[Page, list[str]], live_server: LiveServer
) -> None:
    page, elsewhere = offline_page
    page.goto(f"{live_server.url}/docs")
    response = _execute_with_files(page, EXPLAIN, "/explain", (CAT, COFFEE))
    assert response.status == 200, response.text()
    body = json.loads(response.text())
    names = [result["image"]["filename"] for result in body["results"]]
    assert names == [CAT.name, COFFEE.name]
    labels = [result["predictions"][0]["label"] for result in body["results"]]
    assert "cat" in labels[0].lower() and labels[1] != labels[0]  # each photo its own class
    first = body["results"][0]
    assert first["explanations"][0]["class_idx"] == first["predictions"][0]["class_idx"]
    status = page.locator(f"{EXPLAIN} .live-responses-table tbody .response-col_status").first
    expect(status).to_contain_text("200")
    assert elsewhere == []


def test_try_it_out_predicts_an_uploaded_photo(
    offline_page: tuple[Page, list[str]], live_server: LiveServer
) -> None:
    page, _ = offline_page
    page.goto(f"{live_server.url}/docs")
    response = _execute_with_files(page, PREDICT, "/predict", (CAT,))
    assert response.status == 200, response.text()
    assert "cat" in json.loads(response.text())["results"][0]["predictions"][0]["label"].lower()


def test_the_oauth_redirect_page_and_assets_come_from_the_service(live_server: LiveServer) -> None:
    with httpx.Client(base_url=live_server.url) as http:
        redirect = http.get("/docs/oauth2-redirect")
        assert redirect.status_code == 200 and "oauth2" in redirect.text.lower()
        page = http.get("/docs").text
        assert "cdn." not in page and "googleapis" not in page
        assert http.get("/docs/static/swagger-ui-bundle.js").status_code == 200
        assert http.get("/docs/static/../../service/main.py").status_code == 404
        assert http.get("/docs/static/nothing.js").status_code == 404


def test_authorize_sends_the_api_key(browser: Browser, locked_server: LiveServer) -> None:
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.set_default_timeout(60_000)
    try:
        page.goto(f"{locked_server.url}/docs")
        page.locator(".btn.authorize").first.click()
        page.locator(".modal-ux input").first.fill("review-key")
        page.locator(".modal-ux .auth-btn-wrapper button.authorize").click()
        page.locator(".modal-ux .btn-done").click()
        response = _execute_with_files(page, PREDICT, "/predict", (CAT,))
        assert response.status == 200, response.text()
        assert response.request.headers["authorization"] == "Bearer review-key"
    finally:
        context.close()
