"""A real HTTP server and a real headless Chromium for the review page's end-to-end tests.

Chromium comes from Debian's ``chromium`` package (``make test`` installs it when missing);
Playwright only drives it, its own browser download is never used.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from playwright.sync_api import Browser, Page, Playwright, Route, sync_playwright

from service.config import Settings
from service.main import create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
]
STARTUP_LIMIT_S = 120.0
VIEWPORT = {"width": 1280, "height": 900}


@dataclass
class LiveServer:
    url: str
    server: uvicorn.Server
    thread: threading.Thread


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(settings: Settings) -> LiveServer:
    port = _free_port()
    app = create_app(settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    # Bounded wait on readiness: /readyz turns 200 once the models are loaded and warmed.
    deadline = time.monotonic() + STARTUP_LIMIT_S
    with httpx.Client(timeout=5.0) as http:
        while True:
            assert thread.is_alive(), "the server thread stopped during start-up"
            if server.started:
                try:
                    if http.get(f"{url}/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                engine = getattr(app.state, "engine", None)
                assert engine is None or engine.state != "failed", f"engine failed: {engine.failure}"
            assert time.monotonic() < deadline, f"the service was not ready in {STARTUP_LIMIT_S} s"
            time.sleep(0.05)  # polling interval of the bounded readiness loop
    return LiveServer(url, server, thread)


def _stop(live: LiveServer) -> None:
    live.server.should_exit = True
    live.thread.join(timeout=30)


@pytest.fixture(scope="session")
def live_server() -> Iterator[LiveServer]:
    # No warm-up pass over every method: the page's tests pay for the few they use.
    live = _start(Settings(warmup=False))
    yield live
    _stop(live)


@pytest.fixture(scope="session")
def locked_server() -> Iterator[LiveServer]:
    """A second server with an API key and a small upload limit, for the 401 and 413 messages."""
    live = _start(Settings(api_key="review-key", max_upload_mb=0.25, warmup=False))
    yield live
    _stop(live)


@pytest.fixture(scope="session")
def playwright_session() -> Iterator[Playwright]:
    with sync_playwright() as pw:
        yield pw


@pytest.fixture(scope="session")
def browser(playwright_session: Playwright) -> Iterator[Browser]:
    assert CHROMIUM.exists(), "Chromium is missing: apt-get install -y chromium (make test does it)"
    browser = playwright_session.chromium.launch(
        executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True,
    )
    yield browser
    browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(60_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def only_the_service(page: Page, url: str) -> list[str]:
    """Abort every request of ``page`` to another host than ``url``; the list fills with them."""
    elsewhere: list[str] = []

    def route(request_route: Route) -> None:
        if request_route.request.url.startswith(url):
            request_route.continue_()
        else:
            elsewhere.append(request_route.request.url)
            request_route.abort()

    page.route("**/*", route)
    return elsewhere
