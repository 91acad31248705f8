"""A small archive for the browsing tests: three patients' studies in a real Orthanc.

A (CT and MR): a CT series of three slices whose instance numbers disagree with their
positions, plus a non-image; and a multi-frame MR series. B (MR) and C (CT): one image each.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from tests.dicomweb.orthanc import Orthanc
from tests.imaging.dicom_samples import bundled, grey


def _bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _patient(ds: pydicom.Dataset, study: dict[str, str]) -> pydicom.Dataset:
    ds.StudyInstanceUID = study["uid"]
    ds.PatientName, ds.PatientID = study["name"], study["id"]
    ds.StudyDate, ds.AccessionNumber = study["date"], study["accession"]
    ds.StudyDescription = study["description"]
    return ds


def _ct(study: dict[str, str], series: str, number: int, z: float) -> pydicom.Dataset:
    ds = _patient(pydicom.dcmread(io.BytesIO(bundled("CT_small.dcm"))), study)
    ds.SeriesInstanceUID, ds.SeriesNumber = series, 1
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [-158.135803, -179.035797, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    return ds


@dataclass
class Archive:
    studies: dict[str, dict[str, str]]
    ct_series: str  # study A's CT series: three slices and a non-image
    by_position: list[str]  # its slices along the normal (not their instance numbers' order)
    text: str  # its non-image instance
    mf_series: str  # study A's multi-frame series
    mf_sop: str
    mf_frames: int


def _study(name: str, pid: str, date: str, accession: str, description: str) -> dict[str, str]:
    return {"uid": generate_uid(), "name": name, "id": pid, "date": date, "accession": accession,
            "description": description}


def fill(orthanc: Orthanc) -> Archive:
    """Upload the archive into ``orthanc``.' studies: A (CT and MR, two series), B (MR), C (CT)."""
    studies = {
        "A": _study("DOE^JOHN", "PID-A", "20240105", "ACCA1", "Chest"),
        "B": _study("DOE^JANE", "PID-B", "20230610", "ACCB2", "Head"),
        "C": _study("ROE^RICHARD", "PID-C", "20240301", "ACCC3", "Abdomen"),
    }
    ct_series = generate_uid()
    # Instance numbers 1, 2, 3 at heights 10, -10, 0: along the normal they come 2, 3, 1.
    slices = [_ct(studies["A"], ct_series, number, z) for number, z in ((1, 10.0), (2, -10.0), (3, 0.0))]
    for ds in slices:
        orthanc.upload(_bytes(ds))
    text = _ct(studies["A"], ct_series, 9, 99.0)
    del text.PixelData
    text.SOPClassUID = text.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    orthanc.upload(_bytes(text))
    frames = np.stack([np.full((48, 64), 100 * (k + 1), dtype=np.uint16) for k in range(4)])
    frames[:, :, :8] = 0  # a dark band, so that each frame has a range to window
    mf_series = generate_uid()
    a = studies["A"]
    multi = grey(frames, StudyInstanceUID=a["uid"], SeriesInstanceUID=mf_series, Modality="MR",
                 SeriesNumber=2, InstanceNumber=1, PatientName=a["name"], PatientID=a["id"],
                 StudyDate=a["date"], AccessionNumber=a["accession"], StudyDescription=a["description"])
    mf_sop = pydicom.dcmread(io.BytesIO(multi)).SOPInstanceUID
    orthanc.upload(multi)
    orthanc.upload(_bytes(_patient(pydicom.dcmread(io.BytesIO(bundled("MR_small.dcm"))), studies["B"])))
    orthanc.upload(_bytes(_ct(studies["C"], generate_uid(), 1, 0.0)))
    by_position = [ds.SOPInstanceUID for ds in sorted(slices, key=lambda d: float(d.ImagePositionPatient[2]))]
    return Archive(studies, ct_series, by_position, text.SOPInstanceUID, mf_series, mf_sop, len(frames))
