"""The review page as a reviewer who must trust it uses it (issue 20), and its jobs (issue 16):
a CT slice blended in the browser with its window shown and changed, the colour bar, the
out-of-domain warning, the report, stale results marked, colour maps changed without a request,
the page's blend equal to the API's overlay_png, and slow methods as jobs with progress and
Cancel. Every request to another host is aborted and recorded: the page must need none."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Page, Route, expect
from pydicom.data import get_testdata_file

from tests.ui.conftest import LiveServer, only_the_service
from tests.ui.test_review_page import CAT, canvas_stats, open_page, run, upload

CT = Path(str(get_testdata_file("CT_small.dcm")))


@pytest.fixture
def offline(page: Page, live_server: LiveServer) -> Iterator[Page]:
    elsewhere = only_the_service(page, live_server.url)
    yield page
    assert elsewhere == [], f"the page asked other hosts: {elsewhere}"


def saved(download: Any, folder: Path) -> Path:
    path = folder / download.suggested_filename
    download.save_as(path)
    return path


def panel_button(page: Page, text: str, index: int = 0) -> Any:
    return page.locator(".panel:not(.original)").nth(index).locator("button", has_text=text)


def test_ct_slice_is_blendable_windowed_scaled_and_warned_about(
    offline: Page, live_server: LiveServer, tmp_path: Path
) -> None:
    page = offline
    open_page(page, live_server)
    response = upload(page, CT)
    result = response.json()["results"][0]
    assert result["image"]["modality"] == "CT" and result["image_png"]

    # The warning: a CT on a model trained on photographs.
    warning = page.locator("#warnings")
    expect(warning).to_be_visible()
    expect(warning).to_contain_text("CT input: this model (mobilenet_v2) was trained on natural photographs")
    # The scale: a colour bar of the chosen map, its ends, and how every map is scaled.
    legend = page.locator("#legend")
    expect(legend).to_be_visible()
    expect(legend).to_contain_text("0 · lowest value")
    expect(legend).to_contain_text("1 · highest value")
    expect(page.locator("#legend-note")).to_contain_text("scaled to its own minimum (0) and maximum (1)")
    bar = page.locator("#colorbar").evaluate(
        "(c) => Array.from(c.getContext('2d').getImageData(0, 0, 256, 1).data)")
    assert bar[0:3] != bar[-4:-1]  # jet: blue at 0, red at 1
    # The window used, in Hounsfield units.
    expect(page.locator("#window-info")).to_contain_text("HU")
    expect(page.locator("#window-info")).to_contain_text("full range")

    # The slider re-blends the slice in the browser.
    canvas = page.locator(".panel canvas").first
    page.fill("#opacity", "0")
    expect(canvas).to_have_attribute("data-opacity", "0")
    bare = canvas_stats(page)
    page.fill("#opacity", "100")
    expect(canvas).to_have_attribute("data-opacity", "1")
    assert canvas_stats(page)["hash"] != bare["hash"]

    # The original beside the map: the slice alone, as the service displayed it.
    page.check("#show-original")
    expect(page.locator(".panel.original canvas")).to_have_attribute("data-opacity", "original")
    page.uncheck("#show-original")

    # A lung window: a new request with window=-600,1500, and a different picture.
    page.fill("#opacity", "0")
    expect(canvas).to_have_attribute("data-opacity", "0")
    lung = run(page, lambda: page.select_option("#window-preset", "-600,1500"))
    assert lung.json()["results"][0]["image"]["window"] == {
        "centre": -600.0, "width": 1500.0, "source": "request"}
    expect(page.locator("#window-info")).to_contain_text("centre -600 HU, width 1500 HU (as chosen)")
    lung_stats = canvas_stats(page)
    assert lung_stats["hash"] != bare["hash"]
    bone = run(page, lambda: page.select_option("#window-preset", "400,1800"))
    assert bone.json()["results"][0]["image"]["window"]["centre"] == 400.0
    assert canvas_stats(page)["hash"] != lung_stats["hash"]
    # A custom window.
    page.select_option("#window-preset", "custom")
    page.fill("#window-centre", "50")
    page.fill("#window-width", "350")
    custom = run(page, lambda: page.click("#window-apply"))
    assert custom.json()["results"][0]["image"]["window"]["width"] == 350.0
    page.screenshot(path=str(tmp_path / "review-ct.png"), full_page=True)


def test_report_png_and_json_carry_what_the_map_is(
    offline: Page, live_server: LiveServer, tmp_path: Path
) -> None:
    page = offline
    open_page(page, live_server)
    response = upload(page, CT)
    explanation = response.json()["results"][0]["explanations"][0]

    with page.expect_download() as download:
        panel_button(page, "Download report").click()
    report = saved(download.value, tmp_path)
    assert report.name == f"CT_small_gradcam_{explanation['class_idx']}_report.png"
    with Image.open(report) as picture:
        pixels = np.asarray(picture.convert("RGB")).astype(int)
    assert pixels.shape[0] > 128 and pixels.shape[1] > 128
    # The image (enlarged to at least 512 a side), then the margin: colour bar and text on white.
    margin = pixels[512:]
    assert margin.shape[0] > 100
    assert (margin == 255).all(axis=2).mean() > 0.5  # mostly white paper...
    assert (margin != 255).any(axis=2).mean() > 0.02  # ...with the bar and the text drawn on it
    bar_row = margin[16 + 8]
    assert len({tuple(p) for p in bar_row[20:-20]}) > 50  # the colour bar's many colours

    with page.expect_download() as download:
        panel_button(page, "Download JSON").click()
    document = json.loads(saved(download.value, tmp_path).read_text())
    assert document["model"]["name"] == "mobilenet_v2" and document["model"]["version"]
    assert document["explanation"]["method"] == "gradcam"
    assert document["explanation"]["class_idx"] == explanation["class_idx"]
    assert document["explanation"]["target_layer"] == "features.18"
    mask = document["explanation"]["mask"]
    values = np.frombuffer(base64.b64decode(mask["data"]), "<f4").reshape(mask["shape"])
    assert values.shape == (128, 128) and values.min() == 0.0 and values.max() == 1.0
    assert document["warnings"] and document["warnings"][0].startswith("CT input")
    assert document["view"]["colormap"] == "jet"


def test_a_result_is_marked_stale_while_a_new_run_is_in_progress(
    offline: Page, live_server: LiveServer
) -> None:
    page = offline
    open_page(page, live_server)
    upload(page, CAT)
    result = page.locator("#result")
    expect(result).to_have_attribute("data-stale", "false")
    held: list[Route] = []
    page.route("**/explain", lambda route: held.append(route))
    page.fill("#class-idx", "281")
    page.click("#run")
    expect(result).to_have_attribute("data-stale", "true")
    expect(page.locator("#stale-note")).to_contain_text("Outdated")
    expect(page.locator("#stale-note")).to_be_visible()
    expect(page.locator(".panel").first).to_contain_text("Egyptian cat")  # the old maps, marked
    with page.expect_response(lambda r: r.url.endswith("/explain")):
        held[0].continue_()
    expect(result).to_have_attribute("data-stale", "false")
    expect(page.locator("#stale-note")).to_be_hidden()
    expect(page.locator(".panel").first).to_contain_text("tabby")


def test_timeout_message_says_where_the_deadline_passed(offline: Page, live_server: LiveServer) -> None:
    page = offline
    open_page(page, live_server)
    computed = {"error": {"code": "deadline_exceeded", "request_id": "t1", "message":
                "the request's deadline passed while it was computed; raise X-Request-Timeout"}}
    page.route("**/explain", lambda route: route.fulfill(
        status=504, body=json.dumps(computed), content_type="application/json"))
    upload(page, CAT)
    banner = page.locator("#banner")
    expect(banner).to_contain_text("was computing the explanation when its deadline passed")
    expect(banner).not_to_contain_text("fewer images")
    expect(banner).not_to_contain_text("not computed")
    page.unroute("**/explain")
    queued = {"error": {"code": "deadline_exceeded", "request_id": "t2", "message":
              "the request's deadline passed while it was queued"}}
    page.route("**/explain", lambda route: route.fulfill(
        status=504, body=json.dumps(queued), content_type="application/json"))
    run(page, lambda: page.click("#run"))
    expect(banner).to_contain_text("Nothing was computed")
    expect(banner).not_to_contain_text("fewer images")


def test_page_blend_equals_the_api_overlay(offline: Page, live_server: LiveServer, tmp_path: Path) -> None:
    page = offline
    open_page(page, live_server)
    upload(page, CAT)
    page.select_option("#colormap", "viridis")
    page.fill("#opacity", "70")
    for fade, mode in ((True, "fade"), (False, "uniform")):
        page.set_checked("#fade", fade)
        with page.expect_download() as download:
            panel_button(page, "Download overlay").click()
        shown = np.asarray(Image.open(saved(download.value, tmp_path)).convert("RGB")).astype(int)
        answer = httpx.post(
            f"{live_server.url}/explain", files={"file": (CAT.name, CAT.read_bytes())},
            data={"outputs": "overlay", "colormap": "viridis", "alpha": "0.7", "overlay_mode": mode},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        overlay = answer.json()["results"][0]["explanations"][0]["overlay_png"]
        api = np.asarray(Image.open(io.BytesIO(base64.b64decode(overlay))).convert("RGB")).astype(int)
        assert shown.shape == api.shape
        assert np.abs(shown - api).max() <= 2, mode
        (tmp_path / download.value.suggested_filename).unlink()


def _job_status(server: LiveServer, job_id: str) -> dict[str, Any]:
    answer = httpx.get(f"{server.url}/jobs/{job_id}", timeout=30)
    assert answer.status_code == 200, answer.text
    job: dict[str, Any] = answer.json()
    return job


def _tick(page: Page, *methods: str) -> None:
    for box in page.locator("#methods input").all():
        box.set_checked(box.get_attribute("value") in methods)


WATCH_PROGRESS = """() => {
  window.__seen = [];
  new MutationObserver(() => {
    for (const row of document.querySelectorAll("#jobs .job")) {
      window.__seen.push([row.dataset.status, Number(row.dataset.done || 0),
                          Number(row.querySelector("progress").max)]);
    }
  }).observe(document.querySelector("#jobs"), {subtree: true, attributes: true, childList: true});
}"""


def test_score_cam_runs_as_a_job_with_a_progress_bar(offline: Page, live_server: LiveServer) -> None:
    page = offline
    open_page(page, live_server)
    expect(page.locator("#methods label", has_text="Score-CAM").first.locator(".job-tag")).to_be_visible()
    _tick(page, "scorecam")
    page.fill("#method-params", '{"scorecam": {"top_k_channels": 96, "batch_size": 8}}')
    page.evaluate(WATCH_PROGRESS)
    sent: list[str] = []
    page.on("request", lambda request: sent.append(f"{request.method} {request.url}"))
    with page.expect_response(lambda r: r.url.endswith("/jobs") and r.request.method == "POST") as posted:
        page.set_input_files("#file", [CAT])
    assert posted.value.status == 202
    row = page.locator("#jobs .job")
    expect(row).to_have_attribute("data-status", "succeeded", timeout=120_000)
    expect(page.locator("#status")).to_contain_text("Done")
    expect(page.locator(".panel").first).to_have_attribute("data-method", "scorecam")
    assert not any(url.endswith("/explain") for url in sent), sent
    seen = [(d, t) for status, d, t in page.evaluate("window.__seen")
            if status in ("running", "succeeded")]
    done = [d for d, _ in seen]
    assert done == sorted(done), done  # never goes back
    assert any(0 < d < t for d, t in seen), seen  # seen part way, not just at the end
    # The total is an estimate until the job ends; then done equals it.
    final_done, final_total = seen[-1]
    assert final_done == final_total
    expect(row).to_contain_text(f"{final_total} passes")
    job = _job_status(live_server, row.get_attribute("data-job-id") or "")
    assert job["status"] == "succeeded"


def test_fast_methods_appear_while_a_job_runs_and_cancel_stops_it(
    offline: Page, live_server: LiveServer
) -> None:
    page = offline
    open_page(page, live_server)
    _tick(page, "gradcam", "scorecam")  # exact Score-CAM: every channel, long enough to cancel
    page.fill("#method-params", "")
    page.set_input_files("#file", [CAT])
    row = page.locator("#jobs .job")
    # Grad-CAM's panel is on screen while the job is still running.
    expect(page.locator('.panel[data-method="gradcam"]')).to_be_visible()
    expect(row).to_have_attribute("data-status", "running", timeout=60_000)
    expect(page.locator('.panel[data-method="scorecam"]')).to_have_count(0)
    job_id = row.get_attribute("data-job-id")
    assert job_id
    row.locator("button", has_text="Cancel").click()
    expect(row).to_have_attribute("data-status", "cancelled", timeout=60_000)
    expect(row).to_contain_text("cancelled after")
    assert _job_status(live_server, job_id)["status"] == "cancelled"
    expect(page.locator("#status")).to_contain_text("Cancelled: Score-CAM")
    expect(page.locator('.panel[data-method="gradcam"]')).to_be_visible()


def test_every_colour_map_the_api_accepts_is_offered(offline: Page, live_server: LiveServer) -> None:
    page = offline
    open_page(page, live_server)
    offered = page.locator("#colormap option").evaluate_all("(options) => options.map((o) => o.value)")
    spec = httpx.get(f"{live_server.url}/openapi.json").json()
    # The /explain form's own field: other schemas (DICOMweb's JSON body) describe it otherwise.
    described = spec["components"]["schemas"]["ExplainForm"]["properties"]["colormap"]["description"]
    accepted = described.split(": ", 1)[1].split(", ")
    assert offered == accepted


def test_a_job_follows_its_events_with_the_api_key(page: Page, locked_server: LiveServer) -> None:
    page.goto(f"{locked_server.url}/ui")
    expect(page.locator("#banner")).to_contain_text("API key needed")
    page.fill("#api-key", "review-key")
    page.press("#api-key", "Tab")
    expect(page.locator("#model")).to_be_enabled()
    expect(page.locator("#methods input").first).to_be_attached()
    _tick(page, "scorecam")
    page.fill("#method-params", '{"scorecam": {"top_k_channels": 32}}')
    with page.expect_request(lambda r: r.url.endswith("/events")) as events:
        page.set_input_files("#file", [CAT])
    assert events.value.headers["authorization"] == "Bearer review-key"
    expect(page.locator("#jobs .job")).to_have_attribute("data-status", "succeeded", timeout=120_000)
    expect(page.locator('.panel[data-method="scorecam"]')).to_be_visible()
