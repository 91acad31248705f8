"""Browsing the PACS through the service (search, series, instances, preview) against a real
Orthanc: the review page's PACS tab asks these routes, never the PACS."""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import requests
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.uid import generate_uid

from service.api.pacs import Pacs
from service.config import Settings
from service.errors import PacsUnavailable
from service.main import create_app
from tests.conftest import ready_client
from tests.dicomweb.archive import Archive, fill
from tests.dicomweb.orthanc import Orthanc, free_port, start_orthanc
from tests.imaging.dicom_samples import bundled

MAX_SIDE = 100  # the overlay cap of the service under test: the CT's 128 pixels are shown at 100


@pytest.fixture(scope="module")
def archive(orthanc: Orthanc) -> Archive:
    return fill(orthanc)


@pytest.fixture(scope="module")
def client(orthanc: Orthanc) -> Iterator[TestClient]:
    app = create_app(Settings(warmup=False, dicomweb_url=orthanc.dicomweb, overlay_max_side=MAX_SIDE))
    yield from ready_client(app)


def _found(client: TestClient, **query: object) -> list[str]:
    response = client.get("/dicomweb/studies", params=query)
    assert response.status_code == 200, response.text
    return [s["patient_id"] for s in response.json()["studies"]]


def test_search_by_patient_modality_date_and_accession(client: TestClient, archive: Archive) -> None:
    assert sorted(_found(client)) == ["PID-A", "PID-B", "PID-C"]
    assert sorted(_found(client, patient="DOE*")) == ["PID-A", "PID-B"]  # wildcard
    assert _found(client, patient="DOE^JANE") == ["PID-B"]  # the ^ between name parts
    assert _found(client, patient_id="PID-C") == ["PID-C"]
    assert sorted(_found(client, modality="MR")) == ["PID-A", "PID-B"]  # A's second series
    assert sorted(_found(client, modality="ct")) == ["PID-A", "PID-C"]
    assert _found(client, date="20240105") == ["PID-A"]
    assert sorted(_found(client, date="20240101-20240331")) == ["PID-A", "PID-C"]
    assert _found(client, date="20240201-") == ["PID-C"]
    assert _found(client, date="-20231231") == ["PID-B"]
    assert _found(client, accession="ACCB2") == ["PID-B"]
    assert _found(client, patient="DOE*", modality="CT") == ["PID-A"]  # every filter at once
    assert _found(client, patient="NOBODY*") == []


def test_a_study_is_plain_json(client: TestClient, archive: Archive) -> None:
    (study,) = client.get("/dicomweb/studies", params={"accession": "ACCA1"}).json()["studies"]
    a = archive.studies["A"]
    assert study["study_uid"] == a["uid"] and study["patient_name"] == "DOE^JOHN"
    assert study["date"] == "2024-01-05" and study["description"] == "Chest"
    assert sorted(study["modalities"]) == ["CT", "MR"]
    assert study["series_count"] == 2 and study["instance_count"] == 5


def test_search_pages(client: TestClient, archive: Archive) -> None:
    first = client.get("/dicomweb/studies", params={"limit": 2}).json()
    assert len(first["studies"]) == 2 and first["more"] is True
    rest = client.get("/dicomweb/studies", params={"limit": 2, "offset": 2}).json()
    assert len(rest["studies"]) == 1 and rest["more"] is False
    seen = {s["study_uid"] for s in first["studies"] + rest["studies"]}
    assert seen == {s["uid"] for s in archive.studies.values()}


@pytest.mark.parametrize("query", [
    {"date": "2024-01-05"}, {"date": "20241301"}, {"date": "20240301-20240101"}, {"date": "2024"},
    {"modality": "C T"}, {"patient": "DOE\\JOHN"}, {"accession": "A" * 17},
    {"limit": 0}, {"limit": 101}, {"offset": -1},
])
def test_bad_search_filters_are_422(client: TestClient, query: dict[str, object]) -> None:
    response = client.get("/dicomweb/studies", params=query)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_option"


def test_the_series_of_a_study(client: TestClient, archive: Archive) -> None:
    body = client.get(f"/dicomweb/studies/{archive.studies['A']['uid']}/series").json()
    listed = [(s["series_uid"], s["modality"], s["number"], s["instance_count"]) for s in body["series"]]
    assert listed == [(archive.ct_series, "CT", 1, 4), (archive.mf_series, "MR", 2, 1)]
    assert body["truncated"] is False


def test_instances_come_in_the_order_the_series_is_explained(client: TestClient, archive: Archive) -> None:
    study = archive.studies["A"]["uid"]
    listed = client.get(f"/dicomweb/studies/{study}/series/{archive.ct_series}/instances").json()
    rows = listed["instances"]
    assert [r["sop_instance_uid"] for r in rows] == [*archive.by_position, archive.text]
    assert [r["number"] for r in rows[:3]] == [2, 3, 1]  # by position, not by number
    assert all(r["image"] and r["frames"] == 1 and (r["rows"], r["columns"]) == (128, 128) for r in rows[:3])
    assert rows[3]["image"] is False and "no pixel data" in rows[3]["skip_reason"]
    explained = client.post("/dicomweb/explain", json={
        "study_uid": study, "series_uid": archive.ct_series, "outputs": "image", "mask_size": "feature"})
    assert explained.status_code == 200, explained.text
    results = explained.json()["results"]
    assert [r["image"]["filename"].removesuffix(".dcm") for r in results] == archive.by_position
    # The preview is the frame the explanation showed: same decoder, window and size.
    base = f"/dicomweb/studies/{study}/series/{archive.ct_series}/instances"
    first = client.get(f"{base}/{archive.by_position[0]}/preview")
    assert first.status_code == 200 and first.headers["content-type"] == "image/png"
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(results[0]["image_png"]))).convert("RGB"))
    preview = np.asarray(Image.open(io.BytesIO(first.content)).convert("RGB"))
    assert preview.shape == shown.shape == (MAX_SIDE, MAX_SIDE, 3)
    assert np.array_equal(preview, shown)


def test_a_multi_frame_preview(client: TestClient, archive: Archive) -> None:
    base = f"/dicomweb/studies/{archive.studies['A']['uid']}/series/{archive.mf_series}/instances"
    (row,) = client.get(base).json()["instances"]
    assert row["frames"] == archive.mf_frames and (row["rows"], row["columns"]) == (48, 64)
    frames = []
    for k in (0, archive.mf_frames - 1):
        response = client.get(f"{base}/{archive.mf_sop}/preview", params={"frame": k})
        assert response.status_code == 200, response.text
        image = Image.open(io.BytesIO(response.content))
        assert image.size == (64, 48)  # under the cap: the frame's own size
        frames.append(np.asarray(image.convert("L")))
    assert frames[0][:, :8].max() == 0 and frames[0][:, 8:].min() == 255  # windowed to its range
    past = client.get(f"{base}/{archive.mf_sop}/preview", params={"frame": archive.mf_frames})
    assert past.status_code == 422 and f"has {archive.mf_frames} frames" in past.json()["error"]["message"]


def test_unknown_and_malformed_uids(client: TestClient, archive: Archive) -> None:
    study = archive.studies["A"]["uid"]
    assert client.get("/dicomweb/studies/1.2.3.4.5.6.7/series").status_code == 404
    assert client.get(f"/dicomweb/studies/{study}/series/1.2.3.4.5/instances").status_code == 404
    unknown = client.get(f"/dicomweb/studies/{study}/series/{archive.ct_series}/instances/1.2.3/preview")
    assert unknown.status_code == 404 and "1.2.3" in unknown.json()["error"]["message"]
    for path in ("/dicomweb/studies/not-a-uid/series",
                 f"/dicomweb/studies/{study}/series/1.2.x/instances",
                 f"/dicomweb/studies/{study}/series/{archive.ct_series}/instances/1..2/preview"):
        response = client.get(path)
        assert response.status_code == 422 and "UID" in response.json()["error"]["message"], path
    base = f"/dicomweb/studies/{study}/series/{archive.ct_series}/instances"
    text = client.get(f"{base}/{archive.text}/preview")
    assert text.status_code == 415 and "no pixel data" in text.json()["error"]["message"]


def test_a_preview_over_the_decode_limits_is_refused(orthanc: Orthanc, archive: Archive) -> None:
    app = create_app(Settings(warmup=False, dicomweb_url=orthanc.dicomweb, max_image_pixels=1000))
    for client in ready_client(app):
        study = archive.studies["A"]["uid"]
        response = client.get(
            f"/dicomweb/studies/{study}/series/{archive.ct_series}/instances/{archive.by_position[0]}/preview")
        assert response.status_code == 413 and "128x128" in response.json()["error"]["message"]


def test_an_unreachable_pacs_is_502_and_no_pacs_is_404() -> None:
    dead = f"http://127.0.0.1:{free_port()}/dicom-web"
    app = create_app(Settings(warmup=False, dicomweb_url=dead, dicomweb_timeout_s=2))
    for client in ready_client(app):
        for path in ("/dicomweb/studies", "/dicomweb/studies/1.2.3/series"):
            response = client.get(path)
            assert response.status_code == 502, path
            error = response.json()["error"]
            assert error["code"] == "pacs_unavailable" and "127.0.0.1" not in error["message"]
    for client in ready_client(create_app(Settings(warmup=False))):
        response = client.get("/dicomweb/studies")
        assert response.status_code == 404 and "CAMSERVE_DICOMWEB_URL" in response.json()["error"]["message"]


def test_every_pacs_call_has_the_configured_time_limit(client: TestClient, archive: Archive,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # dicomweb-client passes a timeout of its own (20 s) to each call; the setting must win.
    limits: list[object] = []
    send = requests.adapters.HTTPAdapter.send

    def recording(self: requests.adapters.HTTPAdapter, request: requests.PreparedRequest,
                  **kwargs: Any) -> requests.Response:
        limits.append(kwargs.get("timeout"))
        return send(self, request, **kwargs)

    monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", recording)
    study = archive.studies["A"]["uid"]
    base = f"/dicomweb/studies/{study}/series/{archive.ct_series}/instances"
    for path in ("/dicomweb/studies", f"/dicomweb/studies/{study}/series", base,
                 f"{base}/{archive.by_position[0]}/preview"):
        assert client.get(path).status_code == 200, path
    configured = client.app.state.settings.dicomweb_timeout_s  # type: ignore[attr-defined]
    assert len(limits) >= 5 and set(limits) == {configured}


class _Unreadable(BaseHTTPRequestHandler):
    """A PACS whose answers dicomweb-client cannot read: junk in its search lists, HTML for a
    retrieve, broken JSON for a store."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # the test's output stays quiet
        pass

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path.endswith("/instances"):  # a search: one instance that looks like an image
            body = json.dumps([{"00080018": {"vr": "UI", "Value": ["1.2.3.4"]},
                                "00280010": {"vr": "US", "Value": [8]},
                                "00280011": {"vr": "US", "Value": [8]}}]).encode()
            kind = "application/dicom+json"
        elif path.endswith(("/studies", "/series")):
            body, kind = b'[1, "x", null, {"0020000D": "not an element"}]', "application/dicom+json"
        else:
            body, kind = b"<html>maintenance</html>", "text/html"
        self._answer(body, kind)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._answer(b"{cut short", "application/dicom+json")  # a store's answer, unreadable

    def _answer(self, body: bytes, kind: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_an_unreadable_pacs_answer_is_never_a_500() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Unreadable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        app = create_app(Settings(warmup=False, dicomweb_url=f"http://127.0.0.1:{server.server_port}/dw"))
        for client in ready_client(app):
            studies = client.get("/dicomweb/studies")
            assert studies.status_code == 200 and studies.json()["studies"] == []
            series = client.get("/dicomweb/studies/1.2/series")
            assert series.status_code == 200 and series.json()["series"] == []
            preview = client.get("/dicomweb/studies/1.2/series/1.3/instances/1.2.3.4/preview")
            assert preview.status_code == 502, preview.text
            error = preview.json()["error"]
            assert error["code"] == "pacs_unavailable" and "127.0.0.1" not in error["message"]
        ds = pydicom.dcmread(io.BytesIO(bundled("CT_small.dcm")))
        with pytest.raises(PacsUnavailable):  # the routes answer it 502
            Pacs(app.state.settings).store(str(ds.StudyInstanceUID), [ds])
    finally:
        server.shutdown()
        server.server_close()


def test_names_with_spaces_and_accents_are_found(tmp_path: Path) -> None:
    # Orthanc reads query values without percent-decoding them: "DOE%20JOHN" or "M%C3%BCller"
    # matched no one.
    orthanc = start_orthanc(tmp_path)
    try:
        studies = {"Müller^Zoë": generate_uid(), "DOE^JOHN": generate_uid(), "ROE^ANNA": generate_uid()}
        for name, uid in studies.items():
            ds = pydicom.dcmread(io.BytesIO(bundled("CT_small.dcm")))
            ds.SpecificCharacterSet = "ISO_IR 192"
            ds.PatientName, ds.StudyInstanceUID = name, uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.SeriesInstanceUID = generate_uid()
            buffer = io.BytesIO()
            pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
            orthanc.upload(buffer.getvalue())
        pacs = Pacs(Settings(dicomweb_url=orthanc.dicomweb))

        def found(patient: str) -> set[str]:
            return {str(ds.StudyInstanceUID) for ds in pacs.search_studies({"PatientName": patient}, 10, 0)}

        for typed in ("Müller^Zoë", "Müller*", "müller zoë"):
            assert studies["Müller^Zoë"] in found(typed) and studies["ROE^ANNA"] not in found(typed), typed
        assert found("DOE JOHN") == {studies["DOE^JOHN"]}  # as DOE^JOHN: the space reads as ?
    finally:
        orthanc.stop()


class _Counting(BaseHTTPRequestHandler):
    """Counts the requests it gets; answers 302 to ``redirect_to`` when that is set."""

    hits = 0
    redirect_to = ""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        type(self).hits += 1
        self.send_response(302 if self.redirect_to else 200)
        if self.redirect_to:
            self.send_header("Location", f"{self.redirect_to}{self.path}")
        self.send_header("Content-Length", "0")
        self.end_headers()


def test_a_redirecting_pacs_is_502_and_the_other_host_is_never_asked() -> None:
    class Other(_Counting):
        pass

    class Redirecting(_Counting):
        pass

    other = ThreadingHTTPServer(("127.0.0.1", 0), Other)
    Redirecting.redirect_to = f"http://127.0.0.1:{other.server_port}"
    pacs = ThreadingHTTPServer(("127.0.0.1", 0), Redirecting)
    for server in (other, pacs):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        app = create_app(Settings(warmup=False, dicomweb_url=f"http://127.0.0.1:{pacs.server_port}/dw"))
        for client in ready_client(app):
            for path in ("/dicomweb/studies", "/dicomweb/studies/1.2/series",
                         "/dicomweb/studies/1.2/series/1.3/instances"):
                response = client.get(path)  # was 200 "no studies", then 404s
                assert response.status_code == 502, (path, response.text)
                assert "302" in response.json()["error"]["message"]
        assert Redirecting.hits >= 3 and Other.hits == 0
    finally:
        for server in (other, pacs):
            server.shutdown()
            server.server_close()


def test_a_preview_over_the_decoded_bytes_is_refused_before_it_is_retrieved(
        orthanc: Orthanc, archive: Archive, monkeypatch: pytest.MonkeyPatch) -> None:
    retrieved: list[str] = []
    monkeypatch.setattr(Pacs, "retrieve", lambda self, study, series, sop: retrieved.append(sop))
    study = archive.studies["A"]["uid"]
    # The CT is 128x128: 48 KB as the RGB frame it becomes, over 0.01 MB per frame; the
    # multi-frame MR is 4 frames of 64x48 (9 KB each), over 0.02 MB for the request together.
    cases = (({"max_decoded_mb_per_frame": 0.01}, archive.ct_series, archive.by_position[0]),
             ({"max_decoded_mb_per_request": 0.02}, archive.mf_series, archive.mf_sop))
    for settings, series, sop in cases:
        app = create_app(Settings(warmup=False, dicomweb_url=orthanc.dicomweb, **settings))
        for client in ready_client(app):
            response = client.get(f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/preview")
            assert response.status_code == 413, response.text
            assert "decoded" in response.json()["error"]["message"]
    assert retrieved == []
