"""POST /dicomweb/explain against a real Orthanc (no mock of the PACS)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid

from service.config import Settings
from service.main import create_app
from tests import sse
from tests.conftest import ready_client
from tests.dicomweb.orthanc import Orthanc, free_port
from tests.imaging.dicom_samples import bundled

CT = pydicom.dcmread(io.BytesIO(bundled("CT_small.dcm")))
MR = pydicom.dcmread(io.BytesIO(bundled("MR_small.dcm")))


def _bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _slice(study: str, series: str, number: int, z: float) -> pydicom.Dataset:
    """A copy of the CT slice in a series of our own, at height ``z``, numbered ``number``."""
    ds = pydicom.dcmread(io.BytesIO(bundled("CT_small.dcm")))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [-158.135803, -179.035797, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    return ds


@pytest.fixture(scope="module")
def series(orthanc: Orthanc) -> dict[str, object]:
    """The CT and MR samples, a three-slice series uploaded out of order, and a non-image."""
    orthanc.upload(bundled("CT_small.dcm"))
    orthanc.upload(bundled("MR_small.dcm"))
    study, series_uid = generate_uid(), generate_uid()
    slices = [_slice(study, series_uid, number, z) for number, z in ((3, 10.0), (1, -10.0), (2, 0.0))]
    for ds in slices:
        orthanc.upload(_bytes(ds))
    text = _slice(study, series_uid, 9, 99.0)
    del text.PixelData
    text.SOPClassUID = text.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    orthanc.upload(_bytes(text))
    by_height = [ds.SOPInstanceUID for ds in sorted(slices, key=lambda d: float(d.ImagePositionPatient[2]))]
    return {"study": study, "series": series_uid, "by_height": by_height, "text": text.SOPInstanceUID}


@pytest.fixture(scope="module")
def client(orthanc: Orthanc) -> Iterator[TestClient]:
    app = create_app(Settings(warmup=False, dicomweb_url=orthanc.dicomweb))
    yield from ready_client(app)


def _explain(client: TestClient, **body: object) -> dict[str, object]:
    response = client.post("/dicomweb/explain", json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_a_study_by_uid_is_retrieved_and_explained(client: TestClient, series: dict[str, object]) -> None:
    body = _explain(client, study_uid=CT.StudyInstanceUID, outputs="mask")
    (result,) = body["results"]  # type: ignore[misc]
    assert result["image"]["filename"] == f"{CT.SOPInstanceUID}.dcm"
    assert result["image"]["width"] == CT.Columns and result["explanations"][0]["method"] == "gradcam"
    assert body["stored"] == [] and body["skipped"] == []


def test_a_series_comes_in_slice_order_and_non_images_are_skipped(
    client: TestClient, series: dict[str, object]
) -> None:
    body = _explain(client, study_uid=series["study"], series_uid=series["series"], outputs="mask")
    names = [r["image"]["filename"].removesuffix(".dcm") for r in body["results"]]  # type: ignore[union-attr]
    assert names == series["by_height"]
    assert body["skipped"] == [{"sop_instance_uid": series["text"],
                                "reason": "not an image: it has no pixel data"}]


def test_instances_by_uid(client: TestClient, series: dict[str, object]) -> None:
    chosen = series["by_height"][1:]  # type: ignore[index]
    body = _explain(client, study_uid=series["study"], series_uid=series["series"], instance_uids=chosen)
    assert [r["image"]["filename"].removesuffix(".dcm") for r in body["results"]] == chosen  # type: ignore[union-attr]


def test_unknown_uids_are_404_and_urls_are_refused(client: TestClient, series: dict[str, object]) -> None:
    unknown = client.post("/dicomweb/explain", json={"study_uid": "1.2.3.4.5.6.7"})
    assert unknown.status_code == 404 and "1.2.3.4.5.6.7" in unknown.json()["error"]["message"]
    missing = client.post("/dicomweb/explain", json={
        "study_uid": series["study"], "series_uid": series["series"], "instance_uids": ["1.2.3"]})
    assert missing.status_code == 404
    as_url = client.post("/dicomweb/explain", json={"study_uid": "http://127.0.0.1:1/studies"})
    assert as_url.status_code == 422 and "UID" in as_url.json()["error"]["message"]
    with_url = client.post("/dicomweb/explain", json={"study_uid": CT.StudyInstanceUID,
                                                      "url": "http://127.0.0.1:1/dicom-web"})
    assert with_url.status_code == 422


def test_readiness_reports_the_pacs(client: TestClient) -> None:
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["pacs"] == "reachable"


def test_a_series_as_a_job_shows_progress(client: TestClient, series: dict[str, object]) -> None:
    submitted = client.post("/jobs", json={"study_uid": series["study"], "series_uid": series["series"],
                                           "methods": "scorecam", "outputs": "mask",
                                           "method_params": {"scorecam": {"top_k_channels": 24}}})
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["job_id"]
    seen: list[tuple[str, dict[str, object]]] = []
    with client.stream("GET", f"/jobs/{job_id}/events") as stream:
        seen = list(sse.events(stream.iter_lines()))
    final = seen[-1][1]
    assert seen[-1][0] == "done" and final["status"] == "succeeded"
    assert [n for n, _ in seen].count("progress") >= 2
    result = final["result"]
    assert len(result["results"]) == 3 and result["skipped"][0]["sop_instance_uid"] == series["text"]  # type: ignore[index]


def test_an_unreachable_pacs_is_502_without_its_address(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/dicom-web"
    app = create_app(Settings(warmup=False, dicomweb_url=dead, dicomweb_timeout_s=2))
    for client in ready_client(app):
        response = client.post("/dicomweb/explain", json={"study_uid": CT.StudyInstanceUID})
        assert response.status_code == 502
        error = response.json()["error"]
        assert error["code"] == "pacs_unavailable" and "127.0.0.1" not in error["message"]
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["pacs"].startswith("unreachable")


def test_without_a_pacs_the_routes_are_404(cat_png: bytes) -> None:
    app = create_app(Settings(warmup=False))
    for client in ready_client(app):
        response = client.post("/dicomweb/explain", json={"study_uid": CT.StudyInstanceUID})
        assert response.status_code == 404 and "CAMSERVE_DICOMWEB_URL" in response.json()["error"]["message"]
        assert "pacs" not in client.get("/readyz").json()


def test_store_puts_the_results_into_the_same_study_referencing_the_source(
    client: TestClient, orthanc: Orthanc, series: dict[str, object]
) -> None:
    import httpx
    from dicomweb_client.api import DICOMwebClient

    body = _explain(client, study_uid=CT.StudyInstanceUID, store=True, outputs="mask")
    stored = body["stored"]
    kinds = {entry["sop_class_uid"] for entry in stored}  # type: ignore[union-attr]
    assert kinds == {"1.2.840.10008.5.1.4.1.1.30",  # parametric map
                     "1.2.840.10008.5.1.4.1.1.7",  # secondary capture
                     "1.2.840.10008.5.1.4.1.1.88.34"}, kinds  # comprehensive 3D SR (TID 1500)
    assert "dicom" not in body  # stored, not asked for
    pacs = DICOMwebClient(url=orthanc.dicomweb)
    found = {d["00080018"]["Value"][0]: d for d in pacs.search_for_instances(
        study_instance_uid=CT.StudyInstanceUID, fields=["0020000E", "00080016"])}
    for entry in stored:  # type: ignore[union-attr]
        assert entry["sop_instance_uid"] in found  # in the same study, through the PACS's own DICOMweb
        assert entry["series_instance_uid"] != CT.SeriesInstanceUID  # in series of their own
    pm_entry = next(e for e in stored if e["sop_class_uid"].endswith(".30"))  # type: ignore[union-attr]
    pm = pacs.retrieve_instance(CT.StudyInstanceUID, pm_entry["series_instance_uid"],
                                pm_entry["sop_instance_uid"])
    assert pm.StudyInstanceUID == CT.StudyInstanceUID and pm.PatientID == CT.PatientID
    assert pm.FrameOfReferenceUID == CT.FrameOfReferenceUID
    referenced = [i.ReferencedSOPInstanceUID for s in pm.ReferencedSeriesSequence
                  for i in s.ReferencedInstanceSequence]
    assert CT.SOPInstanceUID in referenced
    with_data = _explain(client, study_uid=CT.StudyInstanceUID, store=True, outputs="mask,dicom_pm")
    assert [e["kind"] for e in with_data["dicom"]] == ["parametric_map"]  # type: ignore[union-attr]
    assert len(with_data["stored"]) == 1  # type: ignore[arg-type]
    assert httpx.get(f"{orthanc.url}/studies").status_code == 200


def test_a_store_the_pacs_refuses_is_pacs_refused(orthanc: Orthanc) -> None:
    """STOW-RS of an instance into another study than its own: Orthanc refuses it."""
    from service.api.pacs import Pacs
    from service.errors import PacsRefused

    pacs = Pacs(Settings(dicomweb_url=orthanc.dicomweb))
    with pytest.raises(PacsRefused) as refused:
        pacs.store("1.2.3.4.5.6.7.8", [pydicom.dcmread(io.BytesIO(bundled("MR_small.dcm")))])
    assert refused.value.status_code == 502 and orthanc.url not in refused.value.message


def test_an_instance_larger_than_an_upload_may_be_is_413_and_not_read_whole(
    orthanc: Orthanc, series: dict[str, object]
) -> None:
    # CT_small is 39 KB: with uploads bounded to 20 KB, its retrieval is refused as an upload of
    # it would be, while the searches before it (a few hundred bytes) still go through.
    app = create_app(Settings(warmup=False, dicomweb_url=orthanc.dicomweb, max_upload_mb=20 / 1024))
    for client in ready_client(app):
        found = client.get("/dicomweb/studies", params={"patient_id": str(CT.PatientID)})
        assert found.status_code == 200 and found.json()["studies"], found.text
        response = client.post("/dicomweb/explain", json={"study_uid": CT.StudyInstanceUID,
                                                          "series_uid": CT.SeriesInstanceUID})
        assert response.status_code == 413, response.text
        error = response.json()["error"]
        assert error["code"] == "payload_too_large" and "CAMSERVE_MAX_UPLOAD_MB" in error["message"]
        assert client.get("/healthz").status_code == 200  # and it keeps serving


def test_an_answer_without_a_length_is_read_only_up_to_the_bound() -> None:
    # A PACS that streams an endless answer (chunked, no Content-Length) is cut at the bound.
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    sent = []

    class Endless(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"[" + b" " * 65_000
            try:
                for _ in range(10_000):  # 650 MB if nobody stops reading
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    sent.append(len(chunk))
            except OSError:
                pass  # the service hung up, as it should

    server = ThreadingHTTPServer(("127.0.0.1", 0), Endless)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        app = create_app(Settings(warmup=False, max_upload_mb=1,
                                  dicomweb_url=f"http://127.0.0.1:{server.server_port}/dw"))
        for client in ready_client(app):
            response = client.get("/dicomweb/studies")
            assert response.status_code == 413, response.text
        assert sum(sent) < 64 * 1024 * 1024  # far from all of it: the reading stopped at 1 MB
    finally:
        server.shutdown()
        server.server_close()
