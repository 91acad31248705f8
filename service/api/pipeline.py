"""What every inference route shares, whatever its wire format (multipart, KServe JSON, a job,
a PACS): decode under the limits, build work items, set the deadline, render and serialise off
the loop, with one :class:`Timer` per request (:func:`prepare_predict`, :func:`prepare_explain`,
:func:`finish`)."""

from __future__ import annotations

import asyncio
import contextvars
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import lru_cache, partial
from typing import Any, TypeVar

from fastapi import Response, UploadFile
from PIL import Image

from service.api import dicom_results
from service.api.options import ExplainPlan
from service.api.render import (
    Upload,
    check_response_size,
    dumps,
    explain_results,
    model_ref,
    original_mask_size,
    predict_results,
)
from service.config import Settings
from service.engine.jobs import ExplainSpec, ItemResult, WorkItem
from service.errors import BadRequest, InvalidOption, PayloadTooLarge
from service.imaging.decode import DecodeLimits, declared_bytes, iter_frames, shrink
from service.imaging.encode import display_size
from service.imaging.encoded import routed_frame
from service.imaging.limits import MB, ByteBudget, megabytes
from service.imaging.preprocess import resize_for_model
from service.models.catalog import ModelInfo

Source = tuple[str | None, bytes]  # (file name if any, the file's bytes)
_T = TypeVar("_T")


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
    sources: Sequence[Source],
    settings: Settings,
    model: ModelInfo,
    what: str = "file",
    *,
    deadline: float | None = None,
    admit: Callable[[int], None] | None = None,
    display: bool = True,
    window: tuple[float, float] | None = None,
    on_device: bool = False,
    shows_image: bool = False,
) -> list[Upload]:
    """Decode every file (in the decode pool, not on the loop) into frames at the model's
    input size, under the request's limits.

    ``admit`` (the engine's) refuses the request before any decoding when the service could
    not take it anyway (queue full, draining, not ready). The image budget, the decoded-bytes
    budget and ``deadline`` are passed down, so a file is refused from its header and a slow
    one stopped between frames. ``display``: overlays will be drawn, so frames are kept at up
    to the overlay size; else at the model's input size only. ``window``: (centre, width) for
    DICOM and 16-bit frames instead of their own (see decode.iter_frames). ``on_device``:
    the workers decode baseline JPEGs themselves (Engine.jpeg_on_device), so those are read
    and checked here but handed over as bytes (service.imaging.encoded); ``shows_image``: the
    response shows the image (overlay, heatmap, image_png), so such a worker sends it back.
    """
    if not sources:
        raise BadRequest(f"no {what}: send one or more images")
    budget = settings.max_images_per_request
    if len(sources) > budget:
        raise PayloadTooLarge(f"{len(sources)} images in one request; at most {budget} are accepted")
    if admit is not None:
        admit(len(sources))  # every file is one image at least
    if deadline is None:
        deadline = time.monotonic() + settings.request_timeout_s
    keep = (settings.overlay_max_side if display else 0, max(model.input_size))
    # One trip to the decode pool for the whole request (each trip costs the loop and the
    # threads a hand-over): the headers, then every file in order.
    route = _Route(settings.overlay_max_side, shows_image) if on_device else None
    return await _in_decode_pool(
        settings, _decode_all, sources, settings, model.input_size, what, deadline, keep, window, route)


@dataclass(frozen=True)
class _Route:
    """JPEGs go to the workers as bytes: the overlay cap, and whether they send the image back."""

    max_side: int
    shows_image: bool


def _decode_all(
    sources: Sequence[Source], settings: Settings, input_size: tuple[int, int], what: str,
    deadline: float, keep: tuple[int, int], window: tuple[float, float] | None,
    route: _Route | None = None,
) -> list[Upload]:
    decoded = ByteBudget(int(settings.max_decoded_mb_per_request * MB))
    # Every file's header before any file's pixels: a request whose files together declare more
    # than its decoded-bytes budget is refused before the first one is decoded.
    declared = sum(declared_bytes(data, keep) for _, data in sources)
    if declared > decoded.limit:
        raise PayloadTooLarge(
            f"the {len(sources)} {what}s declare {megabytes(declared)} of decoded pixels in their "
            f"headers, over the limit of {megabytes(decoded.limit)} decoded per request; send "
            "fewer or smaller images"
        )
    uploads: list[Upload] = []
    for index, (filename, data) in enumerate(sources):
        limits = DecodeLimits(
            settings.max_image_pixels, settings.max_frames, settings.max_images_per_request - len(uploads),
            max_frame_bytes=int(settings.max_decoded_mb_per_frame * MB), request_bytes=decoded,
            deadline=deadline, allow_truncated=settings.allow_truncated_images, reduce_to=keep,
        )
        routed = routed_frame(data, limits, filename, route.max_side, route.shows_image) if route else None
        if routed is not None:
            uploads.append(Upload(index, filename, routed[0], None, encoded=routed[1]))
        else:
            uploads.extend(_prepare(data, limits, index, filename, input_size, window))
    return uploads


async def _in_decode_pool(settings: Settings, fn: Callable[..., _T], *args: Any) -> _T:
    """Run ``fn`` on the decode pool: decoding is bounded by its own threads and cannot take
    every thread of the pool that rendering and the routes' other blocking work share."""
    pool = _decode_pool(settings.decode_threads or _cores())
    context = contextvars.copy_context()  # request id and the like, for log lines
    return await asyncio.get_running_loop().run_in_executor(pool, partial(context.run, fn, *args))


@lru_cache(maxsize=4)
def _decode_pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="camserve-decode")


async def _in_render_pool(fn: Callable[..., _T], *args: Any) -> _T:
    """Run ``fn`` on the render pool: a plain executor hand-over costs the loop less than
    starlette's ``run_in_threadpool`` (anyio's limiter and cancel scopes) for every request,
    and its own threads keep finished results from waiting behind decodes."""
    context = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(
        _render_pool(max(4, 2 * _cores())), partial(context.run, fn, *args))


@lru_cache(maxsize=4)
def _render_pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="camserve-render")


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _prepare(
    data: bytes, limits: DecodeLimits, index: int, filename: str | None,
    input_size: tuple[int, int], window: tuple[float, float] | None = None,
) -> list[Upload]:
    # Each frame is brought to the model's size, and to what overlays need, before the next
    # is decoded: a request holds small copies, never all of its full-size frames at once.
    return [
        Upload(index, filename, shrink(frame, limits.reduce_to), resize_for_model(frame.image, input_size))
        for frame in iter_frames(data, limits, filename or "", window)
    ]


def predict_items(model: ModelInfo, uploads: Sequence[Upload], topk: int, deadline: float) -> list[WorkItem]:
    return [_item(model, upload, topk, None, deadline) for upload in uploads]


def explain_items(
    plan: ExplainPlan, uploads: Sequence[Upload], settings: Settings, deadline: float
) -> list[WorkItem]:
    """The work items of an explanation, once its response is known to fit the limit."""
    check_response_size(plan, uploads, settings,
                        more=lambda upload, maps: dicom_results.response_bytes(plan, upload, maps))
    wants_display = bool({"overlay", "heatmap"} & plan.outputs)
    form = plan.form
    overlay = ((form.colormap, float(form.alpha), form.overlay_mode == "fade")
               if "overlay" in plan.outputs else None)
    items = []
    for upload in uploads:
        frame = upload.frame
        dicom_size = dicom_results.map_size(plan, upload)
        mask_size = {
            "input": plan.model.input_size,
            "original": original_mask_size(frame, settings),
            "feature": None,
        }[plan.form.mask_size]
        shown = display_size(frame.width, frame.height, settings.overlay_max_side)
        spec = ExplainSpec(
            methods=plan.methods,
            layers=plan.layers,
            classes=plan.classes,
            mask_size=mask_size,
            # DICOM objects need the map at the source's own size, uncapped (dicom_results).
            display_size=dicom_size or ((shown[1], shown[0]) if wants_display else None),
            eigen_smooth=plan.form.eigen_smooth,
            aug_smooth=plan.form.aug_smooth,
            method_params=plan.method_params,
            evaluate_steps=plan.form.eval_steps if plan.form.evaluate else None,
            mask_wanted="mask" in plan.outputs,
            overlay=overlay,
            # Only an overlay reads the display map: a worker that drew it copies none back.
            display_wanted=dicom_size is not None or "heatmap" in plan.outputs,
        )
        item = _item(plan.model, upload, plan.form.topk, spec, deadline)
        if overlay is not None and upload.encoded is None and frame.image.size == shown:
            # The frame is already at the display size (else the API resizes and draws it as
            # before): a reference, no copy; only a worker that draws overlays reads it.
            item.overlay_base = frame.image
        items.append(item)
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
        encoded=upload.encoded,
    )


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


# --- the one request pipeline: resolve, decode, submit, render, respond --------------------
#
# /predict, /explain, KServe's :predict and :explain, /jobs and /dicomweb/explain all run it;
# they differ only in where the images come from and how the rendered results are laid out in
# the body, so timing_ms, Server-Timing and the metrics mean the same on every transport.


class Timer:
    """A request's clock: when it started, how long decoding took, when rendering began."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.decode_ms: float | None = None
        self.render_started = self.started

    async def decode(self, work: Awaitable[_T]) -> _T:
        began = time.perf_counter()
        try:
            return await work
        finally:
            self.decode_ms = (time.perf_counter() - began) * 1000

    def rendering(self) -> None:
        self.render_started = time.perf_counter()


@dataclass
class Prepared:
    """A request checked and decoded, its work items built, nothing queued yet."""

    model: ModelInfo
    plan: ExplainPlan | None  # None for /predict
    uploads: list[Upload]
    items: list[WorkItem]
    timer: Timer


async def read_files(parts: Sequence[UploadFile]) -> list[Source]:
    return [(part.filename, await part.read()) for part in parts]


async def prepare_predict(
    model: ModelInfo, topk: int, sources: Sequence[Source], settings: Settings, deadline: float,
    admit: Callable[[int], None], what: str = "file", timer: Timer | None = None,
    on_device: bool = False,
) -> Prepared:
    """``on_device``: the engine's workers decode baseline JPEGs (Engine.jpeg_on_device)."""
    timer = timer or Timer()
    uploads = await timer.decode(decode_sources(
        sources, settings, model, what, deadline=deadline, admit=admit, display=False,
        on_device=on_device))
    return Prepared(model, None, uploads, predict_items(model, uploads, topk, deadline), timer)


async def prepare_explain(
    plan: ExplainPlan, sources: Sequence[Source], settings: Settings, deadline: float,
    admit: Callable[[int], None], what: str = "file", timer: Timer | None = None,
    on_device: bool = False,
) -> Prepared:
    """``on_device``: the engine's workers decode baseline JPEGs (Engine.jpeg_on_device);
    not for DICOM outputs, which are built from the host's frame."""
    timer = timer or Timer()
    uploads = await timer.decode(decode_sources(
        sources, settings, plan.model, what, deadline=deadline, admit=admit, window=plan.window,
        on_device=on_device and not dicom_results.wanted(plan),
        shows_image=bool({"overlay", "heatmap", "image"} & plan.outputs)))
    dicom_results.check(plan, uploads)  # a DICOM output of a file that cannot have it: 422 now
    items = explain_items(plan, uploads, settings, deadline)
    return Prepared(plan.model, plan, uploads, items, timer)


Layout = Callable[[list[dict[str, Any]]], dict[str, Any]]


def as_results(rendered: list[dict[str, Any]]) -> dict[str, Any]:
    """The contract's own layout: ``results``, one per image or frame."""
    return {"results": rendered}


async def finish(
    prepared: Prepared, results: Sequence[ItemResult], request_id: str, settings: Settings,
    layout: Layout = as_results, extra: Mapping[str, Any] | None = None, dicom: bool = True,
) -> tuple[bytes, dict[str, float]]:
    """Render (masks, PNGs) and serialise off the loop: the body's JSON bytes and the
    Server-Timing stages (decode, queue, compute, render, json, total). ``dicom=False``: no
    DICOM objects in the body (the caller has them already, or stored them)."""
    timer = prepared.timer
    timer.rendering()
    # Rendering and serialising in one hand-over to the render pool, not two.
    payload, stages = await _in_render_pool(
        _render_and_serialize, prepared, results, request_id, settings, layout, extra, dicom)
    if timer.decode_ms is not None:
        stages = {"decode": round(timer.decode_ms, 2), **stages}
    return payload, stages


def _render_and_serialize(
    prepared: Prepared, results: Sequence[ItemResult], request_id: str, settings: Settings,
    layout: Layout, extra: Mapping[str, Any] | None, dicom: bool,
) -> tuple[bytes, dict[str, float]]:
    entries: list[dict[str, Any]] | None = None
    prepared = _with_decoded_images(prepared, results)
    if prepared.plan is not None:
        rendered, entries = _render_explain(prepared, results, settings, dicom)
    else:
        rendered = predict_results(prepared.model, prepared.uploads, results)
    body = {"request_id": request_id, "model": model_ref(prepared.model), **layout(rendered),
            **({"dicom": entries} if entries is not None else {}), **(extra or {})}
    return _serialize(body, results, prepared.timer.started, prepared.timer.render_started)


def _with_decoded_images(prepared: Prepared, results: Sequence[ItemResult]) -> Prepared:
    """The uploads a worker decoded with the image it sent back as their frame's image (at
    the display size, as the host's shrunk frame would be), so rendering reads no JPEG."""
    if not any(upload.encoded is not None for upload in prepared.uploads):
        return prepared
    uploads = [
        replace(upload, frame=replace(upload.frame, image=Image.fromarray(result.image)))
        if upload.encoded is not None and result.image is not None else upload
        for upload, result in zip(prepared.uploads, results, strict=True)
    ]
    return replace(prepared, uploads=uploads)


def _render_explain(
    prepared: Prepared, results: Sequence[ItemResult], settings: Settings, dicom: bool = True
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Masks and PNGs of every result, and the DICOM objects' entries when they were asked for."""
    plan = prepared.plan
    assert plan is not None
    rendered = explain_results(plan, prepared.uploads, results, settings.png_compress_level,
                               settings.overlay_max_side)
    if not dicom or not dicom_results.wanted(plan):
        return rendered, None
    return rendered, dicom_results.json_entries(dicom_results.build(plan, prepared.uploads, results))
