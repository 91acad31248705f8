"""Building response bodies off the event loop: masks, PNGs and the JSON bytes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from PIL import Image

from service.api.options import ExplainPlan
from service.engine.jobs import ItemResult, MapResult
from service.imaging import encode
from service.imaging.decode import Frame
from service.models.catalog import ModelInfo


@dataclass(frozen=True)
class Upload:
    """One decoded frame with where it came from."""

    index: int
    filename: str | None
    frame: Frame
    pixels: np.ndarray  # (H, W, 3) uint8 at the model's input size


def dumps(body: dict[str, Any]) -> bytes:
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def model_ref(model: ModelInfo) -> dict[str, Any]:
    return {"name": model.name, "version": model.version, "input_size": list(model.input_size)}


def image_info(upload: Upload) -> dict[str, Any]:
    return {
        "index": upload.index,
        "frame": upload.frame.frame,
        "filename": upload.filename,
        "width": upload.frame.width,
        "height": upload.frame.height,
    }


def predictions(model: ModelInfo, result: ItemResult) -> list[dict[str, Any]]:
    return [
        {"class_idx": idx, "label": model.labels[idx], "score": round(score, 6)}
        for idx, score in result.predictions
    ]


def predict_results(
    model: ModelInfo, uploads: Sequence[Upload], results: Sequence[ItemResult]
) -> list[dict[str, Any]]:
    return [
        {"image": image_info(u), "predictions": predictions(model, r)}
        for u, r in zip(uploads, results, strict=True)
    ]


def explain_results(
    plan: ExplainPlan, uploads: Sequence[Upload], results: Sequence[ItemResult], compress_level: int
) -> list[dict[str, Any]]:
    out = []
    for upload, result in zip(uploads, results, strict=True):
        display = None
        if {"overlay", "heatmap"} & plan.outputs and result.explanations:
            shown = result.explanations[0].display
            assert shown is not None
            height, width = shown.shape
            image = upload.frame.image
            display = image if image.size == (width, height) else image.resize(
                (width, height), Image.Resampling.BILINEAR
            )
        out.append({
            "image": image_info(upload),
            "predictions": predictions(plan.model, result),
            "explanations": [
                _explanation(plan, item, display, compress_level) for item in result.explanations
            ],
        })
    return out


def _explanation(
    plan: ExplainPlan, item: MapResult, display: Image.Image | None, compress_level: int
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
        body["mask"] = {
            "shape": list(mask.shape),
            "dtype": "float32",
            "encoding": form.mask_encoding,
            "data": encode.mask_to_base64(mask) if form.mask_encoding == "base64" else mask,
        }
    if display is not None and item.display is not None:
        if "overlay" in plan.outputs:
            blended = encode.overlay(display, item.display, form.colormap, form.alpha)
            body["overlay_png"] = encode.png_base64(blended, compress_level)
        if "heatmap" in plan.outputs:
            rgba = encode.heatmap_rgba(item.display, form.colormap)
            body["heatmap_png"] = encode.png_base64(rgba, compress_level)
    return body
