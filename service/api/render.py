"""Building response bodies off the event loop: masks, PNGs and the JSON bytes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy as np
import orjson
from PIL import Image

from service.api.options import ExplainPlan
from service.config import Settings
from service.engine.jobs import ItemResult, MapResult
from service.errors import PayloadTooLarge
from service.imaging import encode
from service.imaging.decode import Frame
from service.imaging.encoded import EncodedImage
from service.imaging.limits import MB, megabytes
from service.models.catalog import ModelInfo


@dataclass(frozen=True)
class Upload:
    """One decoded frame with where it came from."""

    index: int
    filename: str | None
    frame: Frame
    pixels: np.ndarray | None  # (H, W, 3) uint8 at the model's input size; None: ``encoded``
    # A JPEG left for a CUDA worker to decode (service.imaging.encoded): ``frame`` then has
    # its size and an undecoded image, replaced by the worker's decoded one before rendering.
    encoded: EncodedImage | None = None


# Upper bounds, in bytes as sent. A float32 in [0, 1] is at most 15 characters as JSON
# ("1.2345678e-38,"); a PNG is at most its raw rows plus zlib's stored-block framing; base64
# adds a third. What is not a map (labels, scores, names) is a few hundred bytes each.
_LIST_VALUE = 15
_PER_EXPLANATION = 512
_PER_RESULT = 1024
_PER_PREDICTION = 96
_MASK_BYTES = {"float32": 4, "float16": 2, "uint8": 1}  # per value of a base64 mask


def original_mask_size(frame: Frame, settings: Settings) -> tuple[int, int]:
    """(height, width) of a mask_size=original mask: the frame's, the longer side capped."""
    width, height = encode.display_size(frame.width, frame.height, settings.mask_side)
    return height, width


def check_response_size(
    plan: ExplainPlan, uploads: Sequence[Upload], settings: Settings,
    more: Callable[[Upload, int], int] | None = None,
) -> None:
    """Refuse (413) an explanation whose response would be over the limit, before any work.
    ``more(upload, maps)``: bytes other parts of the answer add (the DICOM objects)."""
    limit = int(settings.max_response_mb * MB)
    maps_per_image = len(plan.methods) * len(plan.classes or (0,))
    estimate = sum(_result_bytes(plan, upload, settings)
                   + (more(upload, maps_per_image) if more else 0) for upload in uploads)
    if estimate <= limit:
        return
    maps = len(uploads) * len(plan.methods) * len(plan.classes or (0,))
    advice = ["fewer images, classes or methods"]
    if "mask" in plan.outputs:
        if plan.form.mask_encoding == "list":
            advice.append("mask_encoding=base64 (a third of the size of lists)")
        if plan.form.mask_size == "original":
            advice.append("mask_size=input")
    if {"overlay", "heatmap"} & plan.outputs:
        advice.append("fewer outputs (overlay and heatmap are PNGs at up to "
                      f"{settings.overlay_max_side} pixels a side)")
    raise PayloadTooLarge(
        f"the response would be up to {megabytes(estimate)} ({maps} maps over {len(uploads)} "
        f"images), over the limit of {megabytes(limit)}; ask for " + ", ".join(advice)
    )


def _result_bytes(plan: ExplainPlan, upload: Upload, settings: Settings) -> int:
    frame = upload.frame
    per_map = _PER_EXPLANATION
    if "mask" in plan.outputs:
        # A feature grid is never larger than the model's input.
        height, width = (
            original_mask_size(frame, settings) if plan.form.mask_size == "original"
            else plan.model.input_size
        )
        values = height * width
        per_map += (values * _LIST_VALUE + height * 2 if plan.form.mask_encoding == "list"
                    else _base64(_MASK_BYTES[plan.form.mask_dtype] * values))
    shown_w, shown_h = encode.display_size(frame.width, frame.height, settings.overlay_max_side)
    for output, channels in (("overlay", 3), ("heatmap", 4)):
        if output in plan.outputs:
            per_map += _base64(_png_bound(shown_w, shown_h, channels))
    maps = len(plan.methods) * len(plan.classes or (0,))
    image = _base64(_png_bound(shown_w, shown_h, 3)) if "image" in plan.outputs else 0
    return _PER_RESULT + image + plan.form.topk * _PER_PREDICTION + maps * per_map


def _png_bound(width: int, height: int, channels: int) -> int:
    raw = (width * channels + 1) * height  # a filter byte per row
    return raw + 5 * (raw // 16_383 + 1) + 1024  # stored blocks, chunk headers, metadata


def _base64(nbytes: int) -> int:
    return 4 * -(-nbytes // 3)


def dumps(body: dict[str, Any]) -> bytes:
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def model_ref(model: ModelInfo) -> dict[str, Any]:
    return {"name": model.name, "version": model.version, "input_size": list(model.input_size)}


def image_info(upload: Upload) -> dict[str, Any]:
    frame = upload.frame
    info: dict[str, Any] = {
        "index": upload.index,
        "frame": frame.frame,
        "filename": upload.filename,
        "width": frame.width,
        "height": frame.height,
    }
    # Only where they say something (DICOM, 16-bit): a photo's answer keeps its old shape.
    if frame.modality is not None:
        info["modality"] = frame.modality
    if frame.window is not None:
        info["window"] = {"centre": round(frame.window[0], 4), "width": round(frame.window[1], 4),
                          "source": frame.window_source}
    return info


def input_warnings(model: ModelInfo, upload: Upload) -> list[str]:
    """What a reviewer should know about this input before trusting the answer: a DICOM of a
    modality the model was not trained on."""
    modality = upload.frame.modality
    if modality is None or modality in model.modalities:
        return []
    trained = model.domain or (
        "DICOM modalities " + ", ".join(model.modalities) if model.modalities
        else "data it does not declare"
    )
    return [f"{modality} input: this model ({model.name}) was trained on {trained}, not {modality}; "
            "its classes and maps may mean nothing for this image"]


def predictions(model: ModelInfo, result: ItemResult) -> list[dict[str, Any]]:
    return [
        {"class_idx": idx, "label": model.labels[idx], "score": round(score, 6)}
        for idx, score in result.predictions
    ]


def predict_results(
    model: ModelInfo, uploads: Sequence[Upload], results: Sequence[ItemResult]
) -> list[dict[str, Any]]:
    return [
        {"image": image_info(u), "predictions": predictions(model, r),
         "warnings": input_warnings(model, u)}
        for u, r in zip(uploads, results, strict=True)
    ]


def display_image(frame: Frame, max_side: int) -> Image.Image:
    """The image overlays are drawn on: the frame at display_size (the worker's display maps
    have the same size)."""
    width, height = encode.display_size(frame.width, frame.height, max_side)
    image = frame.image
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.BILINEAR)


def explain_results(
    plan: ExplainPlan, uploads: Sequence[Upload], results: Sequence[ItemResult], compress_level: int,
    max_side: int = 1024,
) -> list[dict[str, Any]]:
    """``max_side``: the overlay cap (settings.overlay_max_side), the size of ``image_png``."""
    out = []
    for upload, result in zip(uploads, results, strict=True):
        display = None
        frame = upload.frame
        if {"overlay", "heatmap", "image"} & plan.outputs:
            display = display_image(frame, max_side)
        body: dict[str, Any] = {
            "image": image_info(upload),
            "predictions": predictions(plan.model, result),
            "warnings": input_warnings(plan.model, upload),
            "explanations": [
                _explanation(plan, item, display, compress_level, frame)
                for item in result.explanations
            ],
        }
        if "image" in plan.outputs:
            assert display is not None
            body["image_png"] = encode.png_base64(np.asarray(display), compress_level)
        out.append(body)
    return out


def _drawn(overlay: np.ndarray | None, display: Image.Image) -> TypeGuard[np.ndarray]:
    return overlay is not None and overlay.shape[:2] == (display.height, display.width)


def _fit_map(values: np.ndarray, image: Image.Image) -> np.ndarray:
    """The map at the image's size (bilinear), when it was computed larger for a DICOM output."""
    if values.shape == (image.height, image.width):
        return values
    resized = Image.fromarray(np.ascontiguousarray(values, dtype=np.float32)).resize(
        image.size, Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def _explanation(
    plan: ExplainPlan, item: MapResult, display: Image.Image | None, compress_level: int,
    frame: Frame,
) -> dict[str, Any]:
    form = plan.form
    body: dict[str, Any] = {
        "method": item.method,
        "target_layer": ",".join(item.layers),
        "class_idx": item.class_idx,
        "label": plan.model.labels[item.class_idx],
        "score": round(item.score, 6),
        "mask": None,
        "overlay_png": None,
        "heatmap_png": None,
    }
    if item.faithfulness is not None:
        body["faithfulness"] = item.faithfulness
    if "mask" in plan.outputs:
        mask = np.ascontiguousarray(item.mask, dtype=np.float32)
        base64_mask = form.mask_encoding == "base64"
        body["mask"] = {
            "shape": list(mask.shape),
            "dtype": form.mask_dtype if base64_mask else "float32",  # lists are always floats
            "encoding": form.mask_encoding,
            "data": encode.mask_to_base64(mask, form.mask_dtype) if base64_mask else mask,
            # The longer side of an original-size mask is capped: say by how much.
            "scale": (round(max(mask.shape) / max(frame.width, frame.height), 6)
                      if form.mask_size == "original" else None),
        }
    if display is not None and "overlay" in plan.outputs and _drawn(item.overlay, display):
        # The worker drew it (on CUDA, with the same blend table): only the PNG is left.
        body["overlay_png"] = encode.png_base64(item.overlay, compress_level)
    elif display is not None and "overlay" in plan.outputs and item.display is not None:
        blended = encode.overlay(display, _fit_map(item.display, display), form.colormap, form.alpha,
                                 fade=form.overlay_mode == "fade")
        body["overlay_png"] = encode.png_base64(blended, compress_level)
    if display is not None and "heatmap" in plan.outputs and item.display is not None:
        rgba = encode.heatmap_rgba(_fit_map(item.display, display), form.colormap)
        body["heatmap_png"] = encode.png_base64(rgba, compress_level)
    return body
