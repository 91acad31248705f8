"""``POST /predict`` and ``POST /explain``: validate, decode, enqueue, await, render."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, Form, Header, Request, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from service.api import pipeline
from service.api.deps import EngineDep, SettingsDep
from service.api.errors import error_responses, request_id_of
from service.api.options import ExplainForm, PredictForm, plan_explain, resolve_model
from service.api.render import explain_results, model_ref, predict_results
from service.api.schemas import ExplainResponse, PredictResponse

router = APIRouter(tags=["inference"])

TIMEOUT_DESCRIPTION = "deadline in seconds for this request (default: the server's)"

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
    decode_started = time.perf_counter()
    uploads = await pipeline.decode_sources(await _read(form.file), settings, model)
    decode_ms = (time.perf_counter() - decode_started) * 1000
    deadline = pipeline.deadline_from(x_request_timeout, settings)
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
) -> Response:
    started = time.perf_counter()
    plan = plan_explain(form, engine.catalog, engine.methods, settings.default_model)
    decode_started = time.perf_counter()
    uploads = await pipeline.decode_sources(await _read(form.file), settings, plan.model)
    decode_ms = (time.perf_counter() - decode_started) * 1000
    deadline = pipeline.deadline_from(x_request_timeout, settings)
    results = await engine.submit(pipeline.explain_items(plan, uploads, settings, deadline))
    encode_started = time.perf_counter()
    rendered = await run_in_threadpool(
        explain_results, plan, uploads, results, settings.png_compress_level
    )
    body = {"request_id": request_id_of(request), "model": model_ref(plan.model), "results": rendered}
    return await pipeline.respond(body, results, started, encode_started, decode_ms)


async def _read(parts: Sequence[UploadFile]) -> list[pipeline.Source]:
    return [(part.filename, await part.read()) for part in parts]
