"""Domain exceptions and framework errors as the contract's JSON error body.

``{"error": {"code", "message", "request_id"}}``; never a stack trace.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.schemas import ErrorResponse
from service.errors import ServiceError

log = logging.getLogger(__name__)

# Pydantic error types that mean "could not be read at all" (400) rather than "out of range" (422).
_MALFORMED = {
    "missing", "int_parsing", "float_parsing", "bool_parsing", "int_from_float",
    "string_type", "int_type", "float_type", "bool_type", "list_type", "json_invalid",
}

_DESCRIPTIONS = {
    400: "malformed request: missing file, unparsable number",
    401: "missing or wrong API key",
    404: "unknown model or path",
    413: "body, image pixels, frame count or images per request over their limits",
    415: "not a decodable image of a supported format",
    422: "unknown method or layer, class index out of range, option out of range",
    502: "the PACS could not be reached in time (pacs_unavailable) or refused a store (pacs_refused)",
    503: "queue full (with Retry-After), not ready, or draining",
    504: "the request's deadline passed before it was computed",
    500: "a fault in the service; the request fails, the service keeps serving",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the given status codes."""
    return {
        code: {
            "model": ErrorResponse,
            "description": _DESCRIPTIONS[code],
            "content": {"application/json": {"example": {"error": {
                "code": _example_code(code), "message": _DESCRIPTIONS[code], "request_id": "3f2a9c"
            }}}},
        }
        for code in codes
    }


def _example_code(status: int) -> str:
    return {
        400: "bad_request", 401: "unauthorized", 404: "not_found", 413: "payload_too_large",
        415: "unsupported_media", 422: "invalid_option", 502: "pacs_unavailable", 503: "queue_full",
        504: "deadline_exceeded", 500: "internal",
    }[status]


def request_id_of(request: Request) -> str:
    return str(getattr(request.state, "request_id", "") or "")


def error_body(code: str, message: str, request_id: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "request_id": request_id}}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        if exc.status_code >= 500 and exc.status_code not in (503, 504):
            log.error("request failed: %s", exc.message, extra={"request_id": request_id_of(request)})
        return JSONResponse(
            error_body(exc.code, exc.message, request_id_of(request)),
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = exc.errors()
        status = 400 if any(p.get("type") in _MALFORMED for p in problems) else 422
        message = "; ".join(_describe(p) for p in problems) or "invalid request"
        code = "bad_request" if status == 400 else "invalid_option"
        return JSONResponse(error_body(code, message, request_id_of(request)), status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized",
                413: "payload_too_large"}.get(
            exc.status_code, "http_error"
        )
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such path: {request.url.path}; see /docs for the API"
        return JSONResponse(
            error_body(code, message, request_id_of(request)),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )


def _describe(problem: dict[str, Any]) -> str:
    location = [str(part) for part in problem.get("loc", ()) if part not in ("body", "query", "header")]
    field = ".".join(location) or "request"
    if problem.get("type") == "missing":
        return f"{field}: required field is missing"
    return f"{field}: {problem.get('msg', 'invalid value')}"
