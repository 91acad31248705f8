"""A source file's metadata as highdicom reads it.

highdicom places a parametric map on its source through the source's frame of reference,
plane orientation, pixel spacing and plane positions. Single-frame images carry them as top-level
attributes and enhanced multi-frame images in functional groups, both of which highdicom reads.
Legacy multi-frame images (RT Dose, older NM and US files) carry one position and a frame offset
vector; :func:`highdicom_view` gives them the functional groups highdicom expects, computed
from those attributes, on a copy: the file's UIDs, and so every reference, stay the source's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset

__all__ = ["frame_count", "highdicom_view", "placement_problem"]


def frame_count(ds: Dataset) -> int:
    return int(ds.get("NumberOfFrames") or 1)


def _enhanced(ds: Dataset) -> bool:
    return "SharedFunctionalGroupsSequence" in ds or "PerFrameFunctionalGroupsSequence" in ds


def placement_problem(ds: Dataset) -> str | None:
    """Why no parametric map can be placed on this source (None: it can)."""
    if "FrameOfReferenceUID" not in ds:
        return "it has no frame of reference (FrameOfReferenceUID), so a map cannot be placed on it"
    if _enhanced(ds):
        shared = ds.get("SharedFunctionalGroupsSequence")
        if not shared or "PlaneOrientationSequence" not in shared[0]:
            return "its frames have no shared plane orientation"
        return None
    if "ImageOrientationPatient" not in ds or "ImagePositionPatient" not in ds:
        return "it has no image position and orientation (patient)"
    if "PixelSpacing" not in ds:
        return "it has no pixel spacing"
    if frame_count(ds) > 1 and _frame_offsets(ds) is None:
        return "it is a multi-frame file without a frame offset vector (GridFrameOffsetVector)"
    return None


def highdicom_view(ds: Dataset) -> Dataset:
    """The metadata itself, or for a legacy multi-frame file a copy with functional groups."""
    if frame_count(ds) == 1 or _enhanced(ds) or placement_problem(ds) is not None:
        return ds
    view = Dataset()
    for element in ds:  # elements shared with ds; the functional groups are the view's own
        view.add(element)
    if hasattr(ds, "file_meta"):
        view.file_meta = ds.file_meta
    orientation = [float(v) for v in ds.ImageOrientationPatient]
    origin = np.array([float(v) for v in ds.ImagePositionPatient])
    normal = np.cross(orientation[:3], orientation[3:])
    offsets = _frame_offsets(ds)
    assert offsets is not None
    measures = Dataset()
    measures.PixelSpacing = list(ds.PixelSpacing)
    thickness = ds.get("SliceThickness")
    measures.SliceThickness = thickness if thickness not in (None, "") else _spacing(offsets)
    plane = Dataset()
    plane.ImageOrientationPatient = orientation
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    shared.PlaneOrientationSequence = [plane]
    view.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for offset in offsets:
        position = Dataset()
        position.ImagePositionPatient = [round(float(v), 6) for v in origin + offset * normal]
        item = Dataset()
        item.PlanePositionSequence = [position]
        frames.append(item)
    view.PerFrameFunctionalGroupsSequence = frames
    return view


def _frame_offsets(ds: Dataset) -> list[float] | None:
    """Each frame's distance along the plane normal from the first (RT Dose's grid offsets,
    relative when the first is 0, else absolute along the normal: both read the same here)."""
    vector = ds.get("GridFrameOffsetVector")
    if vector is None:
        return None
    values = [float(v) for v in (vector if isinstance(vector, Sequence) else [vector])]
    if len(values) != frame_count(ds):
        return None
    first = values[0]
    return [v - first for v in values]


def _spacing(offsets: Sequence[float]) -> float:
    steps = np.diff(np.asarray(offsets, dtype=np.float64))
    return float(np.abs(steps).min()) if len(steps) and np.abs(steps).min() > 0 else 1.0
