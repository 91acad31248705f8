"""An explanation's DICOM outputs (``dicom_pm``, ``dicom_sc``, ``dicom_sr``): the check before
anything is queued, and the objects once the maps are computed (service.radiology writes them).

The parametric map and the burned-in overlay need the map at the source's own rows and
columns, uncapped: :func:`map_size` asks the engine for its display map at that size, which is
the same bilinear upsampling of the layer's grid that ``mask_size=original`` returns, so the
map's pixels equal that mask whenever the mask is not capped (CAMSERVE_MASK_MAX_SIDE).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

import service
from service.api.options import DICOM_OUTPUTS, ExplainPlan
from service.api.render import Upload
from service.engine.jobs import ItemResult
from service.errors import InvalidOption
from service.imaging import encode

MULTIPART_TYPE = 'multipart/related; type="application/dicom"'
_PIXEL_OUTPUTS = frozenset({"dicom_pm", "dicom_sc"})
_PER_OBJECT = 16 * 1024  # header, functional groups, references: generous


def wanted(plan: ExplainPlan) -> bool:
    return bool(DICOM_OUTPUTS & plan.outputs)


def map_size(plan: ExplainPlan, upload: Upload) -> tuple[int, int] | None:
    """(height, width) the engine's display map must have for these outputs, or None."""
    if not _PIXEL_OUTPUTS & plan.outputs:
        return None
    return upload.frame.height, upload.frame.width


def _label(upload: Upload) -> str:
    return f"file {upload.filename!r}" if upload.filename else f"file {upload.index}"


def check(plan: ExplainPlan, uploads: Sequence[Upload]) -> None:
    """422 naming the file when DICOM outputs are asked of a file that cannot have them."""
    if not wanted(plan):
        return
    from service.radiology.geometry import placement_problem

    for upload in uploads:
        dataset = upload.frame.dataset
        if dataset is None:
            raise InvalidOption(
                f"{_label(upload)} is not DICOM; outputs {', '.join(sorted(DICOM_OUTPUTS & plan.outputs))} "
                "are written for DICOM inputs only (ask for mask, overlay or heatmap)"
            )
        problem = placement_problem(dataset) if "dicom_pm" in plan.outputs else None
        if problem:
            raise InvalidOption(
                f"{_label(upload)} cannot have a parametric map (dicom_pm): {problem}; "
                "dicom_sc and dicom_sr can be written for it"
            )


def response_bytes(plan: ExplainPlan, upload: Upload, maps: int) -> int:
    """An upper bound on this frame's share of the `dicom` list, base64 as sent."""
    pixels = upload.frame.width * upload.frame.height
    total = 0
    if "dicom_pm" in plan.outputs:
        total += maps * (_base64(4 * pixels) + _PER_OBJECT)  # float32
    if "dicom_sc" in plan.outputs:
        total += maps * (_base64(3 * pixels) + _PER_OBJECT)  # RGB
    if "dicom_sr" in plan.outputs:
        total += _PER_OBJECT + maps * 4096
    return total


def _base64(nbytes: int) -> int:
    return 4 * -(-nbytes // 3)


def build(
    plan: ExplainPlan, uploads: Sequence[Upload], results: Sequence[ItemResult]
) -> list[tuple[dict[str, Any], bytes]]:
    """Every DICOM object of the response: (its `dicom` entry without `data`, its Part 10 bytes),
    files in upload order, and within one: parametric maps, secondary captures, the report."""
    if not wanted(plan):
        return []
    from service.radiology import objects, report

    identity = objects.Identity(service.__version__, plan.model.name, plan.model.version)
    series = {
        "parametric_map": objects.SeriesPlan("parametric_map", "camserve class activation maps", 9101),
        "secondary_capture": objects.SeriesPlan("secondary_capture", "camserve CAM overlays", 9102),
        "structured_report": objects.SeriesPlan("structured_report", "camserve classification report", 9103),
    }
    files: dict[int, list[tuple[Upload, ItemResult]]] = {}
    for upload, result in zip(uploads, results, strict=True):
        files.setdefault(upload.index, []).append((upload, result))
    out: list[tuple[dict[str, Any], bytes]] = []
    for index, frames in files.items():
        source = frames[0][0].frame.dataset
        maps = _source_maps(plan, frames)
        written: list[tuple[objects.SourceMap, Any]] = []
        for smap in maps:
            pm = None
            if "dicom_pm" in plan.outputs:
                pm = objects.parametric_map(source, smap, identity, series["parametric_map"])
                out.append(_entry("parametric_map", index, smap, pm, source))
            written.append((smap, pm))
        if "dicom_sc" in plan.outputs:
            by_frame = {upload.frame.frame: upload for upload, _ in frames}
            for smap in maps:
                rgb = np.stack([_burn_in(plan, by_frame[f], m)
                                for f, m in zip(smap.frames, smap.maps, strict=True)])
                sc = objects.secondary_capture(source, smap, rgb, identity, series["secondary_capture"])
                out.append(_entry("secondary_capture", index, smap, sc, source))
        if "dicom_sr" in plan.outputs:
            predictions = [report.FramePredictions(upload.frame.frame, tuple(
                (idx, plan.model.labels[idx], float(score)) for idx, score in result.predictions
            )) for upload, result in frames]
            sr = report.structured_report(
                source, predictions, written, identity, series["structured_report"])
            out.append(_entry("structured_report", index, None, sr, source))
    return out


def _source_maps(plan: ExplainPlan, frames: Sequence[tuple[Upload, ItemResult]]) -> list[Any]:
    """One map per (method, class) over the frames that have it, in first-seen order."""
    from service.radiology.objects import SourceMap

    grouped: dict[tuple[str, int], list[tuple[int, str, float, np.ndarray | None]]] = {}
    for upload, result in frames:
        for item in result.explanations:
            grouped.setdefault((item.method, item.class_idx), []).append(
                (upload.frame.frame, ",".join(item.layers), float(item.score), item.display))
    maps = []
    for (method, class_idx), rows in grouped.items():
        height, width = frames[0][0].frame.height, frames[0][0].frame.width
        stack = np.stack([
            row[3] if row[3] is not None else np.zeros((height, width), np.float32) for row in rows
        ]).astype(np.float32, copy=False)
        maps.append(SourceMap(method, rows[0][1], class_idx, plan.model.labels[class_idx],
                              tuple(r[0] for r in rows), tuple(r[2] for r in rows), stack))
    return maps


def _burn_in(plan: ExplainPlan, upload: Upload, mask: np.ndarray) -> np.ndarray:
    """The displayed frame with the coloured map blended in, at the source's size (the kept
    frame is upsampled when it was held smaller than the source, see CAMSERVE_OVERLAY_MAX_SIDE)."""
    height, width = mask.shape
    image = upload.frame.image
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    return encode.overlay(image, mask, plan.form.colormap, plan.form.alpha)


def _entry(kind: str, index: int, smap: Any, obj: Any, source: Any) -> tuple[dict[str, Any], bytes]:
    from service.radiology.objects import part10

    return {
        "kind": kind,
        "file_index": index,
        "method": smap.method if smap is not None else None,
        "class_idx": smap.class_idx if smap is not None else None,
        "sop_class_uid": str(obj.SOPClassUID),
        "sop_instance_uid": str(obj.SOPInstanceUID),
        "series_instance_uid": str(obj.SeriesInstanceUID),
        "study_instance_uid": str(source.StudyInstanceUID),
    }, part10(obj)


def json_entries(objects_: Sequence[tuple[dict[str, Any], bytes]]) -> list[dict[str, Any]]:
    return [{**entry, "data": base64.b64encode(data).decode("ascii")} for entry, data in objects_]


def multipart(objects_: Sequence[tuple[dict[str, Any], bytes]], boundary: str) -> bytes:
    """DICOMweb's multipart/related body: one application/dicom part per object."""
    chunks: list[bytes] = []
    for _, data in objects_:
        chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii"), data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode("ascii"))
    return b"".join(chunks)


def accepts_multipart(accept: str | None) -> bool:
    """Whether the Accept header asks for DICOMweb's multipart answer."""
    if not accept:
        return False
    for choice in accept.split(","):
        media, *params = [part.strip() for part in choice.split(";")]
        if media.lower() != "multipart/related":
            continue
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "type" and value.strip().strip('"').lower() == "application/dicom":
                return True
    return False
