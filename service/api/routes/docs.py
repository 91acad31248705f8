"""Swagger UI, ReDoc and Swagger's OAuth redirect page, served from an installed package.

FastAPI's own ``/docs`` and ``/redoc`` load their scripts from a CDN, so on a network without
internet (many hospital networks) they are blank pages. The assets here come from the
``fastapi-offline`` package's ``static`` folder, served under :data:`ASSETS_URL`; only the
files named in :data:`ASSETS` are served. The pages themselves are FastAPI's, pointed at them.

Swagger UI is configured so that *Try it out* starts from an empty form (the examples in the
schema stay examples, never values sent) and remembers the API key given to *Authorize*.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, Response

from service.errors import NotFound

DOCS_URL = "/docs"
REDOC_URL = "/redoc"
OAUTH_REDIRECT_URL = "/docs/oauth2-redirect"
ASSETS_URL = "/docs/static"

ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "favicon.png": "image/png",
}
# The assets change only with the installed package; a day's caching spares every reload.
_ASSET_HEADERS = {"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"}

# The pages may load nothing from anywhere but the service: ReDoc's footer logo, for one, would
# otherwise be fetched from its vendor's CDN. Both pages start from an inline script and style.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; worker-src 'self' blob:; "
    "object-src 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
}

SWAGGER_PARAMETERS: dict[str, Any] = {
    "persistAuthorization": True,  # the key given to Authorize survives a reload
    "displayRequestDuration": True,
    "tryItOutEnabled": False,
    "defaultModelsExpandDepth": 0,
}

router = APIRouter(include_in_schema=False)


def _asset(name: str) -> bytes:
    return files("fastapi_offline").joinpath("static", name).read_bytes()


def _root(request: Request) -> str:
    return str(request.scope.get("root_path", ""))


@router.get(DOCS_URL)
async def swagger_ui(request: Request) -> HTMLResponse:
    app: FastAPI = request.app
    root = _root(request)
    page = get_swagger_ui_html(
        openapi_url=f"{root}{app.openapi_url}",
        title=f"{app.title} - Swagger UI",
        oauth2_redirect_url=f"{root}{OAUTH_REDIRECT_URL}",
        swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
        swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
        swagger_ui_parameters=SWAGGER_PARAMETERS,
    )
    return HTMLResponse(_without_prefilled_examples(bytes(page.body).decode()), headers=_PAGE_HEADERS)


@router.get(OAUTH_REDIRECT_URL)
async def swagger_ui_redirect() -> HTMLResponse:
    page = get_swagger_ui_oauth2_redirect_html()
    page.headers.update(_PAGE_HEADERS)
    return page


@router.get(REDOC_URL)
async def redoc(request: Request) -> HTMLResponse:
    app: FastAPI = request.app
    root = _root(request)
    page = get_redoc_html(
        openapi_url=f"{root}{app.openapi_url}",
        title=f"{app.title} - ReDoc",
        redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
        with_google_fonts=False,
    )
    page.headers.update(_PAGE_HEADERS)
    return page


@router.get(ASSETS_URL + "/{name}")
async def docs_asset(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise NotFound(f"no such file of the API docs: {name!r}")
    return Response(_asset(name), media_type=media_type, headers=_ASSET_HEADERS)


# Swagger UI fills the fields of a form body from each property's example. Examples document
# a field; sent as values they would explain every photo as the example's class at the
# example's layer. This plugin keeps the schema's examples out of the form's initial values,
# so Try it out starts from the defaults the server applies when a field is left empty.
_PLUGIN = """
const camserveFormDefaults = function () {
  const plain = (schema) => (schema && schema.toJS ? schema.toJS() : (schema || {}));
  const start = (field) => {
    if (field.default !== undefined && field.default !== null) { return field.default; }
    return field.type === "array" ? [] : "";
  };
  return {
    afterLoad: function () {
      const original = this.fn.getSampleSchema;
      this.fn.getSampleSchema = function (schema, contentType) {
        const form = contentType === false
          || (typeof contentType === "string" && contentType.indexOf("multipart/form-data") === 0);
        if (!form) { return original.apply(this, arguments); }
        const body = plain(schema);
        if (!body.properties) { return start(body); }
        const values = {};
        for (const [name, field] of Object.entries(body.properties)) { values[name] = start(field || {}); }
        return values;
      };
    },
  };
};
"""


def _without_prefilled_examples(page: str) -> str:
    """The Swagger page with the plugin above registered before the UI is built."""
    marker = "const ui = SwaggerUIBundle({"
    if marker not in page:  # FastAPI changed its page: serve it as it is rather than break it
        return page
    page = page.replace(marker, _PLUGIN + marker, 1)
    return page.replace(marker, marker + "\n        plugins: [camserveFormDefaults],", 1)


def with_file_pickers(app: FastAPI) -> None:
    """Make ``app.openapi()`` mark every array of uploaded files as ``format: binary`` items.

    FastAPI writes a ``list[UploadFile]`` field as an array of strings with OpenAPI 3.1's
    ``contentMediaType``. Swagger UI shows a file picker for that on a single field, but for
    an array's items only when they say ``format: binary``; without it Try it out sends text
    and the upload fails validation. Both keywords are kept: each is valid OpenAPI 3.1.
    """
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            for component in schema.get("components", {}).get("schemas", {}).values():
                for field in component.get("properties", {}).values():
                    items = field.get("items") if field.get("type") == "array" else None
                    if isinstance(items, dict) and "contentMediaType" in items:
                        items.setdefault("format", "binary")
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
