"""KServe V1 protocol: ``POST /v1/models/{model}:predict`` and ``:explain``.

Clients of KServe or TorchServe switch by changing the URL. Instances carry images as
base64 (``{"image": {"b64": ...}}``); ``parameters`` are exactly the options of
``POST /explain`` (derived from its form, so the two never drift apart). Validation, decoding,
queueing and rendering are the ones the multipart routes use.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Header, Path, Request, Response
from pydantic import BaseModel, ConfigDict, Field, create_model

from service.api import dicom_results, pipeline
from service.api.deps import EngineDep, SettingsDep
from service.api.errors import error_responses, request_id_of
from service.api.options import ExplainForm, PredictForm, plan_explain, resolve_model
from service.api.schemas import Explanation, ModelRef, PredictResult, Timing
from service.errors import BadRequest, InvalidOption

router = APIRouter(prefix="/v1/models", tags=["kserve"])

_NOT_PARAMETERS = ("file", "model")  # the images travel as instances, the model in the path


def _parameters_model(name: str, form: type[BaseModel], doc: str) -> type[BaseModel]:
    fields: dict[str, Any] = {
        key: (info.annotation, info)
        for key, info in form.model_fields.items()
        if key not in _NOT_PARAMETERS
    }
    # JSON clients send numbers where the form has text (``"class_idx": 285``): accept them.
    config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)
    return create_model(name, __config__=config, __doc__=doc, **fields)


if TYPE_CHECKING:
    PredictParameters = BaseModel
    ExplainParameters = BaseModel
else:
    PredictParameters = _parameters_model(
        "PredictParameters", PredictForm, "Options of POST /predict, as KServe parameters."
    )
    ExplainParameters = _parameters_model(
        "ExplainParameters", ExplainForm, "Options of POST /explain, as KServe parameters."
    )


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageB64(_Schema):
    b64: str = Field(
        description="the image file's bytes in base64 (any supported format, DICOM included; "
        "a data: URL prefix is accepted)",
        examples=["iVBORw0KGgoAAAANSUhEUgAA..."],
    )


class Instance(_Schema):
    image: ImageB64 = Field(description="the image, as in KServe's and TorchServe's image protocols")


_INSTANCES = Field(
    min_length=1,
    description="images to classify; a multi-frame image gives one prediction per frame",
    examples=[[{"image": {"b64": "iVBORw0KGgoAAAANSUhEUgAA..."}}]],
)


class KServePredictRequest(_Schema):
    instances: list[Instance] = _INSTANCES
    parameters: PredictParameters | None = Field(
        None, description="options of POST /predict (topk)", examples=[{"topk": 3}]
    )


class KServeExplainRequest(_Schema):
    instances: list[Instance] = _INSTANCES
    parameters: ExplainParameters | None = Field(
        None, description="options of POST /explain: methods, target_layer, class_idx, outputs, "
        "mask_size, mask_encoding, colormap, alpha, ...",
        examples=[{"methods": "gradcam", "outputs": "mask", "mask_encoding": "base64"}],
    )


class KServePredictResponse(_Schema):
    request_id: str = Field(description="the request's id, as in X-Request-ID", examples=["3f2a9c"])
    model: ModelRef = Field(description="the model that answered")
    predictions: list[PredictResult] = Field(
        description="one per instance, or per frame of a multi-frame instance, in order"
    )
    timing_ms: Timing = Field(description="where the time went")


class KServeExplainResponse(KServePredictResponse):
    explanations: list[list[Explanation]] = Field(
        description="for each entry of `predictions` (same position), its explanations: one per "
        "(class, method)"
    )


class ModelReady(_Schema):
    name: str = Field(description="registered model name", examples=["mobilenet_v2"])
    ready: bool = Field(description="whether the model is loaded and serving", examples=[True])


class ModelList(_Schema):
    models: list[str] = Field(description="registered model names", examples=[["mobilenet_v2"]])


ModelName = Annotated[str, Path(description="a registered model name", examples=["mobilenet_v2"])]
Timeout = Annotated[str | None, Header(
    alias="X-Request-Timeout", description="deadline in seconds for this request (default: "
    "the server's)", examples=["30"],
)]
ERRORS = error_responses(400, 401, 404, 413, 415, 422, 500, 503, 504)
_DATA_URL = re.compile(r"^data:[^,]*;base64,", re.IGNORECASE)


def _sources(instances: list[Instance]) -> list[pipeline.Source]:
    sources: list[pipeline.Source] = []
    for index, instance in enumerate(instances):
        text = _DATA_URL.sub("", instance.image.b64.strip(), count=1)
        try:
            data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"instances[{index}].image.b64 is not valid base64") from None
        sources.append((f"instances[{index}]", data))
    return sources


@router.get(
    "", response_model=ModelList, summary="KServe V1: list models", responses=error_responses(401, 500)
)
async def list_models(engine: EngineDep) -> ModelList:
    return ModelList(models=list(engine.catalog))


@router.get(
    "/{model}", response_model=ModelReady, summary="KServe V1: model readiness",
    responses=error_responses(401, 404, 500),
)
async def model_ready(engine: EngineDep, settings: SettingsDep, model: ModelName) -> ModelReady:
    info = resolve_model(model, engine.catalog, settings.default_model)
    return ModelReady(name=info.name, ready=engine.state == "ready")


@router.post(
    "/{model}:predict",
    response_model=KServePredictResponse,
    summary="KServe V1: classify images",
    description="Classify base64 images, as POST /predict does. Predictions follow instance order.",
    responses=ERRORS,
)
async def predict(
    request: Request, engine: EngineDep, settings: SettingsDep, model: ModelName,
    body: KServePredictRequest, x_request_timeout: Timeout = None,
) -> Response:
    timer = pipeline.Timer()
    info = resolve_model(model, engine.catalog, settings.default_model)
    options = body.parameters.model_dump() if body.parameters else {}
    # Already validated field by field against the form's own fields: safe to construct.
    form = PredictForm.model_construct(file=[], model=model, **options)
    deadline = pipeline.deadline_from(x_request_timeout, settings)
    prepared = await pipeline.prepare_predict(
        info, form.topk, _sources(body.instances), settings, deadline, engine.admit, "instances",
        timer=timer, on_device=engine.jpeg_on_device,
    )
    results = await engine.submit(prepared.items)
    payload, stages = await pipeline.finish(
        prepared, results, request_id_of(request), settings,
        layout=lambda rendered: {"predictions": rendered},
    )
    return pipeline.json_response(payload, stages)


@router.post(
    "/{model}:explain",
    response_model=KServeExplainResponse,
    summary="KServe V1: classify images and explain the predictions with CAMs",
    description="Classify base64 images and explain them, as POST /explain does. `predictions` "
    "and `explanations` follow instance order, frames in file order, position for position.",
    responses=ERRORS,
)
async def explain(
    request: Request, engine: EngineDep, settings: SettingsDep, model: ModelName,
    body: KServeExplainRequest, x_request_timeout: Timeout = None,
) -> Response:
    timer = pipeline.Timer()
    resolve_model(model, engine.catalog, settings.default_model)  # 404 names the path's model
    options = body.parameters.model_dump() if body.parameters else {}
    form = ExplainForm.model_construct(file=[], model=model, **options)
    plan = plan_explain(form, engine.catalog, engine.methods, settings.default_model)
    if dicom_results.wanted(plan):
        raise InvalidOption("DICOM outputs (dicom_pm, dicom_sc, dicom_sr) are answered by "
                            "POST /explain and POST /jobs, not by the KServe protocol")
    deadline = pipeline.deadline_from(x_request_timeout, settings)
    prepared = await pipeline.prepare_explain(
        plan, _sources(body.instances), settings, deadline, engine.admit, "instances", timer=timer,
        on_device=engine.jpeg_on_device,
    )
    results = await engine.submit(prepared.items)
    payload, stages = await pipeline.finish(
        prepared, results, request_id_of(request), settings, layout=_side_by_side
    )
    return pipeline.json_response(payload, stages)


def _side_by_side(rendered: list[dict[str, Any]]) -> dict[str, Any]:
    """KServe V1's layout: predictions and explanations in two lists, position for position."""
    return {
        "predictions": [{"image": r["image"], "predictions": r["predictions"]} for r in rendered],
        "explanations": [r["explanations"] for r in rendered],
    }
