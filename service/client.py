"""A typed Python client for camserve, sync and async, on httpx.

    from service.client import Client

    with Client("http://127.0.0.1:8000", api_key="...") as camserve:
        answer = camserve.explain("cat.png", methods=["gradcam", "scorecam"], outputs="mask,overlay")
        for result in answer.results:
            print(result.image.filename, result.predictions[0].label)
            mask = result.explanations[0].mask  # numpy float32 (H, W) in [0, 1]

:class:`AsyncClient` has the same methods, awaited. Errors are raised as :class:`CamserveError`
carrying the contract's status, code, message and request id. Masks arrive as numpy arrays
whichever ``mask_encoding`` was asked for; overlays and heatmaps as PNG bytes.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

# An image: its bytes, a local file to read, or (file name, bytes).
ImageInput = bytes | str | os.PathLike[str] | tuple[str, bytes]
FormValue = str | int | float | bool


class CamserveError(Exception):
    """An error answer of the service: ``{"error": {"code", "message", "request_id"}}``."""

    def __init__(self, status: int, code: str, message: str, request_id: str = "",
                 retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message
        self.request_id, self.retry_after = request_id, retry_after


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str
    input_size: tuple[int, int]


@dataclass(frozen=True)
class ImageRef:
    index: int  # position of the file among those sent
    frame: int  # frame within that file
    filename: str | None
    width: int
    height: int
    modality: str | None = None  # a DICOM's Modality
    # {"centre", "width", "source"} of the window a DICOM or 16-bit frame was shown with
    window: dict[str, Any] | None = None


@dataclass(frozen=True)
class Prediction:
    class_idx: int
    label: str
    score: float


@dataclass(frozen=True)
class Explanation:
    method: str
    target_layer: str
    class_idx: int
    label: str
    score: float
    mask: np.ndarray | None  # float32 (H, W) in [0, 1]
    overlay_png: bytes | None
    heatmap_png: bytes | None


@dataclass(frozen=True)
class Result:
    image: ImageRef
    predictions: list[Prediction]
    explanations: list[Explanation] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # e.g. a modality the model does not know
    image_png: bytes | None = None  # the frame as the service displayed it (outputs=image)


@dataclass(frozen=True)
class Answer:
    """What ``predict`` and ``explain`` return: one result per image or frame, in order."""

    request_id: str
    model: ModelRef
    results: list[Result]
    timing_ms: dict[str, float]


@dataclass(frozen=True)
class Job:
    """A job as ``GET /jobs/{id}`` shows it; ``answer`` once it has succeeded."""

    job_id: str
    status: str  # queued | running | succeeded | failed | cancelled
    done: int  # passes run
    total: int  # passes to run
    eta_s: float | None
    answer: Answer | None = None
    error: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        return self.status in ("succeeded", "failed", "cancelled")


ProgressCallback = Callable[[Job], None]


# Requests and answers, shared by both clients --------------------------------------------

def _joined(value: str | int | Sequence[str] | Sequence[int] | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    return ",".join(str(v) for v in value)


def _files(images: ImageInput | Sequence[ImageInput]) -> list[tuple[str, tuple[str, bytes]]]:
    items: Sequence[ImageInput]
    if isinstance(images, bytes | str | os.PathLike) or (
        isinstance(images, tuple) and len(images) == 2 and isinstance(images[1], bytes)
    ):
        items = [images]  # type: ignore[list-item]
    else:
        items = images
    parts = []
    for number, item in enumerate(items):
        if isinstance(item, bytes):
            name, data = f"image-{number}", item
        elif isinstance(item, tuple):
            name, data = item
        else:
            path = Path(item)
            name, data = path.name, path.read_bytes()
        parts.append(("file", (name, data)))
    if not parts:
        raise ValueError("no image given")
    return parts


def _form(options: Mapping[str, FormValue | None]) -> dict[str, str]:
    form = {}
    for key, value in options.items():
        if value is None:
            continue
        form[key] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return form


def _headers(request_timeout: float | None, request_id: str | None) -> dict[str, str]:
    headers = {}
    if request_timeout is not None:
        headers["X-Request-Timeout"] = str(request_timeout)
    if request_id is not None:
        headers["X-Request-ID"] = request_id
    return headers


def _explain_form(
    model: str | None, methods: str | Sequence[str], target_layer: str | Sequence[str] | None,
    class_idx: int | Sequence[int] | None, topk: int, outputs: str | Sequence[str],
    mask_size: str, mask_encoding: str, colormap: str, alpha: float,
    extra: Mapping[str, FormValue],
) -> dict[str, str]:
    return _form({
        "model": model, "methods": _joined(methods), "target_layer": _joined(target_layer),
        "class_idx": _joined(class_idx), "topk": topk, "outputs": _joined(outputs),
        "mask_size": mask_size, "mask_encoding": mask_encoding, "colormap": colormap,
        "alpha": alpha, **extra,
    })


def _checked(response: httpx.Response) -> dict[str, Any]:
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
            code, message, request_id = error["code"], error["message"], error.get("request_id", "")
        except (ValueError, KeyError, TypeError):
            code, message = "http_error", response.text[:500] or response.reason_phrase
            request_id = response.headers.get("X-Request-ID", "")
        retry = response.headers.get("Retry-After")
        raise CamserveError(response.status_code, code, message, request_id,
                            float(retry) if retry else None)
    return response.json()


def decode_mask(mask: Mapping[str, Any] | None) -> np.ndarray | None:
    """A mask of the contract (``list`` or ``base64`` encoding, any ``dtype``: float32,
    float16, uint8 as value x 255) as a float32 numpy array in [0, 1]."""
    if mask is None:
        return None
    shape = tuple(int(n) for n in mask["shape"])
    if mask["encoding"] == "base64":
        dtype = str(mask.get("dtype", "float32"))
        wire = {"float32": "<f4", "float16": "<f2", "uint8": "u1"}.get(dtype)
        if wire is None:
            raise ValueError(f"unknown mask dtype {dtype!r}")
        values = np.frombuffer(base64.b64decode(mask["data"]), dtype=wire).reshape(shape).astype(np.float32)
        return values / np.float32(255.0) if dtype == "uint8" else values
    return np.asarray(mask["data"], dtype=np.float32).reshape(shape)


def _png(data: str | None) -> bytes | None:
    return base64.b64decode(data) if data else None


def _result(item: Mapping[str, Any], explanations: Sequence[Mapping[str, Any]] = ()) -> Result:
    return Result(
        # Only the fields this client knows: a newer service may add more.
        image=ImageRef(**{k: v for k, v in item["image"].items() if k in _IMAGE_FIELDS}),
        predictions=[Prediction(**p) for p in item["predictions"]],
        explanations=[
            Explanation(
                method=e["method"], target_layer=e["target_layer"], class_idx=e["class_idx"],
                label=e["label"], score=e["score"], mask=decode_mask(e.get("mask")),
                overlay_png=_png(e.get("overlay_png")), heatmap_png=_png(e.get("heatmap_png")),
            )
            for e in explanations
        ],
        warnings=list(item.get("warnings") or ()),
        image_png=_png(item.get("image_png")),
    )


_IMAGE_FIELDS = frozenset(ImageRef.__dataclass_fields__)


def parse_answer(body: Mapping[str, Any]) -> Answer:
    """An ``/explain`` or ``/predict`` body (or a KServe V1 one) as an :class:`Answer`."""
    if "results" in body:
        results = [_result(r, r.get("explanations", ())) for r in body["results"]]
    else:  # KServe V1: predictions and explanations side by side
        explanations = body.get("explanations") or [[] for _ in body["predictions"]]
        results = [_result(p, e) for p, e in zip(body["predictions"], explanations, strict=True)]
    model = body["model"]
    return Answer(
        request_id=body["request_id"],
        model=ModelRef(model["name"], model["version"], tuple(model["input_size"])),
        results=results,
        timing_ms=dict(body.get("timing_ms", {})),
    )


def parse_job(body: Mapping[str, Any]) -> Job:
    """A job object of the contract as a :class:`Job`."""
    progress = body.get("progress") or {}
    result = body.get("result")
    return Job(
        job_id=str(body["job_id"]), status=str(body["status"]),
        done=int(progress.get("done", 0)), total=int(progress.get("total", 0)),
        eta_s=body.get("eta_s"), answer=parse_answer(result) if result else None,
        error=body.get("error"),
    )


def _job_outcome(job: Job) -> Answer:
    """The answer of a finished job; a failed or cancelled one raises its error."""
    if job.status == "succeeded" and job.answer is not None:
        return job.answer
    error = job.error or {}
    status = 499 if job.status == "cancelled" else 500
    raise CamserveError(status, str(error.get("code", job.status)),
                        str(error.get("message", f"the job {job.status}")), str(error.get("request_id", "")))


class _EventReader:
    """Server-sent events, a line at a time: ``feed`` returns (event, data) at each data line."""

    def __init__(self) -> None:
        self.name = "message"

    def feed(self, line: str) -> tuple[str, dict[str, Any]] | None:
        import json

        if line.startswith("event:"):
            self.name = line[len("event:"):].strip()
        elif line.startswith("data:"):
            return self.name, json.loads(line[len("data:"):])
        return None


def _follow(job_id: str, event: tuple[str, dict[str, Any]], progress: ProgressCallback | None) -> Job | None:
    """Report one event; the final job when it is the ``done`` event."""
    name, data = event
    update = parse_job(data) if name == "done" else _progress_update(job_id, data)
    if progress is not None:
        progress(update)
    return update if name == "done" else None


def _progress_update(job_id: str, data: Mapping[str, Any]) -> Job:
    return Job(job_id=job_id, status="running", done=int(data.get("done", 0)),
               total=int(data.get("total", 0)), eta_s=data.get("eta_s"))


class _Bar:
    """A tqdm bar of a job's passes (tqdm draws on a terminal, plain lines elsewhere)."""

    def __init__(self, description: str) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=0, desc=description, unit="pass", dynamic_ncols=True)

    def __call__(self, job: Job) -> None:
        if job.total and self._bar.total != job.total:
            self._bar.total = job.total
        self._bar.n = job.done
        if job.eta_s is not None:
            self._bar.set_postfix_str(f"eta {job.eta_s:.0f} s", refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


def _http_options(api_key: str | None) -> dict[str, Any]:
    return {"headers": {"Authorization": f"Bearer {api_key}"}} if api_key else {}


# The clients -----------------------------------------------------------------------------

class Client:
    """Blocking client. Pass ``http_client`` to reuse a configured ``httpx.Client`` (its base
    URL is then used); otherwise one is made for ``base_url`` and closed with this client."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, api_key: str | None = None,
                 timeout: float = 60.0, http_client: httpx.Client | None = None) -> None:
        self._owned = http_client is None
        self.http = http_client or httpx.Client(base_url=base_url, timeout=timeout)
        self._auth = _http_options(api_key).get("headers", {})

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._owned:
            self.http.close()

    def explain(
        self, images: ImageInput | Sequence[ImageInput], *, model: str | None = None,
        methods: str | Sequence[str] = "gradcam", target_layer: str | Sequence[str] | None = None,
        class_idx: int | Sequence[int] | None = None, topk: int = 5,
        outputs: str | Sequence[str] = "mask,overlay", mask_size: str = "input",
        mask_encoding: str = "base64", colormap: str = "jet", alpha: float = 0.5,
        request_timeout: float | None = None, request_id: str | None = None,
        progress: bool = False, **extra: FormValue,
    ) -> Answer:
        """``POST /explain``. Masks travel as base64 float32 by default (smaller and exact).

        ``progress=True`` submits the request as a job instead and draws a tqdm bar of its
        passes until it is done (the answer is the same)."""
        form = _explain_form(model, methods, target_layer, class_idx, topk, outputs, mask_size,
                             mask_encoding, colormap, alpha, extra)
        if progress:
            job = self._submit(images, form, request_id)
            bar = _Bar(f"{_joined(methods)} job {job.job_id[:8]}")
            try:
                return self.wait_job(job.job_id, progress=bar)
            finally:
                bar.close()
        response = self.http.post("/explain", files=_files(images), data=form,
                                  headers={**self._auth, **_headers(request_timeout, request_id)})
        return parse_answer(_checked(response))

    def submit_job(
        self, images: ImageInput | Sequence[ImageInput], *, model: str | None = None,
        methods: str | Sequence[str] = "gradcam", target_layer: str | Sequence[str] | None = None,
        class_idx: int | Sequence[int] | None = None, topk: int = 5,
        outputs: str | Sequence[str] = "mask,overlay", mask_size: str = "input",
        mask_encoding: str = "base64", colormap: str = "jet", alpha: float = 0.5,
        request_id: str | None = None, **extra: FormValue,
    ) -> Job:
        """``POST /jobs``: the same options as :meth:`explain`; returns the queued job."""
        form = _explain_form(model, methods, target_layer, class_idx, topk, outputs, mask_size,
                             mask_encoding, colormap, alpha, extra)
        return self._submit(images, form, request_id)

    def _submit(self, images: ImageInput | Sequence[ImageInput], form: dict[str, str],
                request_id: str | None) -> Job:
        response = self.http.post("/jobs", files=_files(images), data=form,
                                  headers={**self._auth, **_headers(None, request_id)})
        return parse_job(_checked(response))

    def job(self, job_id: str) -> Job:
        """``GET /jobs/{id}``."""
        return parse_job(_checked(self.http.get(f"/jobs/{job_id}", headers=self._auth)))

    def cancel_job(self, job_id: str) -> Job:
        """``DELETE /jobs/{id}``: no further pass of the job runs."""
        return parse_job(_checked(self.http.delete(f"/jobs/{job_id}", headers=self._auth)))

    def wait_job(self, job_id: str, progress: ProgressCallback | None = None) -> Answer:
        """Follow the job's events until it ends; ``progress(job)`` on every report. Returns
        its answer, or raises :class:`CamserveError` when it failed or was cancelled."""
        with self.http.stream("GET", f"/jobs/{job_id}/events", headers=self._auth,
                              timeout=httpx.Timeout(30.0, read=None)) as response:
            if response.status_code >= 400:
                response.read()
                _checked(response)
            reader = _EventReader()
            for line in response.iter_lines():
                event = reader.feed(line)
                final = _follow(job_id, event, progress) if event else None
                if final is not None:
                    return _job_outcome(final)
        return _job_outcome(self.job(job_id))  # the stream ended early: ask once more

    def predict(
        self, images: ImageInput | Sequence[ImageInput], *, model: str | None = None, topk: int = 5,
        request_timeout: float | None = None, request_id: str | None = None,
    ) -> Answer:
        """``POST /predict``: classes only."""
        response = self.http.post("/predict", files=_files(images),
                                  data=_form({"model": model, "topk": topk}),
                                  headers={**self._auth, **_headers(request_timeout, request_id)})
        return parse_answer(_checked(response))

    def models(self) -> list[dict[str, Any]]:
        """``GET /models``: the registered models."""
        return list(_checked(self.http.get("/models", headers=self._auth))["models"])

    def ready(self) -> bool:
        """Whether ``GET /readyz`` answers 200."""
        return self.http.get("/readyz").status_code == 200


class AsyncClient:
    """The same as :class:`Client`, for asyncio code (``httpx.AsyncClient`` underneath)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, api_key: str | None = None,
                 timeout: float = 60.0, http_client: httpx.AsyncClient | None = None) -> None:
        self._owned = http_client is None
        self.http = http_client or httpx.AsyncClient(base_url=base_url, timeout=timeout)
        self._auth = _http_options(api_key).get("headers", {})

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owned:
            await self.http.aclose()

    async def explain(
        self, images: ImageInput | Sequence[ImageInput], *, model: str | None = None,
        methods: str | Sequence[str] = "gradcam", target_layer: str | Sequence[str] | None = None,
        class_idx: int | Sequence[int] | None = None, topk: int = 5,
        outputs: str | Sequence[str] = "mask,overlay", mask_size: str = "input",
        mask_encoding: str = "base64", colormap: str = "jet", alpha: float = 0.5,
        request_timeout: float | None = None, request_id: str | None = None, **extra: FormValue,
    ) -> Answer:
        form = _explain_form(model, methods, target_layer, class_idx, topk, outputs, mask_size,
                             mask_encoding, colormap, alpha, extra)
        response = await self.http.post("/explain", files=_files(images), data=form,
                                        headers={**self._auth, **_headers(request_timeout, request_id)})
        return parse_answer(_checked(response))

    async def submit_job(
        self, images: ImageInput | Sequence[ImageInput], *, model: str | None = None,
        methods: str | Sequence[str] = "gradcam", target_layer: str | Sequence[str] | None = None,
        class_idx: int | Sequence[int] | None = None, topk: int = 5,
        outputs: str | Sequence[str] = "mask,overlay", mask_size: str = "input",
        mask_encoding: str = "base64", colormap: str = "jet", alpha: float = 0.5,
        request_id: str | None = None, **extra: FormValue,
    ) -> Job:
        form = _explain_form(model, methods, target_layer, class_idx, topk, outputs, mask_size,
                             mask_encoding, colormap, alpha, extra)
        response = await self.http.post("/jobs", files=_files(images), data=form,
                                        headers={**self._auth, **_headers(None, request_id)})
        return parse_job(_checked(response))

    async def job(self, job_id: str) -> Job:
        return parse_job(_checked(await self.http.get(f"/jobs/{job_id}", headers=self._auth)))

    async def cancel_job(self, job_id: str) -> Job:
        return parse_job(_checked(await self.http.delete(f"/jobs/{job_id}", headers=self._auth)))

    async def wait_job(self, job_id: str, progress: ProgressCallback | None = None) -> Answer:
        async with self.http.stream("GET", f"/jobs/{job_id}/events", headers=self._auth,
                                    timeout=httpx.Timeout(30.0, read=None)) as response:
            if response.status_code >= 400:
                await response.aread()
                _checked(response)
            reader = _EventReader()
            async for line in response.aiter_lines():
                event = reader.feed(line)
                final = _follow(job_id, event, progress) if event else None
                if final is not None:
                    return _job_outcome(final)
        return _job_outcome(await self.job(job_id))

    async def predict(
        self, images: ImageInput | Sequence[ImageInput], *, model: str | None = None, topk: int = 5,
        request_timeout: float | None = None, request_id: str | None = None,
    ) -> Answer:
        response = await self.http.post("/predict", files=_files(images),
                                        data=_form({"model": model, "topk": topk}),
                                        headers={**self._auth, **_headers(request_timeout, request_id)})
        return parse_answer(_checked(response))

    async def models(self) -> list[dict[str, Any]]:
        return list(_checked(await self.http.get("/models", headers=self._auth))["models"])

    async def ready(self) -> bool:
        return (await self.http.get("/readyz")).status_code == 200
