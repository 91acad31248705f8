"""``POST /dicomweb/explain``: explain a study, a series or instances straight from the PACS.

The instances are found with QIDO-RS and retrieved with WADO-RS from the one configured PACS
(:mod:`service.api.pacs`), a series put in viewing order, non-image instances skipped and
listed, and every frame explained through the ``/explain`` pipeline. With ``store: true`` the
DICOM results (parametric maps, secondary captures, the report) go back into the same study
with STOW-RS, and the answer says what was stored. A long series runs as a job: ``POST /jobs``
with the same JSON body. Without ``CAMSERVE_DICOMWEB_URL`` these routes answer 404.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from typing import Annotated, Any

import pydicom
from fastapi import APIRouter, Body, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api import dicom_results, pipeline
from service.api.deps import EngineDep, SettingsDep
from service.api.errors import error_responses, request_id_of
from service.api.options import DICOM_OUTPUTS, ExplainForm, plan_explain
from service.api.pacs import Instance, Pacs, check_uid, slice_order
from service.api.schemas import JobOut
from service.config import Settings
from service.engine.jobs import ItemResult, WorkItem
from service.errors import InvalidOption, NotFound, PayloadTooLarge

router = APIRouter(tags=["dicomweb"])

EXAMPLE: dict[str, Any] = {"study_uid": "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322", "methods": "gradcam",
           "outputs": "mask,overlay", "store": False}


class DicomwebExplainRequest(BaseModel):
    """What to explain, by UID, and how: the ``/explain`` options that apply."""

    model_config = ConfigDict(extra="forbid")

    study_uid: str = Field(description="the study's Study Instance UID", examples=[EXAMPLE["study_uid"]])
    series_uid: str | None = Field(None, description="narrows to one series of the study",
                                   examples=[None])
    instance_uids: list[str] = Field(default_factory=list, max_length=10_000,
                                     description="narrows to these SOP instances (of the series)",
                                     examples=[[]])
    methods: str = Field("gradcam", description="comma-separated CAM methods", examples=["gradcam"])
    class_idx: int | list[int] | None = Field(None, description="class(es) to explain; top-1 when "
                                              "omitted", examples=[None])
    target_layer: str | None = Field(None, description="layer(s); the model's default when omitted",
                                     examples=[None])
    model: str | None = Field(None, description="a registered model; the default when omitted",
                              examples=[None])
    outputs: str = Field("mask,overlay", description="as for /explain (dicom_pm, dicom_sc, dicom_sr for "
                         "DICOM results)", examples=["mask,overlay"])
    store: bool = Field(False, description="store the DICOM results into the same study (STOW-RS)",
                        examples=[False])
    topk: int = Field(5, ge=1, le=20, description="how many predictions to list", examples=[5])
    mask_size: str = Field("input", description="input, original or feature", examples=["input"])
    mask_encoding: str = Field("list", description="list or base64", examples=["list"])
    colormap: str = Field("jet", description="colour map of the overlays", examples=["jet"])
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="overlay opacity", examples=[0.5])
    method_params: dict[str, dict[str, Any]] | None = Field(
        None, description="per-method parameters, as for /explain", examples=[None])

    @property
    def asks_for_dicom(self) -> bool:
        return bool(DICOM_OUTPUTS & {o.strip().lower() for o in self.outputs.split(",")})

    def form(self) -> ExplainForm:
        """The same request as an ``/explain`` form, so one pipeline serves both. Storing
        needs DICOM objects: ``store`` without DICOM outputs stores all three kinds."""
        import json

        classes = self.class_idx if not isinstance(self.class_idx, int) else [self.class_idx]
        values: dict[str, Any] = {
            "file": [], "methods": self.methods, "target_layer": self.target_layer,
            "class_idx": ",".join(str(c) for c in classes) if classes else None, "model": self.model,
            "outputs": self.outputs if self.asks_for_dicom or not self.store
            else f"{self.outputs},{','.join(sorted(DICOM_OUTPUTS))}",
            "topk": self.topk, "mask_size": self.mask_size,
            "mask_encoding": self.mask_encoding, "colormap": self.colormap, "alpha": self.alpha,
            "method_params": json.dumps(self.method_params) if self.method_params else None,
        }
        try:
            return ExplainForm.model_validate(values)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise InvalidOption(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None


class Gathered:
    """The images of a request as the pipeline takes them, and what was left out."""

    def __init__(self, study: str, instances: Sequence[Instance], skipped: list[dict[str, str]]) -> None:
        self.study = study
        self.instances = list(instances)
        self.skipped = skipped

    def sources(self) -> list[pipeline.Source]:
        return [(f"{i.sop_uid}.dcm", i.part10()) for i in self.instances]


def pacs_of(request: Request) -> Pacs:
    pacs: Pacs | None = getattr(request.app.state, "pacs", None)
    if pacs is None:
        raise NotFound("DICOMweb is not configured on this service (CAMSERVE_DICOMWEB_URL)")
    return pacs


async def gather(pacs: Pacs, body: DicomwebExplainRequest, limit: int) -> Gathered:
    """Find and retrieve the instances asked for; series in viewing order."""
    study = check_uid(body.study_uid, "study_uid")
    series = check_uid(body.series_uid, "series_uid") if body.series_uid else None
    wanted = [check_uid(uid, "instance_uids[]") for uid in body.instance_uids]
    pairs = await run_in_threadpool(pacs.find, study, series, wanted)
    if len(pairs) > limit:
        raise PayloadTooLarge(
            f"{len(pairs)} instances asked for; at most {limit} per request: submit a long series "
            "as a job (POST /jobs with this JSON body), or name fewer instances"
        )
    retrieved = [await run_in_threadpool(pacs.retrieve, study, se, sop) for se, sop in pairs]
    skipped = [{"sop_instance_uid": i.sop_uid, "reason": reason}
               for i in retrieved if (reason := i.skip_reason) is not None]
    by_series: dict[str, list[Instance]] = {}
    for instance in retrieved:
        if instance.skip_reason is None:
            by_series.setdefault(instance.series_uid, []).append(instance)
    ordered = [i for members in by_series.values() for i in slice_order(members)]
    if not ordered:
        raise NotFound(f"no image among the {len(retrieved)} instances asked for in study {study}")
    return Gathered(study, ordered, skipped)


async def explain_gathered(
    prepared: pipeline.Prepared, results: Sequence[ItemResult], gathered: Gathered, pacs: Pacs,
    body: DicomwebExplainRequest, request_id: str, settings: Settings,
) -> bytes:
    if not body.store:
        payload, _ = await pipeline.finish(prepared, results, request_id, settings,
                                           extra={"stored": [], "skipped": gathered.skipped})
        return payload
    assert prepared.plan is not None
    objects = await run_in_threadpool(dicom_results.build, prepared.plan, prepared.uploads, results)
    stored = await store_results(pacs, gathered.study, objects)
    extra: dict[str, Any] = {"stored": stored, "skipped": gathered.skipped}
    if body.asks_for_dicom:  # the client asked for the objects too, not only for the store
        extra["dicom"] = dicom_results.json_entries(objects)
    payload, _ = await pipeline.finish(prepared, results, request_id, settings, extra=extra, dicom=False)
    return payload


async def store_results(
    pacs: Pacs, study: str, objects: Sequence[tuple[dict[str, Any], bytes]]
) -> list[dict[str, str]]:
    """STOW-RS the objects into ``study``; what the PACS stored, with each object's series."""
    datasets = [pydicom.dcmread(io.BytesIO(data)) for _, data in objects]
    answered = await run_in_threadpool(pacs.store, study, datasets)
    series = {entry["sop_instance_uid"]: entry["series_instance_uid"] for entry, _ in objects}
    return [{**item, "series_instance_uid": series.get(item["sop_instance_uid"], "")} for item in answered]


def _series_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"max_images_per_request": settings.max_series_images})


@router.post(
    "/dicomweb/explain",
    summary="Explain a study, series or instances from the PACS",
    description=(
        "Retrieves the instances from the configured PACS (WADO-RS), orders a series by position, "
        "explains every frame and, with `store: true`, stores the DICOM results into the same study "
        "(STOW-RS). The answer is the POST /explain response plus `stored` and `skipped`. 404 when "
        "DICOMweb is not configured or the PACS has no such study, series or instance; 502 "
        "`pacs_unavailable` or `pacs_refused` when the PACS fails."
    ),
    responses=error_responses(400, 401, 404, 413, 415, 422, 500, 502, 503, 504),
)
async def dicomweb_explain(
    request: Request, engine: EngineDep, settings: SettingsDep,
    body: Annotated[DicomwebExplainRequest, Body(examples=[EXAMPLE])],
) -> Response:
    timer = pipeline.Timer()
    pacs = pacs_of(request)
    plan = plan_explain(body.form(), engine.catalog, engine.methods, settings.default_model)
    gathered = await gather(pacs, body, settings.max_images_per_request)
    deadline = pipeline.deadline_from(request.headers.get("x-request-timeout"), settings)
    prepared = await pipeline.prepare_explain(plan, gathered.sources(), settings, deadline, engine.admit,
                                              timer=timer)
    results = await engine.submit(prepared.items)
    payload = await explain_gathered(prepared, results, gathered, pacs, body, request_id_of(request),
                                     settings)
    return Response(payload, media_type="application/json")


@router.post("/dicomweb/jobs", include_in_schema=False, status_code=202, response_model=JobOut)
async def dicomweb_job(
    request: Request, engine: EngineDep, settings: SettingsDep, body: DicomwebExplainRequest,
) -> Response:
    """``POST /jobs`` with the JSON body (routed here by :func:`json_jobs`)."""
    timer = pipeline.Timer()
    pacs = pacs_of(request)
    plan = plan_explain(body.form(), engine.catalog, engine.methods, settings.default_model)
    gathered = await gather(pacs, body, settings.max_series_images)
    prepared = await pipeline.prepare_explain(
        plan, gathered.sources(), _series_settings(settings),
        time.monotonic() + settings.job_timeout_s, engine.admit, timer=timer,
    )
    for item in prepared.items:
        item.heavy = True
    for item in prepared.items:
        item.background = True
    engine.price(prepared.items)
    engine.admit_heavy(prepared.items)
    request_id = request_id_of(request)

    async def run(items: Sequence[WorkItem]) -> bytes:
        results = await engine.submit(items)
        return await explain_gathered(prepared, results, gathered, pacs, body, request_id, settings)

    job = request.app.state.jobs.create(prepared.items, plan.methods, request_id, run)
    return Response(job.dumps(), status_code=202, media_type="application/json",
                    headers={"Location": f"/jobs/{job.job_id}"})


class JsonJobs:
    """ASGI: ``POST /jobs`` with a JSON body is a DICOMweb job (``/dicomweb/jobs``); the
    multipart one stays the /explain form's. One path, two bodies, as the contract has it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/jobs":
            content_type = dict(scope.get("headers") or []).get(b"content-type", b"")
            if content_type.split(b";")[0].strip().lower() == b"application/json":
                scope = {**scope, "path": "/dicomweb/jobs", "raw_path": b"/dicomweb/jobs"}
        await self.app(scope, receive, send)
