"""``POST /features`` and ``GET /models/{name}/kernels``: looking inside the network.

Both validate here, then run their torch work on the engine's worker through
:meth:`Engine.run` (between batches, on the thread that owns the model) and encode the PNG
off the event loop.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Form, Query, Request, UploadFile
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from service.api import pipeline
from service.api.deps import EngineDep, SettingsDep
from service.api.errors import error_responses, request_id_of
from service.api.options import resolve_model
from service.api.render import image_info, model_ref
from service.api.schemas import ImageInfo, ModelRef
from service.errors import InvalidOption, NotFound, choices
from service.imaging.encode import png_base64
from service.models.catalog import ModelInfo
from service.quality import tiles

router = APIRouter(tags=["introspection"])

MAX_TILES = 256


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FeaturesForm(_Schema):
    file: UploadFile = Field(
        description="one image (a multi-frame file: its first frame)", examples=["cat.png"]
    )
    model: str | None = Field(
        None, description="registered model name; the server default when omitted",
        examples=["mobilenet_v2"],
    )
    layer: str | None = Field(
        None, description="module path as in named_modules() (see GET /models/{name}); "
        "the model's default CAM layer when omitted", examples=["features.18"],
    )
    max_channels: int = Field(
        64, ge=1, le=MAX_TILES, description="how many channels the grid shows, strongest first",
        examples=[64],
    )


class GridInfo(_Schema):
    columns: int = Field(description="tiles per row of the grid", examples=[8])
    rows: int = Field(description="rows of tiles", examples=[8])
    tile_size: int = Field(description="longer side of one tile in pixels", examples=[49])
    separator: int = Field(
        description="pixels between tiles (white; steel blue between grey kernels)", examples=[2]
    )
    shown: int = Field(description="tiles in the grid, row-major, in the listed order", examples=[64])


class ChannelStats(_Schema):
    channel: int = Field(description="channel index in the layer's output", examples=[417])
    mean: float = Field(description="mean activation over the positions", examples=[1.93])
    max: float = Field(description="largest activation", examples=[9.4])
    fraction_active: float = Field(
        description="share of positions with a positive activation", examples=[0.82]
    )


class FeaturesResponse(_Schema):
    request_id: str = Field(description="the request's id, as in X-Request-ID", examples=["3f2a9c"])
    model: ModelRef = Field(description="the model that answered")
    image: ImageInfo = Field(description="the image the activations are for")
    layer: str = Field(description="the layer shown", examples=["features.18"])
    shape: tuple[int, int, int] = Field(
        description="(channels, height, width) of the layer's output", examples=[[1280, 7, 7]]
    )
    grid_png: str = Field(
        description="base64 PNG: the strongest channels' maps, each min-max normalised on its own "
        "and coloured with viridis (dark: low, yellow: high), nearest-neighbour enlarged",
        examples=["iVBORw0KGgo..."],
    )
    grid: GridInfo = Field(description="how the grid is laid out")
    order: Literal["mean_activation_desc"] = Field(
        description="how channels are ranked: highest mean activation first",
        examples=["mean_activation_desc"],
    )
    channels: list[ChannelStats] = Field(
        description="statistics of every channel, strongest first; the grid shows the first `shown`"
    )


class KernelsResponse(_Schema):
    model: ModelRef = Field(description="the model the kernels belong to")
    layer: str = Field(description="the convolution shown", examples=["features.0.0"])
    weight_shape: tuple[int, int, int, int] = Field(
        description="(out channels, in channels per group, height, width) of the weight",
        examples=[[32, 3, 3, 3]],
    )
    groups: int = Field(description="the convolution's groups (depthwise: = channels)", examples=[1])
    rendering: Literal["rgb", "input_mean", "first_input", "single_input"] = Field(
        description="`rgb`: a first-layer kernel over the 3 colours, in colour, min-max per kernel; "
        "otherwise grey with mid-grey = 0, white/black the kernel's largest positive/negative "
        "weight: `input_mean` averaged over input channels, `first_input` the first input channel, "
        "`single_input` the only one (depthwise)",
        examples=["rgb"],
    )
    grid_png: str = Field(description="base64 PNG of the kernels, one tile each, in output-channel "
                          "order", examples=["iVBORw0KGgo..."])
    grid: GridInfo = Field(description="how the grid is laid out")


def conv_layers(model: ModelInfo) -> list[str]:
    return [layer.name for layer in model.layers if layer.kind == "Conv2d"]


@router.post(
    "/features",
    response_model=FeaturesResponse,
    summary="A layer's activation maps for one image",
    description=(
        "Run one image through the model and return the layer's activation maps as one PNG grid "
        "(strongest channels first, each tile normalised on its own) with every channel's mean, "
        "maximum and share of active positions. One forward pass, on the worker."
    ),
    responses=error_responses(400, 401, 404, 413, 415, 422, 500, 503),
)
async def features(
    request: Request,
    engine: EngineDep,
    settings: SettingsDep,
    form: Annotated[FeaturesForm, Form(media_type="multipart/form-data")],
) -> FeaturesResponse:
    model = resolve_model(form.model, engine.catalog, settings.default_model)
    layer = form.layer or model.default_layer
    if layer not in model.layer_names():
        raise InvalidOption(
            f"unknown layer {layer!r} for model {model.name!r}; valid layers "
            f"(modules with a 4-D output): {choices(model.layer_names())}"
        )
    sources = [(form.file.filename, await form.file.read())]
    upload = (await pipeline.decode_sources(sources, settings, model, display=False))[0]
    assert upload.pixels is not None  # decoded here: no on_device for this route
    maps = await engine.feature_maps(model.name, upload.pixels, layer, form.max_channels)
    grid, columns, rows, tile = tiles.tile_grid(maps.tiles)
    png = await run_in_threadpool(png_base64, grid, settings.png_compress_level)
    return FeaturesResponse(
        request_id=request_id_of(request),
        model=ModelRef.model_validate(model_ref(model)),
        image=ImageInfo.model_validate(image_info(upload)),
        layer=layer,
        shape=maps.shape,
        grid_png=png,
        grid=GridInfo(columns=columns, rows=rows, tile_size=tile, separator=tiles.SEPARATOR,
                      shown=len(maps.tiles)),
        order="mean_activation_desc",
        channels=[
            ChannelStats(channel=k, mean=round(float(m), 6), max=round(float(x), 6),
                         fraction_active=round(float(f), 6))
            for k, m, x, f in zip(maps.order, maps.mean, maps.max, maps.fraction_active, strict=True)
        ],
    )


@router.get(
    "/models/{name}/kernels",
    response_model=KernelsResponse,
    summary="A convolution layer's kernels as an image",
    description=(
        "The learnt kernels of one Conv2d layer as a PNG grid: first-layer kernels (3 input "
        "colours) in colour, others in grey, per input-channel mean (`mode=mean`) or first input "
        "channel (`mode=first`). Read from the weights on the worker; no image needed."
    ),
    responses=error_responses(400, 401, 404, 422, 500, 503),
)
async def kernels(
    name: str,
    engine: EngineDep,
    settings: SettingsDep,
    layer: Annotated[str, Query(description="a Conv2d module path", examples=["features.0.0"])],
    mode: Annotated[
        Literal["mean", "first"],
        Query(description="grey kernels: mean over input channels, or the first input channel",
              examples=["mean"]),
    ] = "mean",
    max_kernels: Annotated[
        int, Query(ge=1, le=MAX_TILES, description="how many kernels to show, in output order",
                   examples=[64]),
    ] = 64,
) -> KernelsResponse:
    model = engine.catalog.get(name)
    if model is None:
        raise NotFound(f"unknown model {name!r}; registered models: {choices(engine.catalog)}")
    valid = conv_layers(model)
    if layer not in valid:
        what = "not a convolution layer" if layer in model.layer_names() else "unknown"
        raise InvalidOption(
            f"layer {layer!r} of model {model.name!r} is {what}; valid Conv2d layers: {choices(valid)}"
        )
    found = await engine.kernels(model.name, layer, mode, max_kernels)
    grid, columns, rows, tile = tiles.tile_grid(found.tiles, colour=found.separator_colour)
    png = await run_in_threadpool(png_base64, grid, settings.png_compress_level)
    return KernelsResponse(
        model=ModelRef.model_validate(model_ref(model)),
        layer=layer,
        weight_shape=found.weight_shape,
        groups=found.groups,
        rendering=found.rendering,
        grid_png=png,
        grid=GridInfo(columns=columns, rows=rows, tile_size=tile, separator=tiles.SEPARATOR,
                      shown=len(found.tiles)),
    )
