"""The review page's DICOM results (issue 18), in real Chromium: a DICOM upload also asks for a
parametric map and a report, each panel offers "Download DICOM" and the file's report its own
button, the downloads are Part 10 files pydicom reads; a source without patient geometry falls
back to a secondary capture; a PNG upload asks for no DICOM and offers none."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pydicom
from playwright.sync_api import Page, Response, expect
from pydicom.data import get_testdata_file

from tests.ui.conftest import LiveServer
from tests.ui.test_review_page import CAT, open_page, upload

CT = Path(str(get_testdata_file("CT_small.dcm")))
PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # and its multi-frame variants .7.x
SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


def kinds_answered(response: Response) -> list[str]:
    """The kinds of DICOM object the answer carries: what the page asked for (Chromium does not
    show a multipart body holding a file to the test, so the answer is read instead)."""
    return [d["kind"] for d in response.json().get("dicom") or []]


def download(page: Page, button: Any, folder: Path) -> Path:
    with page.expect_download() as event:
        button.click()
    got = event.value
    path = folder / got.suggested_filename
    got.save_as(path)
    return path


def read_part10(path: Path) -> pydicom.Dataset:
    data = path.read_bytes()
    assert len(data) > 132 and data[128:132] == b"DICM", "not a DICOM Part 10 file"
    return pydicom.dcmread(io.BytesIO(data))


def test_ct_offers_its_parametric_map_and_report_as_dicom(
    page: Page, live_server: LiveServer, tmp_path: Path
) -> None:
    open_page(page, live_server)
    response = upload(page, CT)
    assert response.ok
    assert kinds_answered(response) == ["parametric_map", "structured_report"]
    body = response.json()
    assert body["results"][0]["explanations"][0]["mask"]
    exp = body["results"][0]["explanations"][0]
    source = pydicom.dcmread(CT)

    panel = page.locator(".panel:not(.original)").first
    button = panel.locator("button", has_text="Download DICOM")
    expect(button).to_be_visible()
    path = download(page, button, tmp_path)
    assert path.name == f"parametric_map-0-{exp['method']}-{exp['class_idx']}.dcm"
    pm = read_part10(path)
    assert pm.SOPClassUID == PARAMETRIC_MAP
    assert pm.StudyInstanceUID == source.StudyInstanceUID
    assert (pm.Rows, pm.Columns) == (source.Rows, source.Columns)
    # The very object the service answered, byte for byte.
    sent = next(d for d in body["dicom"] if d["kind"] == "parametric_map")
    assert pm.SOPInstanceUID == sent["sop_instance_uid"]

    report_button = page.locator("#dicom-report button", has_text="Download DICOM report")
    expect(report_button).to_be_visible()
    report_path = download(page, report_button, tmp_path)
    assert report_path.name == "structured_report-0.dcm"
    report = read_part10(report_path)
    assert str(report.SOPClassUID).startswith(SR_PREFIX)
    assert report.StudyInstanceUID == source.StudyInstanceUID


def test_source_without_geometry_falls_back_to_a_secondary_capture(
    page: Page, live_server: LiveServer, tmp_path: Path
) -> None:
    # CT_small without its plane position: the service cannot place a parametric map on it.
    source = pydicom.dcmread(CT)
    del source.ImagePositionPatient
    flat = tmp_path / "no-geometry.dcm"
    source.save_as(flat)

    open_page(page, live_server)
    answers: list[Response] = []
    page.on("response", lambda r: answers.append(r) if r.url.endswith("/explain") else None)
    page.set_input_files("#file", str(flat))
    expect(page.locator("#status")).to_contain_text("Done")
    assert [r.status for r in answers] == [422, 200]
    assert "parametric map" in answers[0].json()["error"]["message"]
    assert kinds_answered(answers[1]) == ["secondary_capture", "structured_report"]
    expect(page.locator("#banner")).to_be_hidden()

    button = page.locator(".panel:not(.original)").first.locator("button", has_text="Download DICOM")
    expect(button).to_be_visible()
    path = download(page, button, tmp_path)
    assert path.name.startswith("secondary_capture-0-")
    sc = read_part10(path)
    assert str(sc.SOPClassUID).startswith(SECONDARY_CAPTURE)
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    expect(page.locator("#dicom-report button")).to_be_visible()


def test_png_asks_for_no_dicom_and_offers_none(page: Page, live_server: LiveServer) -> None:
    open_page(page, live_server)
    response = upload(page, CAT)
    assert response.ok
    assert kinds_answered(response) == []
    assert response.json()["results"][0]["explanations"][0]["mask"]
    panel = page.locator(".panel:not(.original)").first
    expect(panel.locator("button", has_text="Download JSON")).to_be_visible()
    expect(panel.locator("button", has_text="Download DICOM")).to_have_count(0)
    expect(page.locator("#dicom-report")).to_be_hidden()
