"""``POST /predict`` and ``POST /explain``: validate, then the one pipeline
(:mod:`service.api.pipeline`): decode, enqueue, await, render."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, Form, Header, Request, Response
from starlette.concurrency import run_in_threadpool

from service.api import dicom_results, pipeline
from service.api.deps import EngineDep, SettingsDep
from service.api.errors import error_responses, request_id_of
from service.api.options import ExplainForm, PredictForm, plan_explain, resolve_model
from service.api.schemas import ExplainResponse, PredictResponse
from service.engine.jobs import ItemResult
from service.errors import InvalidOption

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
    timer = pipeline.Timer()
    model = resolve_model(form.model, engine.catalog, settings.default_model)
    deadline = pipeline.deadline_from(x_request_timeout, settings)
    prepared = await pipeline.prepare_predict(
        model, form.topk, await pipeline.read_files(form.file), settings, deadline, engine.admit,
        timer=timer, on_device=engine.jpeg_on_device,
    )
    results = await engine.submit(prepared.items)
    return pipeline.json_response(*await pipeline.finish(prepared, results, request_id_of(request), settings))


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
    timer = pipeline.Timer()
    plan = plan_explain(form, engine.catalog, engine.methods, settings.default_model)
    multipart = dicom_results.accepts_multipart(accept)
    if multipart and not dicom_results.wanted(plan):
        raise InvalidOption(
            f"Accept: {dicom_results.MULTIPART_TYPE} answers DICOM objects: ask for outputs "
            "dicom_pm, dicom_sc or dicom_sr"
        )
    deadline = pipeline.deadline_from(x_request_timeout, settings)
    prepared = await pipeline.prepare_explain(
        plan, await pipeline.read_files(form.file), settings, deadline, engine.admit, timer=timer,
        on_device=engine.jpeg_on_device,
    )
    results = await engine.submit(prepared.items)
    if multipart:
        return await finish_dicom_multipart(prepared, results)
    return pipeline.json_response(*await pipeline.finish(prepared, results, request_id_of(request), settings))


async def finish_dicom_multipart(prepared: pipeline.Prepared, results: Sequence[ItemResult]) -> Response:
    """The DICOM objects alone as DICOMweb's multipart/related body (STOW-RS ready)."""
    assert prepared.plan is not None
    objects = await run_in_threadpool(dicom_results.build, prepared.plan, prepared.uploads, results)
    boundary = uuid.uuid4().hex
    return Response(
        dicom_results.multipart(objects, boundary),
        media_type=f'multipart/related; type="application/dicom"; boundary={boundary}',
    )
