"""Response bodies of the HTTP contract; every field carries a description and an example."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(_Schema):
    code: str = Field(description="stable machine-readable error code", examples=["invalid_option"])
    message: str = Field(
        description="what went wrong and how to fix it",
        examples=["unknown method 'gradcan'; valid methods: gradcam"],
    )
    request_id: str = Field(description="the request's id, as in X-Request-ID", examples=["3f2a9c"])


class ErrorResponse(_Schema):
    error: ErrorDetail = Field(description="the error")


class ModelRef(_Schema):
    name: str = Field(description="registered model name", examples=["mobilenet_v2"])
    version: str = Field(description="model version", examples=["imagenet1k-v1"])
    input_size: tuple[int, int] = Field(description="model input (height, width)", examples=[[224, 224]])


class DisplayWindow(_Schema):
    centre: float = Field(description="window centre (DICOM Window Center), in modality values "
                          "for DICOM (Hounsfield units for CT), stored values otherwise", examples=[40.0])
    width: float = Field(description="window width (DICOM Window Width), at least 1", examples=[400.0])
    source: Literal["request", "file", "range"] | None = Field(
        None, description="where it came from: the request's `window`, the file's own (DICOM "
        "Window Center/Width), or the frame's full range of values", examples=["file"])


class ImageInfo(_Schema):
    index: int = Field(description="position of the file among the uploaded parts", examples=[0])
    frame: int = Field(description="frame index within the file (0 for still images)", examples=[0])
    filename: str | None = Field(description="the part's file name, if it had one", examples=["cat.png"])
    width: int = Field(description="decoded width in pixels", examples=[451])
    height: int = Field(description="decoded height in pixels", examples=[300])
    modality: str | None = Field(
        None, description="the DICOM Modality (CT, MR, DX, ...); absent for other files", examples=["CT"])
    window: DisplayWindow | None = Field(
        None, description="the linear window that brought a DICOM or 16-bit frame to 8 bits: the "
        "request's `window`, else the file's own, else the frame's full range; absent for 8-bit "
        "images and for DICOM frames shown through a VOI lookup table",
        examples=[{"centre": 40.0, "width": 400.0, "source": "request"}])


class Prediction(_Schema):
    class_idx: int = Field(description="class index", examples=[285])
    label: str = Field(description="class label", examples=["Egyptian cat"])
    score: float = Field(description="softmax probability", examples=[0.717])


class Mask(_Schema):
    shape: tuple[int, int] = Field(description="(height, width) of the mask", examples=[[224, 224]])
    dtype: Literal["float32", "float16", "uint8"] = Field(
        description="element type of a base64 mask (the request's mask_dtype; uint8 is value x 255, "
        "rounded); `float32` for lists", examples=["float32"])
    encoding: Literal["list", "base64"] = Field(
        description="`list`: nested lists of floats; `base64`: little-endian `dtype` values, row-major",
        examples=["list"],
    )
    data: list[list[float]] | str = Field(
        description="values in [0, 1], min-max normalised per map", examples=[[[0.0, 0.1], [0.5, 1.0]]]
    )
    scale: float | None = Field(
        None, description="for mask_size=original: the mask's size over the image's (longer "
        "side over longer side), 1.0 unless the longer side was capped at the server's limit "
        "(CAMSERVE_MASK_MAX_SIDE, default the overlay cap); null for the other mask sizes",
        examples=[1.0],
    )


class Faithfulness(_Schema):
    deletion_auc: float = Field(
        description="area under the class probability as the map's top pixels are replaced by the "
        "baseline (the normalised mean), 1/steps at a time; lower is more faithful", examples=[0.11],
    )
    insertion_auc: float = Field(
        description="area under the class probability as the map's top pixels are revealed on the "
        "baseline; higher is more faithful", examples=[0.62],
    )
    average_drop: float = Field(
        description="max(0, Y - O) / Y, Y the class probability on the image, O on the image "
        "multiplied by the map (Grad-CAM++); lower is better, averaged over images in the paper",
        examples=[0.02],
    )
    increase_in_confidence: bool = Field(
        description="whether O > Y (Grad-CAM++); its share over images is the paper's score",
        examples=[False],
    )
    steps: int = Field(description="deletion/insertion steps used (eval_steps)", examples=[16])


class Explanation(_Schema):
    method: str = Field(description="CAM method name", examples=["gradcam"])
    target_layer: str = Field(
        description="explained layer(s), comma-separated when fused", examples=["features.18"]
    )
    class_idx: int = Field(description="explained class", examples=[285])
    label: str = Field(description="label of the explained class", examples=["Egyptian cat"])
    score: float = Field(description="softmax probability of the explained class", examples=[0.717])
    mask: Mask | None = Field(
        description="the map, when `outputs` has `mask`",
        examples=[{"shape": [2, 2], "dtype": "float32", "encoding": "list",
                   "data": [[0.0, 0.1], [0.5, 1.0]]}],
    )
    overlay_png: str | None = Field(
        description="base64 PNG: the image blended with the coloured map, at original size "
        "(longer side capped)",
        examples=["iVBORw0KGgo..."],
    )
    heatmap_png: str | None = Field(
        description="base64 RGBA PNG: the coloured map with alpha = map value, at the overlay's size",
        examples=[None],
    )
    faithfulness: Faithfulness | None = Field(
        None, description="present when the request set `evaluate`: how far the model's "
        "confidence follows the map",
        examples=[{"deletion_auc": 0.11, "insertion_auc": 0.62, "average_drop": 0.02,
                   "increase_in_confidence": False, "steps": 16}],
    )


WARNINGS_DESCRIPTION = (
    "what a reviewer should know about this input, e.g. a DICOM modality the model was not "
    "trained on (GET /models lists each model's `modalities` and `domain`); empty when there is "
    "nothing to say"
)
WARNINGS_EXAMPLE = [["CT input: this model (mobilenet_v2) was trained on natural photographs "
                     "(ImageNet), not CT; its classes and maps may mean nothing for this image"]]


class ExplainResult(_Schema):
    image: ImageInfo = Field(description="which image or frame this result is for")
    predictions: list[Prediction] = Field(description="top-k predictions, best first")
    warnings: list[str] = Field(default_factory=list, description=WARNINGS_DESCRIPTION,
                                examples=WARNINGS_EXAMPLE)
    explanations: list[Explanation] = Field(
        description="one per (class, method), classes in request order, methods in request order"
    )
    image_png: str | None = Field(
        None, description="when `outputs` has `image`: base64 8-bit RGB PNG of the frame exactly "
        "as the service windowed and displayed it (what overlays are drawn on), at the "
        "overlay's size", examples=["iVBORw0KGgo..."])


class PredictResult(_Schema):
    image: ImageInfo = Field(description="which image or frame this result is for")
    predictions: list[Prediction] = Field(description="top-k predictions, best first")
    warnings: list[str] = Field(default_factory=list, description=WARNINGS_DESCRIPTION,
                                examples=WARNINGS_EXAMPLE)


class Timing(_Schema):
    queue: float = Field(description="ms waiting in the queue (slowest image)", examples=[0.8])
    compute: float = Field(description="ms of model and CAM computation (slowest batch)", examples=[15.2])
    encode: float = Field(description="ms encoding masks, PNGs", examples=[3.9])
    total: float = Field(description="ms from request received to response built", examples=[21.3])


class DicomObject(_Schema):
    kind: Literal["parametric_map", "secondary_capture", "structured_report"] = Field(
        description="which object: a float32 Parametric Map, a Secondary Capture with the overlay "
        "burned in, or a TID 1500 Structured Report", examples=["parametric_map"])
    file_index: int = Field(description="position of the source file among the uploaded parts",
                            examples=[0])
    method: str | None = Field(description="CAM method of the map; null for the report",
                               examples=["gradcam"])
    class_idx: int | None = Field(description="explained class; null for the report", examples=[285])
    sop_class_uid: str = Field(description="the object's SOP Class UID",
                               examples=["1.2.840.10008.5.1.4.1.1.30"])
    sop_instance_uid: str = Field(description="the object's SOP Instance UID (new on every request)",
                                  examples=["2.25.1234567890"])
    series_instance_uid: str = Field(description="the new series the request's objects of this kind "
                                     "belong to", examples=["2.25.9876543210"])
    study_instance_uid: str = Field(description="the source's study, which the object joins",
                                    examples=["1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"])
    data: str = Field(description="base64 of the DICOM Part 10 file", examples=["RElDTQ..."])


class ExplainResponse(_Schema):
    request_id: str = Field(description="the request's id, as in X-Request-ID", examples=["3f2a9c"])
    model: ModelRef = Field(description="the model that answered")
    results: list[ExplainResult] = Field(description="one per image or frame, in upload order")
    dicom: list[DicomObject] | None = Field(
        None, description="when `outputs` has dicom_pm, dicom_sc or dicom_sr (DICOM inputs): the "
        "objects, per file: parametric maps, secondary captures, then the report", examples=[None])
    timing_ms: Timing = Field(description="where the time went")


class PredictResponse(_Schema):
    request_id: str = Field(description="the request's id, as in X-Request-ID", examples=["3f2a9c"])
    model: ModelRef = Field(description="the model that answered")
    results: list[PredictResult] = Field(description="one per image or frame, in upload order")
    timing_ms: Timing = Field(description="where the time went")


class LayerOut(_Schema):
    name: str = Field(description="module path as in named_modules()", examples=["features.18"])
    shape: tuple[int, int, int] = Field(
        description="(channels, height, width) of its output at the input size", examples=[[1280, 7, 7]]
    )
    kind: str = Field(description="module class", examples=["Conv2dNormActivation"])


class ModelSummary(_Schema):
    name: str = Field(description="name used in requests", examples=["mobilenet_v2"])
    display_name: str = Field(description="human-readable name", examples=["MobileNetV2 (ImageNet-1k)"])
    version: str = Field(description="model version", examples=["imagenet1k-v1"])
    architecture: str = Field(description="torchvision architecture", examples=["mobilenet_v2"])
    num_classes: int = Field(description="number of classes", examples=[1000])
    input_size: tuple[int, int] = Field(description="model input (height, width)", examples=[[224, 224]])
    default_layer: str = Field(description="layer explained by default", examples=["features.18"])
    device: str = Field(description="device the model lives on", examples=["cpu"])
    default: bool = Field(description="whether requests naming no model get this one", examples=[True])
    modalities: list[str] = Field(
        description="DICOM Modality codes of the data it was trained on; a DICOM input of another "
        "modality gets a warning in results[].warnings (empty: no DICOM modality, e.g. photographs)",
        examples=[[]])
    domain: str | None = Field(description="what it was trained on, in a few words",
                               examples=["natural photographs (ImageNet)"])


class ModelDetail(ModelSummary):
    layers: list[LayerOut] = Field(description="candidate CAM layers (modules with a 4-D output)")


class ModelsResponse(_Schema):
    models: list[ModelSummary] = Field(description="registered models")


class MethodParamOut(_Schema):
    name: str = Field(description="parameter name", examples=["num_samples"])
    type: str = Field(description="parameter type", examples=["int"])
    default: int | float | str | bool | None = Field(description="default value", examples=[4])
    description: str = Field(description="what it does", examples=["noisy copies averaged"])


class MethodOut(_Schema):
    name: str = Field(description="name used in `methods`", examples=["gradcam"])
    title: str = Field(description="human-readable name", examples=["Grad-CAM"])
    family: str = Field(description="gradient, activation, perturbation or baseline", examples=["gradient"])
    uses_gradients: bool = Field(description="whether it needs a backward pass", examples=[True])
    passes: str = Field(description="passes it costs", examples=["1 forward + 1 backward (shared)"])
    paper: str = Field(description="reference", examples=["Selvaraju et al. 2017, arXiv 1610.02391"])
    parameters: list[MethodParamOut] = Field(description="tunable parameters")
    cost: MethodCost | None = Field(
        description="what it costs with its default parameters on the default model, here; null "
        "while the models load", examples=[None])


class MethodCost(_Schema):
    model: str = Field(description="the model the cost is for (the default one)", examples=["mobilenet_v2"])
    layer: str = Field(description="its default layer", examples=["features.18"])
    passes: int = Field(description="forward-pass equivalents for one image and its top-1 class",
                        examples=[1282])
    seconds: float = Field(description="estimated seconds for one image at the pass rate measured on "
                           "this device", examples=[23.1])
    heavy: bool = Field(description="runs in the heavy lane in chunks; such requests are best sent "
                        "to POST /jobs, which reports progress", examples=[True])
    device: str = Field(description="the device the rate was measured on", examples=["cpu"])


class MethodsResponse(_Schema):
    methods: list[MethodOut] = Field(description="every CAM method")


class HealthResponse(_Schema):
    status: str = Field(description="`ok`, `ready`, or the reason it is not ready", examples=["ok"])
    state: str = Field(description="engine state", examples=["ready"])
    queue_depth: int = Field(description="images waiting", examples=[0])
    pacs: str | None = Field(None, description="with DICOMweb configured: `reachable`, or why the PACS "
                             "is not (readiness does not depend on it)", examples=["reachable"])


class JobProgress(_Schema):
    done: int = Field(description="passes the scheduler has run for the job (never decreases)",
                      examples=[412])
    total: int = Field(description="passes the job needs (estimated until it ends; equals done once "
                       "it has succeeded)", examples=[1222])
    fraction: float = Field(description="done / total", examples=[0.337])


class JobOut(_Schema):
    job_id: str = Field(description="the job's id", examples=["9a1c0e5d2b7f4a3c8e6d1f0a2b3c4d5e"])
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"] = Field(
        description="where the job is", examples=["running"])
    created_at: str = Field(description="when it was submitted (UTC, ISO 8601)",
                            examples=["2026-12-01T15:03:30.120Z"])
    started_at: str | None = Field(description="when its first pass started", examples=[None])
    finished_at: str | None = Field(description="when it ended", examples=[None])
    progress: JobProgress = Field(description="passes done and to do")
    eta_s: float | None = Field(description="seconds left at the rate its passes have run so far; "
                                "null before the first pass", examples=[11.8])
    methods: list[str] = Field(description="the CAM methods it computes", examples=[["scorecam"]])
    result: ExplainResponse | None = Field(
        description="exactly the POST /explain response body, once the job has succeeded",
        examples=[None])
    error: ErrorDetail | None = Field(description="why it failed or was cancelled", examples=[None])
