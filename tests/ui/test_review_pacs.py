"""The review page's PACS tab (issue 19) in real Chromium against a real Orthanc: the tab shows
only when /readyz names a PACS; a study is explained by its UID through POST /dicomweb/explain
and shown like an upload, its parametric map downloadable; "Store to PACS" sends store: true and
the page lists what the service answered it stored."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from playwright.sync_api import Page, Response, expect
from pydicom.data import get_testdata_file

from service.config import Settings
from tests.dicomweb.orthanc import Orthanc, start_orthanc
from tests.ui.conftest import LiveServer, _start, _stop
from tests.ui.test_review_page import canvas_stats, open_page

CT = Path(str(get_testdata_file("CT_small.dcm")))
PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    pacs = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    pacs.upload(CT.read_bytes())
    yield pacs
    pacs.stop()


@pytest.fixture(scope="module")
def pacs_server(orthanc: Orthanc) -> Iterator[LiveServer]:
    live = _start(Settings(dicomweb_url=orthanc.dicomweb, warmup=False))
    yield live
    _stop(live)


def is_pacs_explain(response: Response) -> bool:
    return response.url.endswith("/dicomweb/explain") and response.request.method == "POST"


def explain_study(page: Page) -> Response:
    with page.expect_response(is_pacs_explain) as answer:
        page.click("#run")
    response = answer.value
    if response.ok:
        expect(page.locator("#status")).to_contain_text("Done")
    else:
        expect(page.locator("#banner")).to_be_visible()
    return response


def test_no_pacs_tab_without_a_pacs(page: Page, live_server: LiveServer) -> None:
    open_page(page, live_server)
    expect(page.locator("#tab-pacs")).to_be_hidden()
    expect(page.locator("#pacs-panel")).to_be_hidden()


def test_a_study_explained_from_the_pacs_and_stored_back(
    page: Page, pacs_server: LiveServer, tmp_path: Path
) -> None:
    source = pydicom.dcmread(CT)
    open_page(page, pacs_server)
    tab = page.locator("#tab-pacs")
    expect(tab).to_be_visible()
    tab.click()
    expect(tab).to_have_attribute("aria-selected", "true")
    expect(page.locator("#pacs-panel")).to_be_visible()
    expect(page.locator("#dropzone")).to_be_hidden()
    expect(page.locator("#window-preset")).to_be_disabled()  # DICOMweb's body takes no window
    page.click("#tab-upload")
    expect(page.locator("#dropzone")).to_be_visible()
    expect(page.locator("#window-preset")).to_be_enabled()
    page.click("#tab-pacs")

    # No UID: the page says what it needs and sends nothing.
    page.click("#run")
    expect(page.locator("#banner")).to_contain_text("Study Instance UID")

    page.fill("#study-uid", source.StudyInstanceUID)
    page.fill("#series-uid", source.SeriesInstanceUID)
    response = explain_study(page)
    sent = response.request.post_data_json
    assert sent["study_uid"] == source.StudyInstanceUID
    assert sent["series_uid"] == source.SeriesInstanceUID
    assert sent["store"] is False
    assert response.status == 200, response.text()
    body = response.json()
    assert body["skipped"] == [] and body["stored"] == []
    result = body["results"][0]
    assert result["image"]["modality"] == "CT"

    # Shown like an upload: a drawn panel per map and the predictions.
    panel = page.locator(".panel:not(.original)").first
    expect(panel).to_have_attribute("data-method", result["explanations"][0]["method"])
    expect(panel.locator("canvas")).to_have_attribute("data-opacity", "0.5")
    assert canvas_stats(page)["mean"][3] > 50  # the slice and its map are on the canvas
    expect(page.locator("#predictions li")).to_have_count(len(result["predictions"]))
    expect(page.locator("#image-title")).to_contain_text("Image 1 of 1")
    # The study's parametric map, as from an upload.
    with page.expect_download() as got:
        panel.locator("button", has_text="Download DICOM").click()
    path = tmp_path / got.value.suggested_filename
    got.value.save_as(path)
    pm = pydicom.dcmread(io.BytesIO(path.read_bytes()))
    assert pm.SOPClassUID == PARAMETRIC_MAP and pm.StudyInstanceUID == source.StudyInstanceUID

    # Store to PACS: store: true is sent and the answer is shown, whatever it was.
    page.check("#pacs-store")
    stored = explain_study(page)
    assert stored.request.post_data_json["store"] is True
    outcome = page.locator("#pacs-outcome")
    if stored.ok:
        objects = stored.json()["stored"]
        assert objects, "store: true answered 200 with nothing stored"
        expect(outcome).to_be_visible()
        expect(outcome).to_have_attribute("data-stored", str(len(objects)))
        for obj in objects:
            expect(outcome).to_contain_text(obj["sop_instance_uid"])
    else:
        # Only a build without the store writer may refuse (422, saying so); any other failure
        # of the store fails here. The page says what the service said.
        message = stored.json()["error"]["message"]
        assert stored.status == 422 and "DICOM results writer" in message, stored.text()
        expect(page.locator("#banner-message")).to_contain_text(message)
        expect(outcome).to_be_hidden()


def test_a_slow_method_on_a_study_runs_as_a_job_with_progress(page: Page, pacs_server: LiveServer) -> None:
    source = pydicom.dcmread(CT)
    open_page(page, pacs_server)
    page.click("#tab-pacs")
    for box in page.locator("#methods input").all():
        box.set_checked(box.get_attribute("value") in ("gradcam", "scorecam"))
    page.fill("#method-params", '{"scorecam": {"top_k_channels": 32}}')
    page.fill("#study-uid", source.StudyInstanceUID)
    with page.expect_request(lambda r: r.url.endswith("/jobs") and r.method == "POST") as submitted:
        page.click("#run")
    job = submitted.value.post_data_json
    assert job["study_uid"] == source.StudyInstanceUID and job["methods"] == "scorecam"
    assert job["method_params"] == {"scorecam": {"top_k_channels": 32}}
    row = page.locator('#jobs .job[data-method="scorecam"]')
    expect(row).to_have_attribute("data-status", "succeeded", timeout=120_000)
    expect(page.locator("#status")).to_contain_text("Done")
    # Both parts of the run in one result: the fast method's panel and the job's.
    expect(page.locator('.panel[data-method="gradcam"]')).to_be_visible()
    expect(page.locator('.panel[data-method="scorecam"]')).to_be_visible()
    expect(page.locator('.panel[data-method="scorecam"] button', has_text="Download DICOM")).to_be_visible()
