"""``POST /predict`` and ``POST /explain``: validate, decode, enqueue, await, render."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Form, Header, Request, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from service.api.deps import EngineDep, SettingsDep
from service.api.errors import error_responses, request_id_of
from service.api.options import ExplainForm, PredictForm, plan_explain, resolve_model
from service.api.render import Upload, dumps, explain_results, model_ref, predict_results
from service.api.schemas import ExplainResponse, PredictResponse
from service.config import Settings
from service.engine.jobs import ExplainSpec, ItemResult, WorkItem
from service.errors import BadRequest, InvalidOption, PayloadTooLarge
from service.imaging.decode import DecodeLimits, decode_image
from service.imaging.encode import display_size
from service.imaging.preprocess import resize_for_model
from service.models.catalog import ModelInfo

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
    uploads = await _decode(form.file, settings, model)
    deadline = _deadline(x_request_timeout, settings)
    items = [_item(model, u, form.topk, None, deadline) for u in uploads]
    results = await engine.submit(items)
    encode_started = time.perf_counter()
    body = {
        "request_id": request_id_of(request),
        "model": model_ref(model),
        "results": predict_results(model, uploads, results),
    }
    return await _respond(body, results, started, encode_started)


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
    plan = plan_explain(form, engine.catalog, settings.default_model)
    uploads = await _decode(form.file, settings, plan.model)
    deadline = _deadline(x_request_timeout, settings)
    wants_display = bool({"overlay", "heatmap"} & plan.outputs)
    items = []
    for upload in uploads:
        frame = upload.frame
        mask_size = {
            "input": plan.model.input_size,
            "original": (frame.height, frame.width),
            "feature": None,
        }[form.mask_size]
        shown = display_size(frame.width, frame.height, settings.overlay_max_side)
        spec = ExplainSpec(
            methods=plan.methods,
            layers=plan.layers,
            classes=plan.classes,
            mask_size=mask_size,
            display_size=(shown[1], shown[0]) if wants_display else None,
        )
        items.append(_item(plan.model, upload, form.topk, spec, deadline))
    results = await engine.submit(items)
    encode_started = time.perf_counter()
    rendered = await run_in_threadpool(
        explain_results, plan, uploads, results, settings.png_compress_level
    )
    body = {"request_id": request_id_of(request), "model": model_ref(plan.model), "results": rendered}
    return await _respond(body, results, started, encode_started)


def _item(
    model: ModelInfo, upload: Upload, topk: int, spec: ExplainSpec | None, deadline: float
) -> WorkItem:
    return WorkItem(
        model=model.name,
        pixels=upload.pixels,
        topk=topk,
        explain=spec,
        deadline=deadline,
        future=asyncio.get_running_loop().create_future(),
    )


def _deadline(header: str | None, settings: Settings) -> float:
    if header is None:
        return time.monotonic() + settings.request_timeout_s
    try:
        seconds = float(header)
    except ValueError:
        raise BadRequest(f"X-Request-Timeout must be a number of seconds, got {header!r}") from None
    if not 0 < seconds <= 3600:
        raise InvalidOption("X-Request-Timeout must lie in (0, 3600] seconds")
    return time.monotonic() + seconds


def _prepare(
    data: bytes, limits: DecodeLimits, index: int, filename: str | None, input_size: tuple[int, int]
) -> list[Upload]:
    """Decode a file and resize each frame for the model (runs on a thread, not the loop)."""
    return [
        Upload(index, filename, frame, resize_for_model(frame.image, input_size))
        for frame in decode_image(data, limits, filename or "")
    ]


async def _decode(
    files: Sequence[UploadFile], settings: Settings, model: ModelInfo
) -> list[Upload]:
    if not files:
        raise BadRequest("no file: send one or more image parts named 'file'")
    limits = DecodeLimits(settings.max_image_pixels, settings.max_frames)
    uploads: list[Upload] = []
    for index, part in enumerate(files):
        data = await part.read()
        uploads.extend(await run_in_threadpool(
            _prepare, data, limits, index, part.filename, model.input_size
        ))
        if len(uploads) > settings.max_images_per_request:
            raise PayloadTooLarge(
                f"more than {settings.max_images_per_request} images (frames included) "
                "in one request; split it"
            )
    return uploads


async def _respond(
    body: dict[str, Any], results: Sequence[ItemResult], started: float, encode_started: float
) -> Response:
    payload = await run_in_threadpool(_serialize, body, results, started, encode_started)
    return Response(payload, media_type="application/json")


def _serialize(
    body: dict[str, Any], results: Sequence[ItemResult], started: float, encode_started: float
) -> bytes:
    # Timings are filled last so "encode" covers the rendering that came before.
    now = time.perf_counter()
    body["timing_ms"] = {
        "queue": round(max((r.queue_ms for r in results), default=0.0), 2),
        "compute": round(max((r.compute_ms for r in results), default=0.0), 2),
        "encode": round((now - encode_started) * 1000, 2),
        "total": round((now - started) * 1000, 2),
    }
    return dumps(body)

