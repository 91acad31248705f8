"""Dependencies declared once, so route signatures read like type declarations."""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.config import Settings
from service.errors import Unauthorized

if TYPE_CHECKING:  # the engine holds torch; the HTTP layer only calls it
    from service.engine.engine import Engine

_bearer = HTTPBearer(auto_error=False, description="the service's API key, when one is set")


def _engine(request: Request) -> Engine:
    return request.app.state.engine


def _settings(request: Request) -> Settings:
    return request.app.state.settings


EngineDep = Annotated["Engine", Depends(_engine)]
SettingsDep = Annotated[Settings, Depends(_settings)]


def require_api_key(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """With CAMSERVE_API_KEY set, demand ``Authorization: Bearer <key>``.

    The comparison takes the same time wherever the keys differ, so response timing does not
    reveal how much of a guess was right. ``WWW-Authenticate`` tells clients the scheme.
    """
    if not settings.api_key:
        return
    given = credentials.credentials if credentials else ""
    if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
        raise Unauthorized(
            "missing or wrong API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
