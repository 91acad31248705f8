"""The review page's PACS tab (issue 19) in real Chromium against a real Orthanc: the tab shows
only when /readyz names a PACS; a study is explained by its UID through POST /dicomweb/explain
and shown like an upload, its parametric map downloadable, nothing stored; then "Store to PACS"
on the result sends the same request with store: true (a series as a job again), the PACS's
study holds the parametric map, secondary capture and report, referencing the source, and the
page lists them; a store the PACS cannot take shows the service's message. The browser: studies
searched, a series opened and stepped through, one image and a whole series explained, the
results stored, all through the service (the page may reach no other host)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from playwright.sync_api import Page, Response, expect
from pydicom.data import get_testdata_file

from service.config import Settings
from tests.dicomweb.archive import Archive, fill
from tests.dicomweb.orthanc import Orthanc, start_orthanc
from tests.ui.conftest import LiveServer, _start, _stop, only_the_service
from tests.ui.test_review_page import canvas_stats, open_page, run

CT = Path(str(get_testdata_file("CT_small.dcm")))
PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
REPORT = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR (TID 1500)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    pacs = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    pacs.upload(CT.read_bytes())
    yield pacs
    pacs.stop()


@pytest.fixture(scope="module")
def archive(orthanc: Orthanc) -> Archive:
    return fill(orthanc)


@pytest.fixture(scope="module")
def pacs_server(orthanc: Orthanc) -> Iterator[LiveServer]:
    live = _start(Settings(dicomweb_url=orthanc.dicomweb, warmup=False))
    yield live
    _stop(live)


def is_pacs_explain(response: Response) -> bool:
    return response.url.endswith("/dicomweb/explain") and response.request.method == "POST"


def series_of(orthanc: Orthanc, study_uid: str) -> set[str]:
    """The study's series as the PACS itself lists them (its own DICOMweb, not the service)."""
    found = DICOMwebClient(url=orthanc.dicomweb).search_for_series(study_instance_uid=study_uid)
    return {d["0020000E"]["Value"][0] for d in found}


def references(ds: pydicom.Dataset, sop_uid: str) -> bool:
    """Whether any sequence of ``ds``, at any depth, names the instance ``sop_uid``."""
    return any(e.keyword == "ReferencedSOPInstanceUID" and str(e.value) == sop_uid for e in ds.iterall())


def store_shown(page: Page, path: str = "/dicomweb/explain") -> Response:
    """Press Store to PACS and answer the service's response to it."""
    button = page.locator("#pacs-store")
    expect(button).to_be_enabled()
    with page.expect_response(lambda r: r.url.endswith(path) and r.request.method == "POST") as answer:
        button.click()
    return answer.value


def explain_study(page: Page) -> Response:
    return run(page, lambda: page.click("#run"), is_pacs_explain)


def test_no_pacs_tab_without_a_pacs(page: Page, live_server: LiveServer) -> None:
    open_page(page, live_server)
    expect(page.locator("#tab-pacs")).to_be_hidden()
    expect(page.locator("#pacs-panel")).to_be_hidden()


def test_a_study_explained_from_the_pacs_then_stored_back(
    page: Page, pacs_server: LiveServer, orthanc: Orthanc, tmp_path: Path
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

    # Explained, not stored: the PACS's study still holds the source's series alone.
    assert series_of(orthanc, source.StudyInstanceUID) == {source.SeriesInstanceUID}
    expect(page.locator("#pacs-outcome")).to_be_hidden()

    # Store to PACS, on the result: the same request again with store: true.
    expect(page.locator("#pacs-store-bar")).to_be_visible()
    expect(page.locator("#pacs-store-note")).to_contain_text("recomputed on the server")
    stored = store_shown(page)
    again = stored.request.post_data_json
    assert again["store"] is True
    for key in ("study_uid", "series_uid", "methods", "model", "topk", "mask_size"):
        assert again[key] == sent[key], key
    assert set(again["outputs"].split(",")) == {"dicom_pm", "dicom_sc", "dicom_sr"}
    assert stored.status == 200, stored.text()
    objects = stored.json()["stored"]
    button = page.locator("#pacs-store")
    expect(button).to_have_text("Stored to PACS")
    expect(button).to_be_disabled()  # stored once; a new result enables it again
    outcome = page.locator("#pacs-outcome")
    expect(outcome).to_have_attribute("data-stored", str(len(objects)))
    for name in ("Parametric Map", "Secondary Capture", "Comprehensive 3D SR"):
        expect(outcome).to_contain_text(name)
    for obj in objects:
        expect(outcome).to_contain_text(obj["sop_instance_uid"])
        expect(outcome).to_contain_text(obj["series_instance_uid"])

    # In the PACS: one parametric map, secondary capture and report, in series of their own
    # in the same study, each referencing the source; the map is the one the page showed.
    assert sorted(o["sop_class_uid"] for o in objects) == sorted([PARAMETRIC_MAP, SECONDARY_CAPTURE, REPORT])
    new_series = {o["series_instance_uid"] for o in objects}
    assert series_of(orthanc, source.StudyInstanceUID) == {source.SeriesInstanceUID, *new_series}
    client = DICOMwebClient(url=orthanc.dicomweb)
    for obj in objects:
        held = client.retrieve_instance(source.StudyInstanceUID, obj["series_instance_uid"],
                                        obj["sop_instance_uid"])
        assert held.SOPClassUID == obj["sop_class_uid"] and held.StudyInstanceUID == source.StudyInstanceUID
        assert held.PatientID == source.PatientID
        assert references(held, source.SOPInstanceUID), obj
        if held.SOPClassUID == PARAMETRIC_MAP:
            assert held.pixel_array.shape == pm.pixel_array.shape
            assert np.allclose(held.pixel_array, pm.pixel_array, atol=1e-6)

    # A new result can be stored again: the button comes back.
    response = explain_study(page)
    assert response.status == 200, response.text()
    expect(button).to_have_text("Store to PACS")
    expect(button).to_be_enabled()
    expect(outcome).to_be_hidden()


def test_a_store_the_pacs_cannot_take_shows_the_services_message(
    page: Page, tmp_path: Path
) -> None:
    """Explained while the PACS is up; stopped before Store to PACS: the service's 502 is shown,
    nothing is listed as stored, and the button can be pressed again."""
    source = pydicom.dcmread(CT)
    pacs = start_orthanc(tmp_path / "orthanc")
    live = None
    try:
        pacs.upload(CT.read_bytes())
        live = _start(Settings(dicomweb_url=pacs.dicomweb, warmup=False))
        open_page(page, live)
        page.click("#tab-pacs")
        page.fill("#study-uid", source.StudyInstanceUID)
        assert explain_study(page).status == 200
        pacs.stop()
        refused = store_shown(page)
        assert refused.status == 502, refused.text()
        error = refused.json()["error"]
        assert error["code"] in ("pacs_unavailable", "pacs_refused")
        expect(page.locator("#banner")).to_be_visible()
        expect(page.locator("#banner-message")).to_contain_text(error["message"])
        expect(page.locator("#banner-title")).to_contain_text("Store to PACS")
        button = page.locator("#pacs-store")
        expect(button).to_have_text("Store to PACS")
        expect(button).to_be_enabled()  # nothing was stored: it may be tried again
        expect(page.locator("#pacs-outcome")).not_to_contain_text("Stored to PACS")
    finally:
        pacs.stop()
        if live is not None:
            _stop(live)


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


def search(page: Page, **fields: str) -> str:
    """Fill the search fields (the others emptied), search, and answer the query the page sent."""
    for name in ("patient", "patient-id", "date-from", "date-to", "modality", "accession"):
        page.fill(f"#pacs-{name}", fields.get(name.replace("-", "_"), ""))
    with page.expect_response(lambda r: "/dicomweb/studies?" in r.url) as answer:
        page.click("#pacs-search")
    assert answer.value.status == 200, answer.value.text()
    expect(page.locator("#pacs-search")).to_be_enabled()
    return answer.value.url


def study_rows(page: Page) -> list[str]:
    return [str(row.get_attribute("data-study-uid")) for row in page.locator("#pacs-study-rows tr").all()]


def test_browse_step_explain_an_image_and_a_series_and_store(
    page: Page, pacs_server: LiveServer, orthanc: Orthanc, archive: Archive
) -> None:
    elsewhere = only_the_service(page, pacs_server.url)
    a, b, c = (archive.studies[k]["uid"] for k in "ABC")
    open_page(page, pacs_server)
    page.click("#tab-pacs")
    expect(page.locator("#pacs-browser")).to_be_visible()
    # Opening the tab lists the PACS's studies unfiltered: the CT sample's and A, B, C.
    expect(page.locator("#pacs-study-rows tr")).to_have_count(4)

    # Search by each field: the right studies and no others.
    sent = search(page, patient="DOE*")
    assert "patient=DOE*" in sent.replace("%2A", "*")
    expect(page.locator("#pacs-study-rows tr")).to_have_count(2)
    assert sorted(study_rows(page)) == sorted([a, b])
    search(page, patient="DOE*", modality="CT")
    expect(page.locator("#pacs-study-rows tr")).to_have_count(1)
    assert study_rows(page) == [a]
    sent = search(page, date_from="2024-02-01", date_to="2024-03-31")
    assert "date=20240201-20240331" in sent
    expect(page.locator("#pacs-study-rows tr")).to_have_count(1)
    assert study_rows(page) == [c]
    search(page, accession="ACCB2")
    expect(page.locator("#pacs-study-rows tr")).to_have_count(1)
    assert study_rows(page) == [b]
    # Enter in a search field searches (it does not explain).
    page.fill("#pacs-accession", "")
    page.fill("#pacs-patient", "DOE^JOHN")
    with page.expect_response(lambda r: "/dicomweb/studies?" in r.url):
        page.press("#pacs-patient", "Enter")
    expect(page.locator("#pacs-study-rows tr")).to_have_count(1)
    assert study_rows(page) == [a]

    # Open the study, then its CT series: the viewer shows its images in viewing order.
    page.locator("#pacs-study-rows tr button").first.click()
    expect(page.locator("#study-uid")).to_have_value(a)
    series = page.locator("#pacs-series-list button")
    expect(series).to_have_count(2)
    series.first.click()
    expect(page.locator("#series-uid")).to_have_value(archive.ct_series)
    image = page.locator("#pacs-image")
    position = page.locator("#pacs-position")
    expect(position).to_have_text("1 / 3")
    expect(image).to_have_attribute("data-shown", f"{archive.by_position[0]}/0")
    assert image.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [128, 128]
    expect(page.locator("#pacs-prev")).to_be_disabled()
    image.press("ArrowRight")
    expect(position).to_have_text("2 / 3")
    expect(image).to_have_attribute("data-shown", f"{archive.by_position[1]}/0")
    page.click("#pacs-next")
    expect(position).to_have_text("3 / 3")
    expect(page.locator("#pacs-next")).to_be_disabled()
    image.press("Home")
    expect(position).to_have_text("1 / 3")
    image.press("End")
    expect(position).to_have_text("3 / 3")
    image.press("ArrowLeft")
    expect(position).to_have_text("2 / 3")
    expect(image).to_have_attribute("data-shown", f"{archive.by_position[1]}/0")

    # Explain this image: that instance alone, its maps shown as for an upload.
    response = explain_with(page, "#pacs-explain-image")
    body = response.request.post_data_json
    assert body["study_uid"] == a and body["series_uid"] == archive.ct_series
    assert body["instance_uids"] == [archive.by_position[1]] and body["store"] is False
    assert response.status == 200, response.text()
    expect(page.locator("#image-title")).to_contain_text(archive.by_position[1])
    expect(page.locator(".panel:not(.original)").first).to_have_attribute("data-method", "gradcam")
    assert canvas_stats(page)["mean"][3] > 50

    # Store to PACS: the objects the service stored are listed, and are in the study.
    stored = store_shown(page)
    assert stored.request.post_data_json["store"] is True
    assert stored.request.post_data_json["instance_uids"] == [archive.by_position[1]]
    assert stored.status == 200, stored.text()
    objects = stored.json()["stored"]
    assert objects
    outcome = page.locator("#pacs-outcome")
    expect(outcome).to_have_attribute("data-stored", str(len(objects)))
    for obj in objects:
        expect(outcome).to_contain_text(obj["sop_instance_uid"])
    held = DICOMwebClient(url=orthanc.dicomweb).search_for_instances(study_instance_uid=a)
    in_study = {d["00080018"]["Value"][0] for d in held}
    assert {obj["sop_instance_uid"] for obj in objects} <= in_study
    # The study's series list now shows the stored results' series too.
    new_series = {obj["series_instance_uid"] for obj in objects}
    expect(series).to_have_count(2 + len(new_series))

    # Explain series: the multi-frame series as a job, with its progress bar; then stepping
    # through the frames shows each one's maps.
    page.locator(f'#pacs-series-list button[data-series-uid="{archive.mf_series}"]').click()
    expect(position).to_have_text(f"1 / {archive.mf_frames}")
    expect(image).to_have_attribute("data-shown", f"{archive.mf_sop}/0")
    with page.expect_request(lambda r: r.url.endswith("/jobs") and r.method == "POST") as submitted:
        page.click("#pacs-explain-series")
    job = submitted.value.post_data_json
    assert job["series_uid"] == archive.mf_series and "instance_uids" not in job
    row = page.locator('#jobs .job[data-method="gradcam"]')
    expect(row.locator("progress")).to_be_attached()
    expect(row.locator("button", has_text="Cancel")).to_be_attached()
    expect(row).to_have_attribute("data-status", "succeeded", timeout=120_000)
    expect(page.locator("#status")).to_contain_text(f"Done: {archive.mf_frames} images")
    expect(page.locator("#image-title")).to_contain_text(f"frame 1 of {archive.mf_frames}")
    image.press("ArrowRight")
    expect(page.locator("#image-title")).to_contain_text(f"frame 2 of {archive.mf_frames}")
    expect(image).to_have_attribute("data-shown", f"{archive.mf_sop}/1")

    # Store to PACS after a series: the same series job again, with store: true and its own
    # progress row; what it stored is listed and appears in the study's series.
    before = series_of(orthanc, a)
    with page.expect_request(lambda r: r.url.endswith("/jobs") and r.method == "POST") as again:
        page.click("#pacs-store")
    body = again.value.post_data_json
    assert body["store"] is True and body["series_uid"] == archive.mf_series and "instance_uids" not in body
    store_row = page.locator('#jobs .job[data-method="gradcam"]').last
    expect(store_row).to_contain_text("Store to PACS")
    expect(store_row).to_have_attribute("data-status", "succeeded", timeout=120_000)
    expect(page.locator("#pacs-store")).to_have_text("Stored to PACS")
    outcome = page.locator("#pacs-outcome")
    expect(outcome).to_contain_text("Stored to PACS")
    count = int(outcome.get_attribute("data-stored") or 0)
    assert count >= 2  # the maps' objects and the report
    added = series_of(orthanc, a) - before
    assert added  # the stored objects' series, in the PACS's own listing
    expect(series).to_have_count(len(before) + len(added))
    for uid in added:
        expect(outcome).to_contain_text(uid)
    assert elsewhere == []


def explain_with(page: Page, button: str) -> Response:
    with page.expect_response(is_pacs_explain) as answer:
        page.click(button)
    response = answer.value
    if response.ok:
        expect(page.locator("#status")).to_contain_text("Done")
    return response


def test_a_search_the_service_refuses_says_why(page: Page, pacs_server: LiveServer, archive: Archive) -> None:
    open_page(page, pacs_server)
    page.click("#tab-pacs")
    expect(page.locator("#status")).to_contain_text("Search the PACS")
    expect(page.locator("#pacs-study-rows tr").first).to_be_attached()  # the first, unfiltered search
    page.fill("#pacs-modality", "C T")
    with page.expect_response(lambda r: "/dicomweb/studies?" in r.url) as answer:
        page.click("#pacs-search")
    assert answer.value.status == 422
    expect(page.locator("#banner-title")).to_contain_text("PACS search")
    expect(page.locator("#banner-message")).to_contain_text(answer.value.json()["error"]["message"])
    expect(page.locator("#pacs-browse-status")).to_contain_text("did not finish")
