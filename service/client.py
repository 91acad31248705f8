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
from collections.abc import Mapping, Sequence
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
    """A mask of the contract (``list`` or ``base64`` encoding) as a float32 numpy array."""
    if mask is None:
        return None
    shape = tuple(int(n) for n in mask["shape"])
    if mask["encoding"] == "base64":
        return np.frombuffer(base64.b64decode(mask["data"]), dtype="<f4").reshape(shape).astype(np.float32)
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
        request_timeout: float | None = None, request_id: str | None = None, **extra: FormValue,
    ) -> Answer:
        """``POST /explain``. Masks travel as base64 float32 by default (smaller and exact)."""
        form = _explain_form(model, methods, target_layer, class_idx, topk, outputs, mask_size,
                             mask_encoding, colormap, alpha, extra)
        response = self.http.post("/explain", files=_files(images), data=form,
                                  headers={**self._auth, **_headers(request_timeout, request_id)})
        return parse_answer(_checked(response))

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
