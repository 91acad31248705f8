"""What every inference route shares, whatever its wire format (multipart or KServe JSON):
decode under the limits, build work items, set the deadline, and serialise off the loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from fastapi import Response
from starlette.concurrency import run_in_threadpool

from service.api.options import ExplainPlan
from service.api.render import Upload, dumps
from service.config import Settings
from service.engine.jobs import ExplainSpec, ItemResult, WorkItem
from service.errors import BadRequest, InvalidOption, PayloadTooLarge
from service.imaging.decode import DecodeLimits, decode_image
from service.imaging.encode import display_size
from service.imaging.preprocess import resize_for_model
from service.models.catalog import ModelInfo

Source = tuple[str | None, bytes]  # (file name if any, the file's bytes)


def deadline_from(header: str | None, settings: Settings) -> float:
    """The request's ``time.monotonic()`` deadline from ``X-Request-Timeout`` or the default."""
    if header is None:
        return time.monotonic() + settings.request_timeout_s
    try:
        seconds = float(header)
    except ValueError:
        raise BadRequest(f"X-Request-Timeout must be a number of seconds, got {header!r}") from None
    if not 0 < seconds <= 3600:
        raise InvalidOption("X-Request-Timeout must lie in (0, 3600] seconds")
    return time.monotonic() + seconds


async def decode_sources(
    sources: Sequence[Source], settings: Settings, model: ModelInfo, what: str = "file"
) -> list[Upload]:
    """Decode every file (on a thread, not the loop) into frames at the model's input size.

    The request's image budget is passed down, so a file with too many frames is refused
    from its header, before its frames are decoded.
    """
    if not sources:
        raise BadRequest(f"no {what}: send one or more images")
    budget = settings.max_images_per_request
    if len(sources) > budget:
        raise PayloadTooLarge(f"{len(sources)} images in one request; at most {budget} are accepted")
    uploads: list[Upload] = []
    for index, (filename, data) in enumerate(sources):
        limits = DecodeLimits(settings.max_image_pixels, settings.max_frames, budget - len(uploads))
        uploads.extend(await run_in_threadpool(
            _prepare, data, limits, index, filename, model.input_size
        ))
    return uploads


def _prepare(
    data: bytes, limits: DecodeLimits, index: int, filename: str | None, input_size: tuple[int, int]
) -> list[Upload]:
    return [
        Upload(index, filename, frame, resize_for_model(frame.image, input_size))
        for frame in decode_image(data, limits, filename or "")
    ]


def predict_items(model: ModelInfo, uploads: Sequence[Upload], topk: int, deadline: float) -> list[WorkItem]:
    return [_item(model, upload, topk, None, deadline) for upload in uploads]


def explain_items(
    plan: ExplainPlan, uploads: Sequence[Upload], settings: Settings, deadline: float
) -> list[WorkItem]:
    wants_display = bool({"overlay", "heatmap"} & plan.outputs)
    items = []
    for upload in uploads:
        frame = upload.frame
        mask_size = {
            "input": plan.model.input_size,
            "original": (frame.height, frame.width),
            "feature": None,
        }[plan.form.mask_size]
        shown = display_size(frame.width, frame.height, settings.overlay_max_side)
        spec = ExplainSpec(
            methods=plan.methods,
            layers=plan.layers,
            classes=plan.classes,
            mask_size=mask_size,
            display_size=(shown[1], shown[0]) if wants_display else None,
            eigen_smooth=plan.form.eigen_smooth,
            aug_smooth=plan.form.aug_smooth,
            method_params=plan.method_params,
            evaluate_steps=plan.form.eval_steps if plan.form.evaluate else None,
        )
        items.append(_item(plan.model, upload, plan.form.topk, spec, deadline))
    return items


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


async def respond(
    body: dict[str, Any],
    results: Sequence[ItemResult],
    started: float,
    encode_started: float,
    decode_ms: float | None = None,
) -> Response:
    """The body as JSON bytes, serialised on a thread, with ``timing_ms`` filled in and a
    ``Server-Timing`` header naming each stage (decode when ``decode_ms`` is given, queue,
    compute, render: masks and PNGs, json: the serialisation itself, total)."""
    return json_response(*await serialize(body, results, started, encode_started, decode_ms))


async def serialize(
    body: dict[str, Any],
    results: Sequence[ItemResult],
    started: float,
    encode_started: float,
    decode_ms: float | None = None,
) -> tuple[bytes, dict[str, float]]:
    """What :func:`respond` sends: the JSON bytes and the Server-Timing stages."""
    payload, stages = await run_in_threadpool(_serialize, body, results, started, encode_started)
    if decode_ms is not None:
        stages = {"decode": round(decode_ms, 2), **stages}
    return payload, stages


def json_response(payload: bytes, stages: dict[str, float]) -> Response:
    return Response(payload, media_type="application/json",
                    headers={"Server-Timing": server_timing(stages)})


def server_timing(stages: dict[str, float]) -> str:
    """``name;dur=ms`` entries as the ``Server-Timing`` header writes them."""
    return ", ".join(f"{name};dur={ms:g}" for name, ms in stages.items())


def parse_server_timing(header: str) -> dict[str, float]:
    """The stages of a ``Server-Timing`` header written by :func:`server_timing`."""
    stages: dict[str, float] = {}
    for entry in header.split(","):
        name, _, params = entry.strip().partition(";")
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "dur" and name:
                stages[name] = float(value)
    return stages


def _serialize(
    body: dict[str, Any], results: Sequence[ItemResult], started: float, encode_started: float
) -> tuple[bytes, dict[str, float]]:
    # Timings are filled last so "encode" covers the rendering that came before.
    now = time.perf_counter()
    timing = {
        "queue": round(max((r.queue_ms for r in results), default=0.0), 2),
        "compute": round(max((r.compute_ms for r in results), default=0.0), 2),
        "encode": round((now - encode_started) * 1000, 2),
        "total": round((now - started) * 1000, 2),
    }
    body["timing_ms"] = timing
    payload = dumps(body)
    done = time.perf_counter()
    stages = {
        "queue": timing["queue"],
        "compute": timing["compute"],
        "render": timing["encode"],
        "json": round((done - now) * 1000, 2),
        "total": round((done - started) * 1000, 2),
    }
    return payload, stages
