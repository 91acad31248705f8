"""The review page, served from the package (no build step, no CDN)."""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, RedirectResponse

router = APIRouter(tags=["ui"])


@router.get("/", include_in_schema=False)
async def root() -> RedirectResponse:
    return RedirectResponse("/ui", status_code=307)


@router.get("/ui", response_class=HTMLResponse, summary="The review web page")
async def ui() -> HTMLResponse:
    page = files("service.ui").joinpath("static/index.html").read_text(encoding="utf-8")
    return HTMLResponse(page)
