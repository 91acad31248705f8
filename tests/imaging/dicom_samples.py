"""Small DICOM files built with pydicom, and pydicom's own bundled test files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


def bundled(name: str) -> bytes:
    """One of the test files that ship inside pydicom (no download)."""
    path = get_testdata_file(name)
    assert path is not None, name
    return Path(str(path)).read_bytes()


def grey(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    syntax: UID = ExplicitVRLittleEndian,
    **elements: object,
) -> bytes:
    """A greyscale DICOM file: (rows, cols) or (frames, rows, cols) uint16/int16 pixels."""
    ds = _base(syntax)
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = 1
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    _set_pixels(ds, pixels)
    for name, value in elements.items():
        setattr(ds, name, value)
    return _write(ds)


def encapsulated(syntax: str, rows: int = 8, columns: int = 8) -> bytes:
    """A file whose pixel data is compressed with ``syntax`` (its payload is not checked)."""
    ds = _base(UID(syntax))
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.SamplesPerPixel = 1
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.Rows, ds.Columns = rows, columns
    ds.PixelData = encapsulate([b"\x00\x01" * 16])
    ds["PixelData"].VR = "OB"
    return _write(ds)


def _base(syntax: UID) -> Dataset:
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = syntax
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    return ds


def _set_pixels(ds: Dataset, pixels: np.ndarray) -> None:
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.PixelData = np.ascontiguousarray(pixels.astype(pixels.dtype.newbyteorder("<"))).tobytes()


def _write(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
