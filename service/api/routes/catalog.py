"""``GET /models``, ``GET /models/{name}`` and ``GET /methods``."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import EngineDep, SettingsDep
from service.api.errors import error_responses
from service.api.schemas import (
    LayerOut,
    MethodCost,
    MethodOut,
    MethodParamOut,
    MethodsResponse,
    ModelDetail,
    ModelsResponse,
    ModelSummary,
)
from service.errors import NotFound, ServiceUnavailable, choices
from service.models.catalog import ModelInfo

router = APIRouter(tags=["catalog"])


def _summary(info: ModelInfo, default: str) -> dict[str, object]:
    return {
        "name": info.name,
        "display_name": info.display_name,
        "version": info.version,
        "architecture": info.architecture,
        "num_classes": info.num_classes,
        "input_size": info.input_size,
        "default_layer": info.default_layer,
        "device": info.device,
        "default": info.name == default,
        "modalities": list(info.modalities),
        "domain": info.domain,
    }


@router.get(
    "/models",
    response_model=ModelsResponse,
    summary="List registered models",
    responses=error_responses(401, 503),
)
async def list_models(engine: EngineDep, settings: SettingsDep) -> ModelsResponse:
    return ModelsResponse(
        models=[ModelSummary.model_validate(_summary(i, settings.default_model))
                for i in engine.catalog.values()]
    )


@router.get(
    "/models/{name}",
    response_model=ModelDetail,
    summary="One model, with its candidate CAM layers",
    responses=error_responses(401, 404),
)
async def get_model(name: str, engine: EngineDep, settings: SettingsDep) -> ModelDetail:
    info = engine.catalog.get(name)
    if info is None:
        raise NotFound(f"unknown model {name!r}; registered models: {choices(engine.catalog)}")
    layers = [LayerOut(name=l.name, shape=l.shape, kind=l.kind) for l in info.layers]
    return ModelDetail.model_validate({**_summary(info, settings.default_model), "layers": layers})


@router.get(
    "/methods",
    response_model=MethodsResponse,
    summary="List every CAM method",
    responses=error_responses(401),
)
async def list_methods(engine: EngineDep, settings: SettingsDep) -> MethodsResponse:
    try:
        model = engine.catalog[settings.default_model]
    except ServiceUnavailable:  # still loading: the list without costs
        model = None

    def cost(name: str) -> MethodCost | None:
        if model is None:
            return None
        passes, seconds, heavy = engine.method_cost(name, model.name)
        return MethodCost(model=model.name, layer=model.default_layer, passes=passes,
                          seconds=round(seconds, 3), heavy=heavy, device=model.device)

    return MethodsResponse(
        methods=[
            MethodOut(
                name=info.name,
                title=info.title,
                family=info.family,
                uses_gradients=info.uses_gradients,
                passes=info.passes,
                paper=info.paper,
                parameters=[
                    MethodParamOut(name=p.name, type=p.type, default=p.default,
                                   description=p.description)
                    for p in info.params
                ],
                cost=cost(info.name),
            )
            for info in engine.methods.values()
        ]
    )
