"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from service.api.deps import EngineDep, require_api_key
from service.api.errors import error_responses
from service.api.schemas import HealthResponse

router = APIRouter(tags=["operations"])


@router.get(
    "/healthz",
    response_model=HealthResponse,
    summary="Liveness: 200 while the process serves; 503 once a device has failed beyond repair",
    responses={503: {"model": HealthResponse, "description":
                     "a fatal device error (state `fatal`): the process is exiting to be restarted"}},
)
async def healthz(engine: EngineDep) -> Response:
    # A sticky CUDA error leaves the process unable to compute until it restarts: say so to
    # the orchestrator as well as exiting (service.engine.engine, "fatal").
    alive = engine.state != "fatal"
    body = HealthResponse(status="ok" if alive else (engine.failure or engine.state), state=engine.state,
                          queue_depth=engine.queue_depth)
    return JSONResponse(body.model_dump(), status_code=200 if alive else 503)


@router.get(
    "/readyz",
    response_model=HealthResponse,
    summary="Readiness: 503 until every model is loaded and warmed up, and while draining",
    responses={503: {"model": HealthResponse, "description": "not ready (starting, draining or failed)"}},
)
async def readyz(request: Request, engine: EngineDep) -> Response:
    ready = engine.state == "ready"
    status = "ready" if ready else (engine.failure or engine.state)
    pacs = getattr(request.app.state, "pacs", None)
    reachable = await run_in_threadpool(pacs.ping) if pacs is not None else None
    body = HealthResponse(status=status, state=engine.state, queue_depth=engine.queue_depth, pacs=reachable)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=200 if ready else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics (text exposition format)",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"example": "camserve_requests_total 3"}},
                     "description": "metrics in Prometheus text format"},
               **error_responses(500)},
)
async def metrics(request: Request) -> Response:
    settings = request.app.state.settings
    if settings.metrics_require_key:
        # Checked here rather than as a route dependency, so the public schema stays the same.
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = HTTPAuthorizationCredentials(scheme=scheme, credentials=token.strip())
        require_api_key(settings, given if scheme.lower() == "bearer" else None)
    # One process's registry, or every front end's files summed (service.metrics).
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
