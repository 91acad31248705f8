"""Request options: their shape (pydantic, at the boundary) and the one model-aware check.

:func:`plan_explain` turns a form into an :class:`ExplainPlan` before anything is queued, so
an unknown model, method or layer, or an out-of-range class, never reaches the worker.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field

from service.api.jsonlimits import JsonRefused, loads_bounded
from service.errors import BadRequest, InvalidOption, NotFound, choices
from service.imaging.colormaps import available_colormaps, is_colormap
from service.methods import MethodInfo
from service.models.catalog import ModelInfo

OUTPUT_KINDS = ("mask", "overlay", "heatmap", "image", "dicom_pm", "dicom_sc", "dicom_sr")
DICOM_OUTPUTS = frozenset({"dicom_pm", "dicom_sc", "dicom_sr"})  # DICOM inputs only
MAX_CLASSES_PER_REQUEST = 20


FILES_DESCRIPTION = (
    "one or more image parts: JPEG, PNG (8/16-bit, grey, RGB, RGBA, palette), TIFF, BMP, WebP, "
    "GIF, DICOM; a multi-frame file gives one result per frame"
)


class PredictForm(BaseModel):
    # A misspelt field (``method`` for ``methods``) must fail loudly, not fall back to a default.
    model_config = ConfigDict(extra="forbid")

    file: list[UploadFile] = Field(description=FILES_DESCRIPTION)

    model: str | None = Field(
        None, description="registered model name; the server default when omitted",
        examples=["mobilenet_v2"],
    )
    topk: int = Field(5, ge=1, le=20, description="how many predictions to list", examples=[5])


class ExplainForm(PredictForm):
    methods: str = Field(
        "gradcam", description="comma-separated CAM method names (see GET /methods); "
        "all are computed for every image", examples=["gradcam"],
    )
    target_layer: str | None = Field(
        None, description="module path as in named_modules() (see GET /models/{name}); "
        "several comma-separated are fused into one map; the model's default when omitted",
        examples=["features.18"],
    )
    class_idx: str | None = Field(
        None, description="an int, or comma-separated ints: one explanation per class; "
        "the top-1 class when omitted", examples=["285"],
    )
    outputs: str = Field(
        "mask,overlay", description="subset of mask, overlay, heatmap, image (comma-separated); "
        "image: the 8-bit frame exactly as the service windowed and displayed it, PNG at the "
        "overlay's size, in results[].image_png; for DICOM inputs also dicom_pm, dicom_sc, "
        "dicom_sr (the top-level `dicom` list)", examples=["mask,overlay"],
    )
    window: str | None = Field(
        None, description="`centre,width` of the display window for DICOM and 16-bit inputs "
        "(DICOM's linear VOI function, in modality values such as Hounsfield units for DICOM, "
        "stored values otherwise), replacing the file's own window or the full range; the "
        "model sees the windowed frame too. Ignored for 8-bit images", examples=["40,400"],
    )
    overlay_mode: Literal["uniform", "fade"] = Field(
        "uniform", description="how overlay_png blends: `uniform`, every pixel at `alpha`; "
        "`fade`, each pixel at alpha x its map value, so low values leave the image as it is "
        "(the review page's view); see service.imaging.colormaps.blend_table",
        examples=["uniform"],
    )
    mask_size: Literal["input", "original", "feature"] = Field(
        "input", description="mask size: model input, original image, or the layer's own grid",
        examples=["input"],
    )
    mask_encoding: Literal["list", "base64"] = Field(
        "list", description="nested lists of floats, or base64 of the mask_dtype values, row-major",
        examples=["list"],
    )
    mask_dtype: Literal["float32", "float16", "uint8"] = Field(
        "float32", description="for base64 masks: little-endian float32 or float16, or uint8 "
        "(value x 255, rounded); lists are always floats", examples=["float32"],
    )
    colormap: str = Field(
        "jet", description=f"colour map: {', '.join(available_colormaps())}", examples=["jet"]
    )
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="overlay opacity", examples=[0.5])
    aug_smooth: bool = Field(
        False, description="test-time-augmentation smoothing (flips and scales averaged)",
        examples=[False],
    )
    eigen_smooth: bool = Field(
        False, description="first-principal-component smoothing of the weighted activations",
        examples=[False],
    )
    evaluate: bool = Field(
        False, description="add `faithfulness` to each explanation: deletion and insertion AUC, "
        "average drop, increase in confidence (service.quality.faithfulness). Costs "
        "2 * eval_steps + 2 extra forward passes per map, batched, no backward",
        examples=[False],
    )
    eval_steps: int = Field(
        16, ge=1, le=256, description="deletion/insertion steps when `evaluate` is true: the pixels "
        "change 1/eval_steps of the image at a time", examples=[16],
    )
    method_params: str | None = Field(
        None, description="JSON object of per-method parameters, keyed by method name (the names, "
        "types and ranges are listed by GET /methods), e.g. the Score-CAM family's "
        "top_k_channels and batch_size, num_samples and std of the smoothed methods",
        examples=['{"scorecam": {"top_k_channels": 128}}'],
    )


@dataclass(frozen=True)
class ExplainPlan:
    model: ModelInfo
    methods: tuple[str, ...]
    layers: tuple[str, ...]
    classes: tuple[int, ...] | None
    outputs: frozenset[str]
    form: ExplainForm
    # Per method, its parameters as sorted (name, value) pairs: hashable, so batches can key on it.
    method_params: tuple[tuple[str, tuple[tuple[str, object], ...]], ...] = ()
    window: tuple[float, float] | None = None  # (centre, width) from the form


def resolve_model(name: str | None, catalog: dict[str, ModelInfo], default: str) -> ModelInfo:
    chosen = name or default
    if chosen not in catalog:
        raise NotFound(f"unknown model {chosen!r}; registered models: {choices(catalog)}")
    return catalog[chosen]


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def plan_explain(
    form: ExplainForm,
    catalog: dict[str, ModelInfo],
    known: Mapping[str, MethodInfo],
    default_model: str,
) -> ExplainPlan:
    """The checked plan of an explanation; ``catalog`` and ``known`` are the engine's models
    and methods (``engine.catalog``, ``engine.methods``)."""
    model = resolve_model(form.model, catalog, default_model)

    methods = tuple(dict.fromkeys(m.lower() for m in _split(form.methods)))
    if not methods:
        raise InvalidOption(f"methods is empty; valid methods: {choices(known)}")
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise InvalidOption(f"unknown method {unknown[0]!r}; valid methods: {choices(known)}")

    layers = tuple(dict.fromkeys(_split(form.target_layer or ""))) or (model.default_layer,)
    valid_layers = model.layer_names()
    for layer in layers:
        if layer not in valid_layers:
            raise InvalidOption(
                f"unknown layer {layer!r} for model {model.name!r}; valid layers "
                f"(modules with a 4-D output): {choices(valid_layers)}"
            )

    classes = _parse_classes(form.class_idx, model)

    outputs = frozenset(o.lower() for o in _split(form.outputs))
    bad = sorted(outputs - set(OUTPUT_KINDS))
    if bad:
        raise InvalidOption(f"unknown output {bad[0]!r}; valid outputs: {choices(OUTPUT_KINDS)}")

    if not is_colormap(form.colormap):
        raise InvalidOption(
            f"unknown colormap {form.colormap!r}; valid colour maps: {choices(available_colormaps())}"
        )
    _check_requirements([known[name] for name in methods], layers, model)
    params = _parse_method_params(form.method_params, methods, known)
    window = parse_window(form.window)
    return ExplainPlan(model, methods, layers, classes, outputs, form, params, window)


def parse_window(value: str | None) -> tuple[float, float] | None:
    """``centre,width`` as two finite floats, the width at least 1 (as DICOM requires)."""
    if value is None or not value.strip():
        return None
    parts = _split(value)
    try:
        centre, width = (float(part) for part in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        centre = width = None
    if centre is None or width is None:
        raise BadRequest(f"window must be `centre,width`, two numbers, got {value!r}")
    if not (math.isfinite(centre) and math.isfinite(width)) or width < 1:
        raise InvalidOption(f"window width must be a finite number of at least 1, got {value!r}")
    return centre, width


def _check_requirements(methods: list[MethodInfo], layers: tuple[str, ...], model: ModelInfo) -> None:
    """What each method declares it needs, checked against the model before any work is
    queued: the layers its linear head pools (CAM) first, then the kind of network."""
    for method in methods:
        refusal = method.layer_refusal(model, layers)
        if refusal:
            raise InvalidOption(refusal)
    for method in methods:
        reason = method.unsuitable(model)
        if reason:
            raise InvalidOption(f"method {method.name!r} cannot explain model {model.name!r}: {reason}")


def _parse_method_params(
    value: str | None, methods: tuple[str, ...], known: Mapping[str, MethodInfo]
) -> tuple[tuple[str, tuple[tuple[str, object], ...]], ...]:
    if value is None or not value.strip():
        return ()
    try:
        document = loads_bounded(value)
    except JsonRefused as exc:
        raise InvalidOption(f"method_params refused: {exc}") from None
    except ValueError:
        raise BadRequest(f"method_params must be a JSON object, got {value!r}") from None
    if not isinstance(document, dict):
        raise BadRequest("method_params must be a JSON object keyed by method name")
    parsed = []
    for name, options in document.items():
        if name not in methods:
            raise InvalidOption(
                f"method_params names {name!r}, which is not among the requested methods: "
                f"{choices(methods)}"
            )
        if not isinstance(options, dict):
            raise InvalidOption(f"method_params[{name!r}] must be an object of parameter values")
        try:
            checked = known[name].options(options)
        except ValueError as exc:
            declared = [p.name for p in known[name].params] or ["none"]
            raise InvalidOption(
                f"method_params[{name!r}]: {exc}; its parameters: {choices(declared)}"
            ) from None
        given = {key: checked[key] for key in options}
        parsed.append((name, tuple(sorted(given.items()))))
    return tuple(sorted(parsed))


def _parse_classes(value: str | None, model: ModelInfo) -> tuple[int, ...] | None:
    if value is None or not value.strip():
        return None
    parts = _split(value)
    try:
        classes = tuple(dict.fromkeys(int(part) for part in parts))
    except ValueError:
        raise BadRequest(
            f"class_idx must be an int or comma-separated ints, got {value!r}"
        ) from None
    if len(classes) > MAX_CLASSES_PER_REQUEST:
        raise InvalidOption(f"at most {MAX_CLASSES_PER_REQUEST} classes per request")
    for cls in classes:
        if not 0 <= cls < model.num_classes:
            raise InvalidOption(
                f"class_idx {cls} is out of range for model {model.name!r}: "
                f"valid classes are 0..{model.num_classes - 1}"
            )
    return classes
