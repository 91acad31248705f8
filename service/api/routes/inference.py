"""``POST /predict`` and ``POST /explain``: validate, decode, enqueue, await, render."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Form, Header, Request, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from service.api import dicom_results, pipeline
from service.api.deps import EngineDep, SettingsDep
from service.api.errors import error_responses, request_id_of
from service.api.options import ExplainForm, ExplainPlan, PredictForm, plan_explain, resolve_model
from service.api.render import Upload, explain_results, model_ref, predict_results
from service.api.schemas import ExplainResponse, PredictResponse
from service.config import Settings
from service.engine.jobs import ItemResult, WorkItem
from service.errors import InvalidOption

if TYPE_CHECKING:
    from service.engine.engine import Engine

router = APIRouter(tags=["inference"])

TIMEOUT_DESCRIPTION = "deadline in seconds for this request (default: the server's)"

ACCEPT_DESCRIPTION = (
    'application/json (default), or multipart/related; type="application/dicom" for the DICOM '
    "outputs alone as DICOMweb's multipart body"
)

Timeout = Annotated[
    str | None, Header(alias="X-Request-Timeout", description=TIMEOUT_DESCRIPTION, examples=["30"])
]


@router.post(
    "/predict",
    response_model=PredictResponse,
    summary="Classify images",
    description="Classify one or more images (no CAM). Results follow upload order.",
    responses=error_responses(400, 401, 404, 413, 415, 422, 500, 503, 504),
)
async def predict(
    request: Request,
    engine: EngineDep,
    settings: SettingsDep,
    form: Annotated[PredictForm, Form(media_type="multipart/form-data")],
    x_request_timeout: Timeout = None,
) -> Response:
    started = time.perf_counter()
    model = resolve_model(form.model, engine.catalog, settings.default_model)
    deadline = pipeline.deadline_from(x_request_timeout, settings)
    decode_started = time.perf_counter()
    uploads = await pipeline.decode_sources(
        await _read(form.file), settings, model, deadline=deadline, admit=engine.admit, display=False
    )
    decode_ms = (time.perf_counter() - decode_started) * 1000
    results = await engine.submit(pipeline.predict_items(model, uploads, form.topk, deadline))
    encode_started = time.perf_counter()
    body = {
        "request_id": request_id_of(request),
        "model": model_ref(model),
        "results": predict_results(model, uploads, results),
    }
    return await pipeline.respond(body, results, started, encode_started, decode_ms)


@router.post(
    "/explain",
    response_model=ExplainResponse,
    summary="Classify images and explain the predictions with CAMs",
    description=(
        "Classify one or more images and return, for each requested class (top-1 by default) "
        "and each method, the CAM as a raw mask and/or base64 PNG overlay and heatmap at the "
        "original image size. Results follow upload order, frames in file order."
    ),
    responses=error_responses(400, 401, 404, 413, 415, 422, 500, 503, 504),
)
async def explain(
    request: Request,
    engine: EngineDep,
    settings: SettingsDep,
    form: Annotated[ExplainForm, Form(media_type="multipart/form-data")],
    x_request_timeout: Timeout = None,
    accept: Annotated[str | None, Header(description=ACCEPT_DESCRIPTION)] = None,
) -> Response:
    deadline = pipeline.deadline_from(x_request_timeout, settings)
    multipart = dicom_results.accepts_multipart(accept)
    prepared = await prepare_explain(form, engine, settings, deadline)
    if multipart and not dicom_results.wanted(prepared.plan):
        raise InvalidOption(
            f"Accept: {dicom_results.MULTIPART_TYPE} answers DICOM objects: ask for outputs "
            "dicom_pm, dicom_sc or dicom_sr"
        )
    results = await engine.submit(prepared.items)
    if multipart:
        return await finish_dicom_multipart(prepared, results)
    payload, stages = await finish_explain(prepared, results, request_id_of(request), settings)
    return pipeline.json_response(payload, stages)


@dataclass
class PreparedExplain:
    """An /explain request checked and decoded, its work items built, nothing queued yet."""

    plan: ExplainPlan
    uploads: list[Upload]
    items: list[WorkItem]
    started: float
    decode_ms: float


async def prepare_explain(
    form: ExplainForm, engine: Engine, settings: Settings, deadline: float
) -> PreparedExplain:
    """Validate (4xx before any work), decode under the limits and build the work items: the
    part of ``POST /explain`` that ``POST /jobs`` shares."""
    started = time.perf_counter()
    plan = plan_explain(form, engine.catalog, settings.default_model)
    decode_started = time.perf_counter()
    uploads = await pipeline.decode_sources(
        await _read(form.file), settings, plan.model, deadline=deadline, admit=engine.admit
    )
    decode_ms = (time.perf_counter() - decode_started) * 1000
    dicom_results.check(plan, uploads)  # a DICOM output of a file that cannot have it: 422 now
    items = pipeline.explain_items(plan, uploads, settings, deadline)
    return PreparedExplain(plan, uploads, items, started, decode_ms)


async def finish_explain(
    prepared: PreparedExplain, results: Sequence[ItemResult], request_id: str, settings: Settings
) -> tuple[bytes, dict[str, float]]:
    """The ``POST /explain`` response body as JSON bytes, and its Server-Timing stages."""
    encode_started = time.perf_counter()
    rendered, dicom = await run_in_threadpool(_render, prepared, results, settings)
    body: dict[str, Any] = {
        "request_id": request_id, "model": model_ref(prepared.plan.model), "results": rendered
    }
    if dicom_results.wanted(prepared.plan):
        body["dicom"] = dicom_results.json_entries(dicom)
    return await pipeline.serialize(body, results, prepared.started, encode_started, prepared.decode_ms)


def _render(
    prepared: PreparedExplain, results: Sequence[ItemResult], settings: Settings
) -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any], bytes]]]:
    rendered = explain_results(prepared.plan, prepared.uploads, results, settings.png_compress_level,
                               settings.overlay_max_side)
    return rendered, dicom_results.build(prepared.plan, prepared.uploads, results)


async def finish_dicom_multipart(
    prepared: PreparedExplain, results: Sequence[ItemResult]
) -> Response:
    """The DICOM objects alone as DICOMweb's multipart/related body (STOW-RS ready)."""
    objects = await run_in_threadpool(dicom_results.build, prepared.plan, prepared.uploads, results)
    boundary = uuid.uuid4().hex
    return Response(
        dicom_results.multipart(objects, boundary),
        media_type=f'multipart/related; type="application/dicom"; boundary={boundary}',
    )


async def _read(parts: Sequence[UploadFile]) -> list[pipeline.Source]:
    return [(part.filename, await part.read()) for part in parts]
