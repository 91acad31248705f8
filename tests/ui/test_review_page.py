"""The review page at /ui, driven in real headless Chromium as a person would use it."""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image
from playwright.sync_api import Page, Response, expect

from tests.ui.conftest import LiveServer

DATA = Path(__file__).resolve().parents[1] / "data"
CAT = DATA / "chelsea.png"
COFFEE = DATA / "coffee.png"
TABBY = 281  # a second cat class for the single-method fallback of the two-panel test

# Mean RGBA and a checksum of everything a canvas shows, read back from the page.
CANVAS_STATS = """(canvas) => {
  const ctx = canvas.getContext("2d");
  const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
  const sum = [0, 0, 0, 0];
  let hash = 0;
  for (let i = 0; i < data.length; i++) {
    sum[i % 4] += data[i];
    hash = (hash * 31 + data[i]) >>> 0;
  }
  const n = data.length / 4;
  return {mean: sum.map((s) => s / n), hash, width: canvas.width, height: canvas.height};
}"""


# A few pixels along the canvas's middle row, as [r, g, b].
PIXELS_AT_CENTRE = """(canvas) => {
  const ctx = canvas.getContext("2d");
  const y = Math.floor(canvas.height / 2);
  const out = [];
  for (let x = Math.floor(canvas.width * 0.3); x < canvas.width * 0.7; x += 17) {
    const d = ctx.getImageData(x, y, 1, 1).data;
    out.push([d[0], d[1], d[2]]);
  }
  return out;
}"""


def open_page(page: Page, server: LiveServer) -> None:
    page.goto(f"{server.url}/ui")
    expect(page.locator("#model")).to_be_enabled()
    expect(page.locator("#methods input").first).to_be_attached()


def is_explain(response: Response) -> bool:
    return response.url.endswith("/explain") and response.request.method == "POST"


def run(page: Page, action: Callable[[], Any],
        answers: Callable[[Response], bool] = is_explain) -> Response:
    """Do something that sends POST /explain (or what ``answers`` picks) and wait until the
    page has shown the answer."""
    with page.expect_response(answers) as answer:
        action()
    response = answer.value
    if response.ok:
        expect(page.locator("#status")).to_contain_text("Done")
    else:
        expect(page.locator("#banner")).to_be_visible()
    return response


def upload(page: Page, *files: Path | dict[str, Any]) -> Response:
    return run(page, lambda: page.set_input_files("#file", list(files)))


def drop(page: Page, path: Path) -> Response:
    """Drop a file on the drop zone, as dragging it from the desktop does."""
    transfer = page.evaluate_handle(
        """([name, b64]) => {
          const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
          const transfer = new DataTransfer();
          transfer.items.add(new File([bytes], name, {type: "image/png"}));
          return transfer;
        }""",
        [path.name, base64.b64encode(path.read_bytes()).decode()],
    )
    return run(page, lambda: page.dispatch_event("#dropzone", "drop", {"dataTransfer": transfer}))


def canvas_stats(page: Page, index: int = 0) -> dict[str, Any]:
    return page.locator(".panel canvas").nth(index).evaluate(CANVAS_STATS)


def choose_two_panels(page: Page, server: LiveServer) -> list[tuple[str, int | None]]:
    """Tick two methods when the service has two; otherwise one method for two classes.

    Returns the expected (method, class) of each panel, None meaning the top-1 class."""
    methods = [m["name"] for m in httpx.get(f"{server.url}/methods").json()["methods"]]
    if len(methods) >= 2:
        chosen = ["gradcam", next(m for m in methods if m != "gradcam")]
        for box in page.locator("#methods input").all():
            box.set_checked(box.get_attribute("value") in chosen)
        return [(m, None) for m in chosen]
    page.fill("#class-idx", f"285,{TABBY}")
    return [(methods[0], 285), (methods[0], TABBY)]


def test_page_and_its_assets_are_served_from_the_package(live_server: LiveServer) -> None:
    with httpx.Client(base_url=live_server.url) as http:
        root = http.get("/", follow_redirects=False)
        assert root.status_code == 307 and root.headers["location"] == "/ui"
        page = http.get("/ui")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert 'src="ui/static/app.js"' in page.text and 'href="ui/static/app.css"' in page.text
        script = http.get("/ui/static/app.js")
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
        style = http.get("/ui/static/app.css")
        assert style.status_code == 200 and "text/css" in style.headers["content-type"]
        for other in ("index.html", "..%2f__init__.py", "nope.js"):
            missing = http.get(f"/ui/static/{other}")
            assert missing.status_code == 404, other
            assert missing.json()["error"]["code"] == "not_found"
        # Nothing on the page comes from another host, and the browser is told so.
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert not re.search(r"(src|href)=\"(https?:)?//", page.text)
        assert "http" not in script.text.replace("http_", "")


def test_cat_gets_predictions_two_method_panels_and_timings(
    page: Page, live_server: LiveServer, tmp_path: Path
) -> None:
    open_page(page, live_server)
    expected = choose_two_panels(page, live_server)
    response = upload(page, CAT)

    # The page asks for the displayed frame and the raw maps, and blends them itself: no PNG
    # overlay or heatmap comes back.
    result = response.json()["results"][0]
    assert result["image_png"]
    explanations = result["explanations"]
    assert all(e["heatmap_png"] is None and e["overlay_png"] is None for e in explanations)
    assert all(e["mask"]["encoding"] == "base64" and e["mask"]["shape"] == [300, 451]
               for e in explanations)

    expect(page.locator("#predictions li").first).to_contain_text("Egyptian cat")
    expect(page.locator("#image-title")).to_contain_text("chelsea.png")
    panels = page.locator(".panel")
    expect(panels).to_have_count(2)
    for i, (method, cls) in enumerate(expected):
        assert panels.nth(i).get_attribute("data-method") == method
        assert panels.nth(i).get_attribute("data-class-idx") == str(cls or 285)
        expect(panels.nth(i).locator("canvas")).to_have_attribute("data-opacity", "0.5")
    expect(panels.first).to_contain_text("Egyptian cat")
    for name in ("total", "queue", "compute", "encode"):
        expect(page.locator("#timings")).to_contain_text(name)
    expect(page.locator("#timings dd").first).to_have_text(re.compile(r"^\d+\.\d ms$"))

    # Side by side at a laptop's width, and the map is drawn (not a blank canvas).
    first, second = (panels.nth(i).bounding_box() for i in range(2))
    assert first and second and abs(first["y"] - second["y"]) < 1 and second["x"] > first["x"]
    stats = canvas_stats(page)
    assert stats["mean"][3] == 255 and max(stats["mean"][:3]) > 40

    shot = tmp_path / "review-cat.png"
    page.screenshot(path=str(shot), full_page=True)
    assert Image.open(shot).size[0] == 1280


def test_opacity_slider_reblends_in_the_browser_without_a_request(
    page: Page, live_server: LiveServer
) -> None:
    open_page(page, live_server)
    upload(page, CAT)
    canvas = page.locator(".panel canvas").first
    sent: list[str] = []
    page.on("request", lambda request: sent.append(request.url))

    page.fill("#opacity", "0")
    expect(canvas).to_have_attribute("data-opacity", "0")
    expect(page.locator("#opacity-value")).to_have_text("0%")
    bare = canvas_stats(page)
    page.fill("#opacity", "100")
    expect(canvas).to_have_attribute("data-opacity", "1")
    full = canvas_stats(page)

    assert bare["hash"] != full["hash"]
    # With the map fully opaque the picture moves towards the colour map's hues (jet: strong
    # blue/red) from the photo's greys: the colour spread grows.
    assert np.ptp(full["mean"][:3]) > np.ptp(bare["mean"][:3])
    assert not any(url.endswith("/explain") for url in sent), sent


def test_colormap_switch_redraws_without_a_request(page: Page, live_server: LiveServer) -> None:
    open_page(page, live_server)
    upload(page, CAT)
    before = canvas_stats(page)
    sent: list[str] = []
    page.on("request", lambda request: sent.append(request.url))
    page.fill("#opacity", "100")
    page.uncheck("#fade")  # every pixel fully covered by the map's colour
    page.select_option("#colormap", "gray")
    canvas = page.locator(".panel canvas").first
    expect(canvas).to_have_attribute("data-colormap", "gray")
    # Fully opaque gray, not faded: every pixel is a grey level (r == g == b), drawn from the
    # mask here.
    stats = canvas_stats(page)
    assert stats["hash"] != before["hash"]
    pixels = page.locator(".panel canvas").first.evaluate(PIXELS_AT_CENTRE)
    assert all(p[0] == p[1] == p[2] for p in pixels), pixels
    assert sent == [], sent


def test_class_from_the_predictions_and_typed(page: Page, live_server: LiveServer) -> None:
    open_page(page, live_server)
    upload(page, CAT)
    second = page.locator("#predictions li").nth(1)
    label = second.locator(".pred-label").inner_text()
    run(page, lambda: second.get_by_role("button").click())
    expect(page.locator(".panel").first).to_contain_text(label)
    expect(page.locator("#class-idx")).not_to_have_value("")

    page.fill("#class-idx", "1")
    run(page, lambda: page.press("#class-idx", "Enter"))
    expect(page.locator(".panel").first).to_contain_text("goldfish")

    # A class the model does not have: the service's message, and the last maps stay.
    page.fill("#class-idx", "5000")
    response = run(page, lambda: page.click("#run"))
    assert response.status == 422
    expect(page.locator("#banner")).to_contain_text("Option not accepted")
    expect(page.locator("#banner")).to_contain_text("valid classes are 0..999")
    expect(page.locator(".panel").first).to_contain_text("goldfish")


def test_non_image_shows_an_error_and_the_page_keeps_working(
    page: Page, live_server: LiveServer, tmp_path: Path
) -> None:
    open_page(page, live_server)
    bad = {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"these are not pixels\n" * 20}
    response = upload(page, bad)
    assert response.status == 415
    banner = page.locator("#banner")
    expect(banner).to_contain_text("Not an image the service can read")
    expect(banner).to_contain_text("notes.txt")
    expect(banner).to_contain_text(response.json()["error"]["message"])
    page.screenshot(path=str(tmp_path / "review-error.png"))

    drop(page, CAT)
    expect(banner).to_be_hidden()
    expect(page.locator("#predictions")).to_contain_text("Egyptian cat")
    expect(page.locator(".panel canvas").first).to_have_attribute("data-opacity", "0.5")


def test_page_waits_for_a_service_still_loading(page: Page, live_server: LiveServer) -> None:
    answered: list[int] = []

    def models(route: Any) -> None:
        # The first ask finds the models still loading, as right after start-up.
        if not answered:
            answered.append(503)
            route.fulfill(status=503, headers={"Retry-After": "1"}, content_type="application/json",
                          body='{"error": {"code": "not_ready", "message": "not ready", "request_id": "x"}}')
        else:
            answered.append(200)
            route.continue_()

    page.route("**/models", models)
    page.goto(f"{live_server.url}/ui")
    expect(page.locator("#status")).to_contain_text("still loading")
    expect(page.locator("#model")).to_be_enabled()
    expect(page.locator("#banner")).to_be_hidden()
    assert answered == [503, 200]


def test_busy_service_message_says_when_to_retry(page: Page, live_server: LiveServer) -> None:
    open_page(page, live_server)
    body = '{"error": {"code": "queue_full", "message": "the queue is full", "request_id": "abc123"}}'
    page.route("**/explain", lambda route: route.fulfill(
        status=503, body=body, content_type="application/json", headers={"Retry-After": "3"}))
    upload(page, CAT)
    banner = page.locator("#banner")
    expect(banner).to_contain_text("Service busy or not ready")
    expect(banner).to_contain_text("the queue is full")
    expect(banner).to_contain_text("Try again in 3 s")
    expect(banner).to_contain_text("abc123")
    page.unroute("**/explain")
    run(page, lambda: page.click("#run"))
    expect(banner).to_be_hidden()


def test_api_key_field_and_upload_limit(
    page: Page, locked_server: LiveServer, tmp_path: Path
) -> None:
    page.goto(f"{locked_server.url}/ui")
    banner = page.locator("#banner")
    expect(banner).to_contain_text("API key needed")
    expect(page.locator("#api-key")).to_be_focused()
    page.screenshot(path=str(tmp_path / "review-401.png"))

    page.fill("#api-key", "review-key")
    with page.expect_request(lambda r: r.url.endswith("/methods")) as sent:
        page.press("#api-key", "Tab")
    assert sent.value.headers["authorization"] == "Bearer review-key"
    expect(page.locator("#model")).to_be_enabled()
    expect(banner).to_be_hidden()

    response = upload(page, COFFEE)  # 467 kB, over this server's 0.25 MB limit
    assert response.status == 413
    expect(banner).to_contain_text("Too large")
    expect(banner).to_contain_text("0.25 MB")

    upload(page, CAT)
    expect(page.locator("#predictions")).to_contain_text("Egyptian cat")


def _animated_gif(tmp_path: Path) -> Path:
    frames = [Image.open(p).convert("RGB").resize((240, 160)) for p in (CAT, COFFEE)]
    path = tmp_path / "two-frames.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=200, loop=0)
    return path


def test_several_files_and_frames_step_through(
    page: Page, live_server: LiveServer, tmp_path: Path
) -> None:
    gif = _animated_gif(tmp_path)
    open_page(page, live_server)
    upload(page, CAT, gif)
    title = page.locator("#image-title")
    expect(title).to_contain_text("Image 1 of 2 · chelsea.png")
    expect(page.locator("#prev")).to_be_disabled()

    page.click("#next")
    expect(title).to_contain_text("two-frames.gif · frame 1 of 2")
    page.click("#next")
    expect(title).to_contain_text("frame 2 of 2")
    expect(page.locator("#next")).to_be_disabled()
    canvas = page.locator(".panel canvas").first
    # Chromium decodes the GIF's frames itself, so the slider still re-blends.
    expect(canvas).to_have_attribute("data-opacity", "0.5")
    expect(page.locator("#opacity")).to_be_enabled()
    page.click("#prev")
    expect(title).to_contain_text("frame 1 of 2")


def test_formats_the_browser_cannot_show_are_blended_in_the_browser_too(
    page: Page, live_server: LiveServer, tmp_path: Path
) -> None:
    grey = np.asarray(Image.open(CAT).convert("L"), dtype=np.uint16) * 200
    png16, tiff = io.BytesIO(), io.BytesIO()
    Image.fromarray(grey).save(png16, format="PNG")
    Image.open(COFFEE).convert("RGB").save(tiff, format="TIFF")
    open_page(page, live_server)
    response = upload(
        page,
        {"name": "scan16.png", "mimeType": "image/png", "buffer": png16.getvalue()},
        {"name": "coffee.tif", "mimeType": "image/tiff", "buffer": tiff.getvalue()},
    )
    assert all(r["image_png"] for r in response.json()["results"])
    canvas = page.locator(".panel canvas").first
    slider = page.locator("#opacity")
    expect(slider).to_be_enabled()
    expect(page.locator(".panel .note")).to_have_count(0)
    # The 16-bit frame was windowed by the service, and the page says how.
    expect(page.locator("#window-info")).to_contain_text("full range")
    page.fill("#opacity", "0")
    expect(canvas).to_have_attribute("data-opacity", "0")
    bare = canvas_stats(page)
    page.fill("#opacity", "100")
    expect(canvas).to_have_attribute("data-opacity", "1")
    assert canvas_stats(page)["hash"] != bare["hash"]
    with page.expect_download() as download:
        page.locator(".panel").first.locator("button", has_text="Download overlay").click()
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    assert saved.name == "scan16_gradcam_285_overlay.png"
    with Image.open(saved) as overlay:  # the blend as shown, at the image's size
        assert overlay.format == "PNG" and overlay.size == (451, 300)

    page.click("#next")
    expect(page.locator("#image-title")).to_contain_text("coffee.tif")
    expect(page.locator("#window-info")).to_be_hidden()  # an 8-bit TIFF has no window
    expect(slider).to_be_enabled()
    page.fill("#opacity", "20")
    expect(canvas).to_have_attribute("data-opacity", "0.2")


def test_zoom_pan_keyboard_and_download(page: Page, live_server: LiveServer, tmp_path: Path) -> None:
    open_page(page, live_server)
    upload(page, CAT)
    canvas = page.locator(".panel canvas").first
    zoom = page.locator("#zoom-value")
    expect(zoom).to_contain_text("fit")
    fitted = canvas_stats(page)

    canvas.focus()
    page.keyboard.press("+")
    expect(zoom).not_to_contain_text("fit")
    zoomed = canvas_stats(page)
    assert zoomed["hash"] != fitted["hash"]
    page.keyboard.press("ArrowLeft")
    assert canvas_stats(page)["hash"] != zoomed["hash"]
    page.keyboard.press("0")
    expect(zoom).to_contain_text("fit")
    assert canvas_stats(page)["hash"] == fitted["hash"]

    page.click("#zoom-in")
    expect(zoom).not_to_contain_text("fit")
    page.click("#zoom-fit")
    expect(zoom).to_contain_text("fit")

    # The mouse: the wheel zooms where the pointer is, dragging pans; every panel follows.
    box = canvas.bounding_box()
    assert box
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3)
    page.mouse.wheel(0, -300)
    expect(zoom).not_to_contain_text("fit")
    wheeled = canvas_stats(page)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.6, steps=4)
    page.mouse.up()
    assert canvas_stats(page)["hash"] != wheeled["hash"]
    page.click("#zoom-fit")

    with page.expect_download() as download:
        page.locator(".panel").first.locator("button", has_text="Download overlay").click()
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    assert saved.name == "chelsea_gradcam_285_overlay.png"
    with Image.open(saved) as overlay:
        assert overlay.format == "PNG" and overlay.size == Image.open(CAT).size


def test_keyboard_reaches_every_control_in_order(page: Page, live_server: LiveServer) -> None:
    open_page(page, live_server)
    upload(page, CAT)
    page.locator("body").focus()
    seen: list[str] = []
    for _ in range(60):
        page.keyboard.press("Tab")
        seen.append(page.evaluate("document.activeElement.id || document.activeElement.tagName"))
    order = [
        "file", "model", "layer", "class-idx", "colormap", "api-key", "run", "opacity", "zoom-in",
    ]
    positions = [seen.index(name) for name in order]
    assert positions == sorted(positions), seen
    assert "CANVAS" in seen[seen.index("zoom-fit"):]
    # Focus is visible: the focused control draws an outline.
    page.focus("#run")
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Tab")
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline == "solid"
