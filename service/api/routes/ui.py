"""The review page, served from the package (no build step, no CDN).

The page is three files in ``service/ui/static``: ``index.html`` at ``/ui`` and its script and
style sheet under ``/ui/static/``, plus ``/ui/static/colormaps.json``, generated from
:mod:`service.imaging.colormaps`. Only the files named in :data:`ASSETS` are served, so no
request can reach anything else in the package.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

import orjson
from fastapi import APIRouter
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from service.errors import NotFound
from service.imaging.colormaps import tables_json

router = APIRouter(tags=["ui"])

ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
# Revalidated on every load: the files are small and a stale script after an upgrade would be
# harder to diagnose than the few extra requests.
_ASSET_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
# The page loads nothing from anywhere but the service itself; images it draws are data: and
# blob: URLs made in the browser.
_PAGE_HEADERS = {
    **_ASSET_HEADERS,
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
    "object-src 'none'; base-uri 'none'; form-action 'none'",
}


def _read(name: str) -> str:
    return files("service.ui").joinpath("static", name).read_text(encoding="utf-8")


@router.get("/", include_in_schema=False)
async def root() -> RedirectResponse:
    return RedirectResponse("/ui", status_code=307)


@router.get("/ui", response_class=HTMLResponse, summary="The review web page")
async def ui() -> HTMLResponse:
    return HTMLResponse(_read("index.html"), headers=_PAGE_HEADERS)


@cache
def _colormaps() -> bytes:
    return orjson.dumps(tables_json())


@router.get("/ui/static/colormaps.json", include_in_schema=False)
async def ui_colormaps() -> Response:
    """The lookup tables the service colours maps with, generated from them (never a copy
    kept by hand), so the page colours a mask exactly as overlay_png does."""
    return Response(await run_in_threadpool(_colormaps), media_type="application/json",
                    headers=_ASSET_HEADERS)


@router.get("/ui/static/{name}", include_in_schema=False)
async def ui_asset(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise NotFound(f"no such file of the review page: {name!r}")
    return Response(_read(name), media_type=media_type, headers=_ASSET_HEADERS)
