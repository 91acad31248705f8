"""Browsing the PACS for the review page: studies, their series, a series' instances in viewing
order, and one frame as PNG.

The page never talks to the PACS itself: it asks these routes, which ask the one configured PACS
through :class:`~service.api.pacs.Pacs` (QIDO-RS to search, WADO-RS to retrieve) and answer
plain JSON, not DICOM JSON. Every answer is bounded: a search returns at most ``limit``
studies (100 at most), a listing at most :data:`MAX_LISTED` entries, and a preview is checked
against the decode limits from what the search says of the instance before it is retrieved,
then rendered with the same decoder and windowing as ``/explain``'s ``image`` output. Without
``CAMSERVE_DICOMWEB_URL`` these routes answer 404, like the other DICOMweb routes.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Path, Query, Request, Response
from PIL import Image
from pydicom.dataset import Dataset
from starlette.concurrency import run_in_threadpool

from service.api import pipeline
from service.api.deps import SettingsDep
from service.api.errors import error_responses
from service.api.pacs import Instance, check_uid, skip_reason, slice_order
from service.api.pacs_schemas import (
    MAX_LISTED,
    InstanceOut,
    InstancesOut,
    SeriesListOut,
    SeriesOut,
    StudiesOut,
    StudyOut,
)
from service.api.pacs_search import search_filters
from service.api.routes.dicomweb import pacs_of
from service.config import Settings
from service.errors import InvalidOption, UnsupportedMedia
from service.imaging.decode import iter_frames, shrink
from service.imaging.encode import display_size, png_bytes
from service.imaging.limits import MB, ByteBudget, DecodeLimits

router = APIRouter(tags=["dicomweb"])

PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"
# SOP classes that hold no picture whatever their attributes say: presentation states, raw
# data and spatial registration, structured reports and key objects, encapsulated documents.
_NO_PICTURE = tuple(f"1.2.840.10008.5.1.4.1.1.{n}." for n in (11, 66, 88, 104))

Uid = Annotated[str, Path(description="a DICOM UID",
                          examples=["1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"])]


# ---------------------------------------------------------------- answers as plain JSON


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    text = str(value).strip() if value is not None else ""
    return text or None


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value is not None and str(value).strip() != "" else None
    except (TypeError, ValueError):
        return None


def _iso_date(value: str | None) -> str | None:
    if value and len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value


def _iso_time(value: str | None) -> str | None:
    digits = (value or "").split(".")[0]
    if len(digits) >= 4 and digits.isdigit():
        return ":".join(digits[i:i + 2] for i in range(0, min(len(digits), 6), 2))
    return value


def study_out(ds: Dataset) -> StudyOut:
    value = ds.get("ModalitiesInStudy")
    listed = [] if value is None else [str(value)] if isinstance(value, str) else [str(m) for m in value]
    return StudyOut(
        study_uid=str(ds.get("StudyInstanceUID", "")), patient_name=_text(ds, "PatientName"),
        patient_id=_text(ds, "PatientID"), date=_iso_date(_text(ds, "StudyDate")),
        time=_iso_time(_text(ds, "StudyTime")), description=_text(ds, "StudyDescription"),
        accession=_text(ds, "AccessionNumber"), modalities=[m for m in listed if m],
        series_count=_int(ds, "NumberOfStudyRelatedSeries"),
        instance_count=_int(ds, "NumberOfStudyRelatedInstances"),
    )


def series_out(ds: Dataset) -> SeriesOut:
    return SeriesOut(
        series_uid=str(ds.get("SeriesInstanceUID", "")), modality=_text(ds, "Modality"),
        number=_int(ds, "SeriesNumber"), description=_text(ds, "SeriesDescription"),
        instance_count=_int(ds, "NumberOfSeriesRelatedInstances"),
    )


def listed_skip_reason(instance: Instance) -> str | None:
    """What ``POST /dicomweb/explain`` would skip, judged from the search (which carries no
    pixels): an instance without rows and columns, or of a class that never holds an image,
    has no pixel data; a parametric map is one by its SOP class."""
    ds = instance.dataset
    return skip_reason(ds, is_map=str(ds.get("SOPClassUID", "")) == PARAMETRIC_MAP,
                       has_pixels=_pictured(ds))


def _pictured(ds: Dataset) -> bool:
    return bool(_int(ds, "Rows") and _int(ds, "Columns")) and not str(
        ds.get("SOPClassUID", "")).startswith(_NO_PICTURE)


def instance_out(instance: Instance) -> InstanceOut:
    ds = instance.dataset
    reason = listed_skip_reason(instance)
    return InstanceOut(
        sop_instance_uid=instance.sop_uid, sop_class_uid=_text(ds, "SOPClassUID"),
        number=_int(ds, "InstanceNumber"), frames=_int(ds, "NumberOfFrames") or 1,
        rows=_int(ds, "Rows"), columns=_int(ds, "Columns"), image=reason is None, skip_reason=reason,
    )


def viewing_order(instances: list[Instance]) -> list[Instance]:
    """The images as the explanation of the series orders them, then the rest as listed."""
    images = [i for i in instances if listed_skip_reason(i) is None]
    others = [i for i in instances if listed_skip_reason(i) is not None]
    return slice_order(images) + others


# ---------------------------------------------------------------- routes

_PACS_ERRORS = error_responses(400, 401, 404, 413, 422, 502)


@router.get(
    "/dicomweb/studies",
    summary="Search the PACS for studies (QIDO-RS)",
    description=(
        "Studies of the configured PACS matching every filter given: `patient` (the patient's "
        "name, DICOM wildcards `*` and `?`, e.g. `DOE*`), `patient_id`, `date` (`YYYYMMDD` or a "
        "range `YYYYMMDD-YYYYMMDD`), `modality` (a modality in the study, e.g. `CT`) and "
        "`accession`; a page of `limit` studies from `offset`. 422 for a malformed filter, 404 "
        "without DICOMweb, 502 `pacs_unavailable` when the PACS cannot be reached."
    ),
    responses=_PACS_ERRORS,
)
async def search_studies(
    request: Request,
    patient: Annotated[str | None, Query(max_length=200, description="patient's name; * and ? match")] = None,
    patient_id: Annotated[str | None, Query(max_length=200, description="patient ID; * and ? match")] = None,
    date: Annotated[str | None, Query(max_length=40, description="YYYYMMDD or YYYYMMDD-YYYYMMDD")] = None,
    modality: Annotated[str | None, Query(max_length=40, description="a modality in the study")] = None,
    accession: Annotated[str | None, Query(max_length=200, description="accession number")] = None,
    limit: Annotated[int, Query(ge=1, le=100, description="studies per page")] = 25,
    offset: Annotated[int, Query(ge=0, le=1_000_000, description="studies to skip")] = 0,
) -> StudiesOut:
    pacs = pacs_of(request)
    filters = search_filters(patient, patient_id, date, modality, accession)
    # One more than the page: whether the PACS has more is known without counting them all.
    found = await run_in_threadpool(pacs.search_studies, filters, limit + 1, offset)
    studies = [study_out(ds) for ds in found if ds.get("StudyInstanceUID")]
    return StudiesOut(studies=studies[:limit], limit=limit, offset=offset, more=len(studies) > limit)


@router.get(
    "/dicomweb/studies/{study_uid}/series",
    summary="The series of a study in the PACS",
    description="Each series' UID, modality, number, description and number of instances, by "
    "series number. 404 when the PACS has no such study.",
    responses=_PACS_ERRORS,
)
async def list_series(request: Request, study_uid: Uid) -> SeriesListOut:
    pacs = pacs_of(request)
    study = check_uid(study_uid, "study_uid")
    found = await run_in_threadpool(pacs.search_series, study, MAX_LISTED + 1)
    series = sorted((series_out(ds) for ds in found[:MAX_LISTED] if ds.get("SeriesInstanceUID")),
                    key=lambda s: (s.number is None, s.number or 0, s.series_uid))
    return SeriesListOut(study_uid=study, series=series, truncated=len(found) > MAX_LISTED)


@router.get(
    "/dicomweb/studies/{study_uid}/series/{series_uid}/instances",
    summary="The instances of a series, in viewing order",
    description="The images in the order `POST /dicomweb/explain` explains the series (position "
    "along the slice normal, else instance number), each with its frames and size, then the "
    "instances it would skip, with why. 404 when the PACS has no such series.",
    responses=_PACS_ERRORS,
)
async def list_instances(request: Request, study_uid: Uid, series_uid: Uid) -> InstancesOut:
    pacs = pacs_of(request)
    study, series = check_uid(study_uid, "study_uid"), check_uid(series_uid, "series_uid")
    found = await run_in_threadpool(pacs.search_instances, study, series, MAX_LISTED + 1)
    ordered = viewing_order(found[:MAX_LISTED])
    return InstancesOut(study_uid=study, series_uid=series, instances=[instance_out(i) for i in ordered],
                        truncated=len(found) > MAX_LISTED)


@router.get(
    "/dicomweb/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/preview",
    summary="One frame of an instance as PNG",
    description="The frame as `/explain` shows it (`outputs=image`): decoded and windowed as "
    "the file says, at most `CAMSERVE_OVERLAY_MAX_SIDE` on its longer side. The instance is "
    "checked against the decode limits from what the PACS says of it before it is retrieved "
    "(WADO-RS). 404 when the PACS has no such instance, 413 over the limits, 415 when it is not "
    "an image, 422 for a frame it does not have.",
    responses={200: {"content": {"image/png": {}}, "description": "the frame as PNG"},
               **error_responses(400, 401, 404, 413, 415, 422, 502, 504)},
    response_class=Response,
)
async def preview(
    request: Request, settings: SettingsDep, study_uid: Uid, series_uid: Uid, sop_uid: Uid,
    frame: Annotated[int, Query(ge=0, le=100_000, description="the frame, from 0")] = 0,
) -> Response:
    pacs = pacs_of(request)
    study, series = check_uid(study_uid, "study_uid"), check_uid(series_uid, "series_uid")
    sop = check_uid(sop_uid, "sop_uid")
    deadline = pipeline.deadline_from(request.headers.get("x-request-timeout"), settings)
    listed = await run_in_threadpool(pacs.search_instances, study, series, 2, sop)
    limits = _limits(settings, deadline)
    _check_listed(listed[0], frame, limits)
    instance = await run_in_threadpool(pacs.retrieve, study, series, sop)
    png = await run_in_threadpool(_render, instance, frame, limits, settings)
    # A UID names one unchanging object: the browser may keep the picture while stepping back.
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=600"})


def _limits(settings: Settings, deadline: float) -> DecodeLimits:
    return DecodeLimits(
        settings.max_image_pixels, settings.max_frames,
        max_frame_bytes=int(settings.max_decoded_mb_per_frame * MB),
        request_bytes=ByteBudget(int(settings.max_decoded_mb_per_request * MB)), deadline=deadline,
        allow_truncated=settings.allow_truncated_images, reduce_to=(settings.overlay_max_side, 0),
    )


def _check_listed(instance: Instance, frame: int, limits: DecodeLimits) -> None:
    """Refuse from the search's answer, before anything is retrieved."""
    described = instance_out(instance)
    label = f"instance {instance.sop_uid}"
    # The service's own secondary captures are pictures too; only what has no pixels to show is
    # refused (a parametric map's are floats, which only a viewer of maps over images shows).
    if not _pictured(instance.dataset) or described.sop_class_uid == PARAMETRIC_MAP:
        raise UnsupportedMedia(f"{label} has no picture to show: {described.skip_reason}")
    limits.check_frames(described.frames, label)
    if described.rows and described.columns:
        limits.check_pixels(described.columns, described.rows, label)
        # The decoder charges every frame's decoded bytes before it decodes one (per frame and
        # per request): the same check here, on a budget of its own, refuses before the
        # retrieve what would be retrieved only to be refused.
        ds = instance.dataset
        per_frame = -(-(_int(ds, "BitsAllocated") or 8) // 8) * (_int(ds, "SamplesPerPixel") or 1)
        budget = limits.request_bytes
        trial = replace(limits, request_bytes=ByteBudget(budget.limit) if budget is not None else None)
        for index in range(described.frames):
            trial.check_bytes(described.columns, described.rows, per_frame,
                              f"{label} frame {index}" if described.frames > 1 else label)
    if frame >= described.frames:
        raise InvalidOption(f"frame {frame} asked for; {label} has {described.frames} "
                            f"frame{'s' if described.frames > 1 else ''} (0 to {described.frames - 1})")


def _render(instance: Instance, frame: int, limits: DecodeLimits, settings: Settings) -> bytes:
    """The frame through the service's decoder, shrunk and sized as ``image_png`` is."""
    for decoded in iter_frames(instance.part10(), limits, f"{instance.sop_uid}.dcm"):
        if decoded.frame != frame:
            continue  # the decoder yields frames in order; the earlier ones are let go at once
        shown = shrink(decoded, limits.reduce_to)
        size = display_size(decoded.width, decoded.height, settings.overlay_max_side)
        image = shown.image if shown.image.size == size else shown.image.resize(
            size, Image.Resampling.BILINEAR)
        return png_bytes(np.asarray(image), settings.png_compress_level)
    raise InvalidOption(f"instance {instance.sop_uid} has no frame {frame}")
