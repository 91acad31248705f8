"""DICOM outputs over HTTP with the real model: every object validated with dciodvfy, read back
with pydicom and highdicom, its pixels, geometry and references checked against the source."""

from __future__ import annotations

import base64
import copy
import email.parser
import email.policy
import io
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid

from tests.imaging import dicom_samples

ALL = "mask,dicom_pm,dicom_sc,dicom_sr"
PM, SC, SR = "parametric_map", "secondary_capture", "structured_report"


def monochrome1_16bit() -> bytes:
    """MR_small made MONOCHROME1 (higher values darker) with its own 16-bit pixels."""
    ds = pydicom.dcmread(io.BytesIO(dicom_samples.bundled("MR_small.dcm")))
    rows, cols = int(ds.Rows), int(ds.Columns)
    ramp = (np.add.outer(np.arange(rows), np.arange(cols)) * 400).astype(np.int16)
    ds.PixelData = ramp.tobytes()
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def enhanced_ct() -> bytes:
    """Three CT_small slices 5 mm apart as one Legacy Converted Enhanced CT (functional groups)."""
    base = pydicom.dcmread(io.BytesIO(dicom_samples.bundled("CT_small.dcm")))
    series, slices = generate_uid(), []
    for index in range(3):
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = generate_uid(), series, index + 1
        position = [float(v) for v in base.ImagePositionPatient]
        position[2] += 5 * index
        ds.ImagePositionPatient, ds.SliceLocation = position, position[2]
        slices.append(ds)
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(slices, generate_uid(), 1, generate_uid(), 1)
    buffer = io.BytesIO()
    enhanced.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def geometry(source: pydicom.Dataset) -> tuple[list[float], list[float], list[list[float]]]:
    """The source's pixel spacing, orientation and each frame's position, wherever it keeps them."""
    if "PerFrameFunctionalGroupsSequence" in source:
        shared = source.SharedFunctionalGroupsSequence[0]
        return (shared.PixelMeasuresSequence[0].PixelSpacing,
                shared.PlaneOrientationSequence[0].ImageOrientationPatient,
                [g.PlanePositionSequence[0].ImagePositionPatient
                 for g in source.PerFrameFunctionalGroupsSequence])
    origin = np.asarray(source.ImagePositionPatient, float)
    if "GridFrameOffsetVector" not in source:
        return source.PixelSpacing, source.ImageOrientationPatient, [list(origin)]
    # RT Dose: frame n lies GridFrameOffsetVector[n] along the normal from the first
    offsets = np.asarray(source.GridFrameOffsetVector, dtype=float)
    cosines = np.asarray(source.ImageOrientationPatient, float)
    normal = np.cross(cosines[:3], cosines[3:])
    return (source.PixelSpacing, source.ImageOrientationPatient,
            [list(origin + (offset - offsets[0]) * normal) for offset in offsets])


SOURCES = {
    "enhanced": enhanced_ct,
    "ct": lambda: dicom_samples.bundled("CT_small.dcm"),
    "mr": lambda: dicom_samples.bundled("MR_small.dcm"),
    "rle": lambda: dicom_samples.bundled("MR_small_RLE.dcm"),
    "multiframe": lambda: dicom_samples.bundled("rtdose.dcm"),
    "monochrome1": monochrome1_16bit,
}


def explain(client: TestClient, name: str, data: bytes, **form: str) -> Any:
    fields = {"outputs": ALL, "mask_size": "original", "mask_encoding": "base64", **form}
    response = client.post("/explain", files={"file": (name, data, "application/dicom")}, data=fields)
    assert response.status_code == 200, response.text
    return response.json()


def dciodvfy_errors(data: bytes) -> list[str]:
    assert shutil.which("dciodvfy"), "dciodvfy is missing: `make dicom-tools` installs dicom3tools"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "object.dcm"
        path.write_bytes(data)
        run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    assert any(line.strip() for line in lines)  # it ran and said something (the IOD's name)
    return [line for line in lines if line.startswith("Error")]


def mask_of(explanation: dict[str, Any]) -> np.ndarray:
    mask = explanation["mask"]
    return np.frombuffer(base64.b64decode(mask["data"]), dtype="<f4").reshape(mask["shape"])


def objects(body: dict[str, Any], kind: str) -> list[tuple[dict[str, Any], pydicom.Dataset]]:
    return [(entry, pydicom.dcmread(io.BytesIO(base64.b64decode(entry["data"]))))
            for entry in body["dicom"] if entry["kind"] == kind]


@pytest.fixture(scope="module", params=sorted(SOURCES))
def answered(request: pytest.FixtureRequest, client: TestClient) -> tuple[pydicom.Dataset, Any]:
    data = SOURCES[request.param]()
    return pydicom.dcmread(io.BytesIO(data)), explain(client, f"{request.param}.dcm", data)


def test_every_object_passes_dciodvfy_and_reads_back(answered: tuple[pydicom.Dataset, Any]) -> None:
    _, body = answered
    kinds = [entry["kind"] for entry in body["dicom"]]
    assert kinds.count(SR) == 1 and kinds.count(PM) >= 1 and kinds.count(PM) == kinds.count(SC)
    for entry in body["dicom"]:
        data = base64.b64decode(entry["data"])
        assert data[128:132] == b"DICM"
        assert dciodvfy_errors(data) == [], entry["kind"]
        ds = pydicom.dcmread(io.BytesIO(data))
        assert ds.SOPInstanceUID == entry["sop_instance_uid"]
        assert ds.SOPClassUID == entry["sop_class_uid"]
        assert ds.SeriesInstanceUID == entry["series_instance_uid"]
        reader = {PM: hd.pm.ParametricMap.from_dataset, SR: hd.sr.srread}.get(entry["kind"])
        read = reader(io.BytesIO(data) if entry["kind"] == SR else ds) if reader else hd.imread(
            io.BytesIO(data))
        assert read.SOPInstanceUID == ds.SOPInstanceUID


def test_parametric_map_pixels_equal_the_original_size_mask(
    answered: tuple[pydicom.Dataset, Any],
) -> None:
    source, body = answered
    frames = int(source.get("NumberOfFrames") or 1)
    assert len(body["results"]) == frames
    for entry, ds in objects(body, PM):
        masks_by_frame = {r["image"]["frame"]: mask_of(e) for r in body["results"] for e in r["explanations"]
                          if e["method"] == entry["method"] and e["class_idx"] == entry["class_idx"]}
        # highdicom orders a multi-frame map's frames by position: each names its source frame.
        order = [int(g.DerivationImageSequence[0].SourceImageSequence[0].get("ReferencedFrameNumber", 1)) - 1
                 for g in ds.PerFrameFunctionalGroupsSequence]
        masks = [masks_by_frame[f] for f in order]
        assert sorted(order) == sorted(masks_by_frame)
        pixels = np.asarray(ds.pixel_array, dtype=np.float32).reshape(len(masks), ds.Rows, ds.Columns)
        assert (ds.Rows, ds.Columns) == (source.Rows, source.Columns)
        assert ds.BitsAllocated == 32 and "FloatPixelData" in ds
        np.testing.assert_allclose(pixels, np.stack(masks), rtol=0, atol=1e-6)
        assert pixels.min() >= 0.0 and pixels.max() <= 1.0 and pixels.max() > pixels.min()
        assert ds.ContentLabel == "HEATMAP"
        mapping = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
        assert mapping.LUTLabel == "Class Activation"
        assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "1"  # UCUM: no units
        assert entry["method"] in ds.ContentDescription and str(entry["class_idx"]) in ds.ContentDescription
        assert len(ds.ContentDescription) <= 64 and "mobilenet_v2" in ds.ContentDescription
        label = next(e["label"] for r in body["results"] for e in r["explanations"]
                     if e["class_idx"] == entry["class_idx"])
        for group in ds.PerFrameFunctionalGroupsSequence:
            full = group.DerivationImageSequence[0].DerivationDescription
            assert label in full and "imagenet1k-v1" in full and entry["method"] in full


def test_objects_join_the_source_study_and_reference_it(answered: tuple[pydicom.Dataset, Any]) -> None:
    source, body = answered
    frames = int(source.get("NumberOfFrames") or 1)
    for entry in body["dicom"]:
        ds = pydicom.dcmread(io.BytesIO(base64.b64decode(entry["data"])))
        assert ds.StudyInstanceUID == source.StudyInstanceUID == entry["study_instance_uid"]
        for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyID",
                        "StudyDate", "AccessionNumber"):
            assert str(ds.get(keyword, "")) == str(source.get(keyword, "")), keyword
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert ds.Manufacturer == "camserve" and ds.SoftwareVersions
        assert ds.SeriesDescription.startswith("camserve")
        if entry["kind"] != SR:
            assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID
    for _, pm in objects(body, PM):
        refs = pm.ReferencedSeriesSequence[0].ReferencedInstanceSequence
        assert [r.ReferencedSOPInstanceUID for r in refs] == [source.SOPInstanceUID]
        per_frame = pm.PerFrameFunctionalGroupsSequence
        assert len(per_frame) == pm.NumberOfFrames == frames
        numbers = []
        for group in per_frame:
            derived = group.DerivationImageSequence[0].SourceImageSequence[0]
            assert derived.ReferencedSOPInstanceUID == source.SOPInstanceUID
            if frames > 1:
                numbers.append(int(derived.ReferencedFrameNumber))
        assert sorted(numbers) == (list(range(1, frames + 1)) if frames > 1 else [])
        spacing, orientation, source_positions = geometry(source)
        shared = pm.SharedFunctionalGroupsSequence[0]
        assert np.allclose(shared.PixelMeasuresSequence[0].PixelSpacing, spacing)
        assert np.allclose(shared.PlaneOrientationSequence[0].ImageOrientationPatient, orientation)
        positions = np.asarray([g.PlanePositionSequence[0].ImagePositionPatient for g in per_frame], float)
        expected = [source_positions[n - 1] for n in numbers] if frames > 1 else source_positions
        assert np.allclose(positions, np.asarray(expected, float), atol=1e-4)
    for _, sc in objects(body, SC):
        assert sc.BurnedInAnnotation == "YES" and sc.PhotometricInterpretation == "RGB"
        assert (sc.Rows, sc.Columns) == (source.Rows, source.Columns)
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert int(sc.get("NumberOfFrames") or 1) == frames
    [(_, sr)] = objects(body, SR)
    evidence = {item.ReferencedSOPInstanceUID
                for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for item in series.ReferencedSOPSequence}
    assert evidence == {source.SOPInstanceUID} | {e["sop_instance_uid"] for e in body["dicom"]
                                                   if e["kind"] == PM}


def test_report_codes_predictions_in_the_local_scheme(answered: tuple[pydicom.Dataset, Any]) -> None:
    _, body = answered
    [(_, sr)] = objects(body, SR)
    report = hd.sr.srread(io.BytesIO(base64.b64decode(
        next(e["data"] for e in body["dicom"] if e["kind"] == SR))))
    assert report.SOPInstanceUID == sr.SOPInstanceUID
    codes: dict[str, str] = {}

    def walk(items: Any) -> None:
        for item in items:
            for name in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
                for code in item.get(name, []):
                    if code.CodingSchemeDesignator == "99CAMSERVE":
                        codes[code.CodeValue] = code.CodeMeaning
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    for result in body["results"]:
        for prediction in result["predictions"]:
            assert codes[str(prediction["class_idx"])] == prediction["label"][:64]
    texts: list[str] = []

    def text_values(items: Any) -> None:
        for item in items:
            if "TextValue" in item:
                texts.append(str(item.TextValue))
            text_values(item.get("ContentSequence", []))

    text_values(sr.ContentSequence)
    text = " | ".join(texts)
    for explanation in body["results"][0]["explanations"]:
        assert f"method {explanation['method']}" in text and f"layer {explanation['target_layer']}" in text
    assert "mobilenet_v2" in text


def test_two_requests_give_distinct_uids(client: TestClient) -> None:
    data = dicom_samples.bundled("CT_small.dcm")
    first, second = (explain(client, "ct.dcm", data) for _ in range(2))
    for key in ("sop_instance_uid", "series_instance_uid"):
        a = {e[key] for e in first["dicom"]}
        b = {e[key] for e in second["dicom"]}
        assert a and b and not a & b
    assert len({e["sop_instance_uid"] for e in first["dicom"]}) == len(first["dicom"])


def test_multipart_answer_is_dicomweb(client: TestClient) -> None:
    data = dicom_samples.bundled("MR_small.dcm")
    response = client.post(
        "/explain", files={"file": ("mr.dcm", data, "application/dicom")},
        data={"outputs": "dicom_pm,dicom_sc,dicom_sr", "methods": "gradcam,layercam"},
        headers={"Accept": 'multipart/related; type="application/dicom"'},
    )
    assert response.status_code == 200, response.text
    content_type = response.headers["content-type"]
    assert content_type.startswith("multipart/related") and 'type="application/dicom"' in content_type
    assert "boundary=" in content_type
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + response.content)
    assert message.is_multipart()
    parts = list(message.iter_parts())
    assert len(parts) == 5  # two maps, two overlays, one report
    classes = []
    for part in parts:
        assert part.get_content_type() == "application/dicom"
        payload = part.get_payload(decode=True)
        ds = pydicom.dcmread(io.BytesIO(payload))
        classes.append(str(ds.SOPClassUID))
    assert classes.count("1.2.840.10008.5.1.4.1.1.30") == 2
    assert classes.count("1.2.840.10008.5.1.4.1.1.7") == 2
    assert classes.count("1.2.840.10008.5.1.4.1.1.88.34") == 1


def test_multipart_without_dicom_outputs_is_422(client: TestClient) -> None:
    response = client.post(
        "/explain", files={"file": ("mr.dcm", dicom_samples.bundled("MR_small.dcm"), "application/dicom")},
        data={"outputs": "mask"}, headers={"Accept": 'multipart/related; type="application/dicom"'},
    )
    assert response.status_code == 422 and "dicom_pm" in response.json()["error"]["message"]


def test_png_asked_for_a_parametric_map_is_422_naming_it(client: TestClient, cat_png: bytes) -> None:
    response = client.post("/explain", files={"file": ("cat.png", cat_png, "image/png")},
                           data={"outputs": "dicom_pm"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_option" and "'cat.png'" in error["message"]
    assert "not DICOM" in error["message"]


def test_dicom_without_pixel_data_is_415(client: TestClient) -> None:
    ds = pydicom.dcmread(io.BytesIO(dicom_samples.bundled("CT_small.dcm")))
    del ds.PixelData
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    part = ("nopixels.dcm", buffer.getvalue(), "application/dicom")
    response = client.post("/explain", files={"file": part}, data={"outputs": "dicom_pm"})
    assert response.status_code == 415 and "without pixel data" in response.json()["error"]["message"]


def test_source_without_geometry_gets_no_map_but_an_overlay_and_a_report(client: TestClient) -> None:
    data = dicom_samples.bundled("SC_rgb_rle_2frame.dcm")  # no frame of reference
    refused = client.post("/explain", files={"file": ("sc.dcm", data, "application/dicom")},
                          data={"outputs": "dicom_pm"})
    assert refused.status_code == 422
    assert "'sc.dcm'" in refused.json()["error"]["message"]
    assert "frame of reference" in refused.json()["error"]["message"]
    body = explain(client, "sc.dcm", data, outputs="dicom_sc,dicom_sr", class_idx="285")
    assert [e["kind"] for e in body["dicom"]] == [SC, SR]
    for entry in body["dicom"]:
        assert dciodvfy_errors(base64.b64decode(entry["data"])) == []
    [(_, sc)] = objects(body, SC)
    assert sc.NumberOfFrames == 2 and sc.BurnedInAnnotation == "YES"


def test_a_source_without_its_type_2_patient_and_study_attributes_gets_a_report(client: TestClient) -> None:
    """Birth date, sex, study ID and time may be left out of a file (the PACS browser's tests
    found it with a multi-frame secondary capture): the report has them empty."""
    frames = np.stack([np.full((16, 16), 100 * (k + 1), dtype=np.uint16) for k in range(2)])
    frames[:, :, :4] = 0
    data = dicom_samples.grey(frames, StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid(),
                              PatientName="DOE^JOHN")
    assert "PatientBirthDate" not in pydicom.dcmread(io.BytesIO(data))
    body = explain(client, "mf.dcm", data, outputs="dicom_sc,dicom_sr", class_idx="285")
    [(_, sr)] = objects(body, SR)
    assert sr.PatientName == "DOE^JOHN" and sr.PatientBirthDate == "" and sr.StudyID == ""
    assert dciodvfy_errors(base64.b64decode(body["dicom"][-1]["data"])) == []


def test_a_job_answers_the_same_dicom_outputs(client: TestClient) -> None:
    data = dicom_samples.bundled("CT_small.dcm")
    submitted = client.post("/jobs", files={"file": ("ct.dcm", data, "application/dicom")},
                            data={"outputs": "mask,dicom_pm,dicom_sr", "mask_size": "original",
                                  "mask_encoding": "base64"})
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["job_id"]
    with client.stream("GET", f"/jobs/{job_id}/events") as stream:
        for _ in stream.iter_lines():
            pass
    job = client.get(f"/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job
    body = job["result"]
    assert [e["kind"] for e in body["dicom"]] == [PM, SR]
    [(_, pm)] = objects(body, PM)
    mask = mask_of(body["results"][0]["explanations"][0])
    np.testing.assert_allclose(np.asarray(pm.pixel_array, np.float32), mask, rtol=0, atol=1e-6)
    assert dciodvfy_errors(base64.b64decode(body["dicom"][0]["data"])) == []
    refused = client.post("/jobs", files={"file": ("cat.png", b"\x89PNG\r\n\x1a\n", "image/png")},
                          data={"outputs": "dicom_sr"})
    assert refused.status_code in (415, 422)


def test_a_source_over_the_caps_gets_its_map_at_its_own_size() -> None:
    """CT_small is 128 pixels a side: with both caps at 64 the JSON mask and overlay are capped,
    the parametric map and the burned-in overlay are not."""
    from PIL import Image

    from service.config import Settings
    from service.main import create_app
    from tests.conftest import ready_client

    app = create_app(Settings(warmup=False, overlay_max_side=64, mask_max_side=64, max_response_mb=0.3))
    for small in ready_client(app):
        body = explain(small, "ct.dcm", dicom_samples.bundled("CT_small.dcm"),
                       outputs="mask,overlay,dicom_pm,dicom_sc")
        explanation = body["results"][0]["explanations"][0]
        assert explanation["mask"]["shape"] == [64, 64] and explanation["mask"]["scale"] == 0.5
        overlay = Image.open(io.BytesIO(base64.b64decode(explanation["overlay_png"])))
        assert overlay.size == (64, 64)
        [(_, pm)] = objects(body, PM)
        [(_, sc)] = objects(body, SC)
        assert (pm.Rows, pm.Columns) == (sc.Rows, sc.Columns) == (128, 128)
        pixels = np.asarray(pm.pixel_array, np.float32)
        assert pixels.min() == 0.0 and pixels.max() == 1.0
        # The capped mask is the same map at half the size: they agree where they overlap.
        halved = pixels.reshape(64, 2, 64, 2).mean(axis=(1, 3))
        assert np.abs(halved - mask_of(explanation)).mean() < 0.02
        for entry in body["dicom"]:
            assert dciodvfy_errors(base64.b64decode(entry["data"])) == []
        # Nine maps at the source's size do not fit in 0.3 MB: refused before any work.
        many = {"methods": "gradcam,layercam,xgradcam", "class_idx": "1,2,3"}
        part = {"file": ("ct.dcm", dicom_samples.bundled("CT_small.dcm"), "application/dicom")}
        refused = small.post("/explain", files=part, data={**many, "outputs": "dicom_pm"})
        assert refused.status_code == 413, refused.text
        reported = small.post("/explain", files=part, data={**many, "outputs": "dicom_sr"})
        assert reported.status_code == 200, reported.text


def test_one_non_dicom_file_among_dicom_ones_is_named(client: TestClient, cat_png: bytes) -> None:
    parts = [("file", ("ct.dcm", dicom_samples.bundled("CT_small.dcm"), "application/dicom")),
             ("file", ("cat.png", cat_png, "image/png"))]
    response = client.post("/explain", files=parts, data={"outputs": "dicom_sr"})
    assert response.status_code == 422 and "'cat.png'" in response.json()["error"]["message"]
    assert "'ct.dcm'" not in response.json()["error"]["message"]


def test_kserve_refuses_dicom_outputs(client: TestClient) -> None:
    instance = {"image": {"b64": base64.b64encode(dicom_samples.bundled("CT_small.dcm")).decode()}}
    response = client.post("/v1/models/mobilenet_v2:explain",
                           json={"instances": [instance], "parameters": {"outputs": "dicom_pm"}})
    assert response.status_code == 422 and "POST /explain" in response.json()["error"]["message"]


def test_files_of_one_study_share_a_new_series_per_kind(client: TestClient) -> None:
    first = pydicom.dcmread(io.BytesIO(dicom_samples.bundled("CT_small.dcm")))
    second = copy.deepcopy(first)
    second.SOPInstanceUID = generate_uid()
    second.file_meta.MediaStorageSOPInstanceUID = second.SOPInstanceUID
    buffer = io.BytesIO()
    second.save_as(buffer, enforce_file_format=True)
    parts = [("file", ("a.dcm", dicom_samples.bundled("CT_small.dcm"), "application/dicom")),
             ("file", ("b.dcm", buffer.getvalue(), "application/dicom"))]
    response = client.post("/explain", files=parts, data={"outputs": "dicom_pm,dicom_sr"})
    assert response.status_code == 200, response.text
    body = response.json()
    maps = objects(body, PM)
    assert [entry["file_index"] for entry, _ in maps] == [0, 1]
    assert len({ds.SeriesInstanceUID for _, ds in maps}) == 1
    assert sorted(int(ds.InstanceNumber) for _, ds in maps) == [1, 2]
    sources = [first.SOPInstanceUID, second.SOPInstanceUID]
    for (_, ds), uid in zip(maps, sources, strict=True):
        assert ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == uid
    reports = objects(body, SR)
    assert len(reports) == 2 and reports[0][1].SeriesInstanceUID != maps[0][1].SeriesInstanceUID
