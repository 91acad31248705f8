"""The writers on their own (no model): a map over some frames of a multi-frame source, the
view highdicom reads of a legacy multi-frame file, and what placement_problem refuses."""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
import pydicom
import pytest

from service.imaging.dicom import _metadata
from service.radiology import geometry, objects, report
from tests.imaging import dicom_samples
from tests.radiology.test_dicom_results import dciodvfy_errors

IDENTITY = objects.Identity("0.1.0", "mobilenet_v2", "imagenet1k-v1")


def source(name: str) -> pydicom.Dataset:
    return _metadata(pydicom.dcmread(io.BytesIO(dicom_samples.bundled(name))))


def test_metadata_drops_the_pixels_and_keeps_the_rest() -> None:
    full = pydicom.dcmread(io.BytesIO(dicom_samples.bundled("CT_small.dcm")))
    kept = _metadata(full)
    assert "PixelData" in full and "PixelData" not in kept
    assert kept.SOPInstanceUID == full.SOPInstanceUID and kept.PatientName == full.PatientName
    assert kept.file_meta.TransferSyntaxUID == full.file_meta.TransferSyntaxUID


def test_a_map_over_some_frames_references_and_places_those_frames() -> None:
    ds = source("rtdose.dcm")
    frames = (2, 5, 11)
    rng = np.random.default_rng(0)
    maps = rng.random((len(frames), ds.Rows, ds.Columns), dtype=np.float32)
    smap = objects.SourceMap("gradcam", "features.18", 285, "Egyptian cat", frames, (0.5, 0.6, 0.7), maps)
    pm = objects.parametric_map(ds, smap, IDENTITY, objects.SeriesPlan("pm", "camserve maps", 9101))
    data = objects.part10(pm)
    assert dciodvfy_errors(data) == []
    read = pydicom.dcmread(io.BytesIO(data))
    assert read.NumberOfFrames == 3
    view = geometry.highdicom_view(ds)
    numbers = []
    for at, group in enumerate(read.PerFrameFunctionalGroupsSequence):
        ref = group.DerivationImageSequence[0].SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == ds.SOPInstanceUID
        number = int(ref.ReferencedFrameNumber)
        numbers.append(number)
        expected = view.PerFrameFunctionalGroupsSequence[number - 1].PlanePositionSequence[0]
        assert np.allclose(group.PlanePositionSequence[0].ImagePositionPatient,
                           expected.ImagePositionPatient)
        pixels = np.asarray(read.pixel_array, np.float32)[at]
        assert np.array_equal(pixels, maps[frames.index(number - 1)])
    assert sorted(numbers) == [f + 1 for f in frames]


def test_the_view_of_a_legacy_multiframe_file_leaves_the_file_alone() -> None:
    ds = source("rtdose.dcm")
    view = geometry.highdicom_view(ds)
    assert "PerFrameFunctionalGroupsSequence" in view and "PerFrameFunctionalGroupsSequence" not in ds
    assert len(view.PerFrameFunctionalGroupsSequence) == ds.NumberOfFrames
    assert view.SOPInstanceUID == ds.SOPInstanceUID
    single = source("CT_small.dcm")
    assert geometry.highdicom_view(single) is single


@pytest.mark.parametrize(("name", "reason"), [
    ("SC_rgb_rle_2frame.dcm", "frame of reference"),
    ("CT_small.dcm", None),
    ("rtdose.dcm", None),
])
def test_placement_problem(name: str, reason: str | None) -> None:
    problem = geometry.placement_problem(source(name))
    assert (problem is None) if reason is None else (reason in str(problem))


def test_labels_are_coded_in_the_local_scheme() -> None:
    code = objects.label_code(285, "Egyptian cat")
    assert (code.value, code.scheme_designator, code.meaning) == ("285", "99CAMSERVE", "Egyptian cat")
    long = objects.label_code(1, "x" * 100)
    assert len(long.meaning) == 64
    assert isinstance(code, hd.sr.CodedConcept)


def test_an_overlay_of_some_frames_of_a_multiframe_source() -> None:
    ds = source("rtdose.dcm")
    rng = np.random.default_rng(1)
    for frames in ((4,), (1, 3)):
        maps = rng.random((len(frames), ds.Rows, ds.Columns), dtype=np.float32)
        rgb = rng.integers(0, 255, (len(frames), ds.Rows, ds.Columns, 3), dtype=np.uint8)
        smap = objects.SourceMap("gradcam", "features.18", 1, "goldfish", frames, (0.4,) * len(frames), maps)
        sc = objects.secondary_capture(ds, smap, rgb, IDENTITY, objects.SeriesPlan("sc", "camserve", 9102))
        data = objects.part10(sc)
        assert dciodvfy_errors(data) == []
        read = pydicom.dcmread(io.BytesIO(data))
        assert read.NumberOfFrames == len(frames) and read.BurnedInAnnotation == "YES"
        assert [int(r.ReferencedFrameNumber) for r in read.SourceImageSequence] == [f + 1 for f in frames]
        assert np.array_equal(read.pixel_array.reshape(rgb.shape), rgb)


def test_a_de_identified_source_gives_de_identified_results() -> None:
    ds = source("CT_small.dcm")
    ds.PatientIdentityRemoved = "YES"
    smap = objects.SourceMap("gradcam", "features.18", 1, "goldfish", (0,), (0.4,),
                             np.zeros((1, ds.Rows, ds.Columns), np.float32) + 0.5)
    written = report.structured_report(
        ds, [report.FramePredictions(0, ((1, "goldfish", 0.4),))], [(smap, None)], IDENTITY,
        objects.SeriesPlan("sr", "camserve", 9103))
    data = objects.part10(written)
    assert dciodvfy_errors(data) == []
    read = pydicom.dcmread(io.BytesIO(data))
    assert read.PatientIdentityRemoved == "YES" and read.DeidentificationMethod
