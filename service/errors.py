"""Domain exceptions, each carrying the HTTP status and the stable error code it maps to.

The tree, written down once::

    ServiceError                     500 internal
    ├── BadRequest                   400 bad_request        malformed request, missing file
    ├── Unauthorized                 401 unauthorized       missing or wrong API key
    ├── NotFound                     404 not_found          unknown model or path
    ├── PayloadTooLarge              413 payload_too_large  body, pixels, frames, images over limits
    ├── UnsupportedMedia             415 unsupported_media  bytes that are not a decodable image
    ├── InvalidOption                422 invalid_option     unknown method/layer, class out of range
    ├── PacsUnavailable              502 pacs_unavailable   the PACS did not answer in time
    ├── PacsRefused                  502 pacs_refused       the PACS refused to store the results
    ├── ServiceUnavailable           503 unavailable        not ready, draining
    │   └── QueueFull                503 queue_full         backpressure (carries Retry-After)
    └── DeadlineExceeded             504 deadline_exceeded  the request's deadline passed

Only the HTTP layer turns these into responses; everything below raises them.
"""

from __future__ import annotations


class ServiceError(Exception):
    status_code = 500
    code = "internal"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(ServiceError):
    status_code = 400
    code = "bad_request"


class Unauthorized(ServiceError):
    status_code = 401
    code = "unauthorized"


class NotFound(ServiceError):
    status_code = 404
    code = "not_found"


class PayloadTooLarge(ServiceError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMedia(ServiceError):
    status_code = 415
    code = "unsupported_media"


class InvalidOption(ServiceError):
    status_code = 422
    code = "invalid_option"


class PacsUnavailable(ServiceError):
    status_code = 502
    code = "pacs_unavailable"


class PacsRefused(ServiceError):
    status_code = 502
    code = "pacs_refused"


class ServiceUnavailable(ServiceError):
    status_code = 503
    code = "unavailable"


class QueueFull(ServiceUnavailable):
    code = "queue_full"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class DeadlineExceeded(ServiceError):
    status_code = 504
    code = "deadline_exceeded"


def choices(values: object) -> str:
    """Format valid choices for an actionable error message."""
    items = list(values)  # type: ignore[call-overload]
    return ", ".join(str(v) for v in items)
