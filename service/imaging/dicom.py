"""DICOM Part 10 files to displayable 8-bit RGB frames, through pydicom.

Greyscale frames go through the modality transform (rescale slope and intercept), then the
request's window (``window=centre,width``), else the file's own VOI window (window centre and
width) or VOI lookup table when it has one, else the full range of the frame; MONOCHROME1 is
inverted so that higher values are always brighter (and a presentation LUT shape of INVERSE
flips that once more). Colour
frames (RGB, YBR converted by pydicom, palette colour) are scaled to 8 bits.

The declared frame count and size are checked before any pixel is decoded, and a
deflated data set is inflated under a cap first, so a bomb is refused without being built.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, get_decoder, iter_pixels
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from service.errors import PayloadTooLarge, ServiceError, UnsupportedMedia
from service.imaging.frames import (
    Frame,
    Window,
    grey_to_rgb,
    value_range,
    window_bounds,
    window_of,
    window_to_uint8,
)
from service.imaging.limits import DecodeLimits

_GREY = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")
_DEFLATE_UID = str(DeflatedExplicitVRLittleEndian).encode("ascii")


def decode_dicom(
    data: bytes, limits: DecodeLimits, label: str, bare: bool = False,
    window: Window | None = None,
) -> Iterator[Frame]:
    """Every frame of a DICOM file, one at a time, or a 4xx domain error (415 names the
    transfer syntax).

    ``bare``: the bytes have no preamble and file meta; pydicom then guesses the encoding.
    ``window``: (centre, width) in modality values, instead of the file's own, for greyscale
    frames.
    """
    _check_inflated_size(data, limits, label)
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=bare)
    except InvalidDicomError as exc:
        raise UnsupportedMedia(f"{label} is not a readable DICOM file: {exc}") from exc
    if "PixelData" not in ds:
        raise UnsupportedMedia(f"{label} is a DICOM file without pixel data (not an image)")
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    n_frames = int(ds.get("NumberOfFrames") or 1)
    limits.check_frames(n_frames, label)
    limits.check_pixels(columns, rows, label)
    # Every frame declares the same size: the file's decoded bytes are known from its header.
    per_frame = -(-int(ds.get("BitsAllocated") or 8) // 8) * int(ds.get("SamplesPerPixel") or 1)
    for index in range(n_frames):
        limits.check_bytes(columns, rows, per_frame, f"{label} frame {index}" if n_frames > 1 else label)
    syntax = _transfer_syntax(ds)
    _check_decodable(syntax, label)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in (*_GREY, *_COLOUR, "PALETTE COLOR"):
        raise UnsupportedMedia(
            f"{label} has photometric interpretation {photometric or 'none'!r}, which is not supported"
        )
    modality = str(ds.get("Modality") or "").strip().upper() or None
    metadata = _metadata(ds)
    try:
        for index, pixels in enumerate(iter_pixels(ds)):
            limits.check_deadline(f"{label} frame {index}")
            image, used, source = _to_rgb(pixels, ds, photometric, index, window)
            yield Frame(image=image, frame=index, source_mode=photometric, window=used,
                        window_source=source, modality=modality, dataset=metadata)
    except ServiceError:
        raise
    except Exception as exc:
        raise UnsupportedMedia(
            f"{label} could not be decoded with transfer syntax {_name(syntax)}: {_first_line(exc)}"
        ) from exc


def _metadata(ds: Dataset) -> Dataset:
    """The data set without its pixels: what result writers copy, small enough to keep."""
    metadata = Dataset()
    pixels = {0x7FE00010, 0x7FE00008, 0x7FE00009}  # Pixel Data, Float and Double Float Pixel Data
    for element in ds:  # elements shared with ds (not copied); the pixel data left out
        if element.tag not in pixels:
            metadata.add(element)
    metadata.file_meta = ds.file_meta
    implicit, little = ds.original_encoding
    metadata.set_original_encoding(implicit, little, ds.original_character_set)
    return metadata


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax:
        return UID(str(syntax))
    # Without one (a bare data set), pydicom has worked out the encoding it read: record it,
    # as the pixel decoders look it up in the file meta.
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit:
        guessed = pydicom.uid.ImplicitVRLittleEndian
    elif little is False:
        guessed = pydicom.uid.ExplicitVRBigEndian
    else:
        guessed = pydicom.uid.ExplicitVRLittleEndian
    ds.ensure_file_meta()
    ds.file_meta.TransferSyntaxUID = guessed
    return guessed


def _name(syntax: UID) -> str:
    name = syntax.name
    return f"{name} ({syntax})" if name != str(syntax) else str(syntax)


def _check_decodable(syntax: UID, label: str) -> None:
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        decoder = None
    if decoder is None or not decoder.is_available:
        raise UnsupportedMedia(
            f"{label} uses transfer syntax {_name(syntax)}, which no decoder installed on this "
            "server can decode; send it uncompressed or as JPEG, JPEG-LS, JPEG 2000 or RLE"
        )


def _check_inflated_size(data: bytes, limits: DecodeLimits, label: str) -> None:
    """pydicom inflates a deflated data set whole: measure it under a cap before it does."""
    header = data[132:4096]
    if _DEFLATE_UID not in header:
        return
    meta_end = _file_meta_end(data)
    if meta_end is None:
        return
    # A generous bound: a few bytes per allowed pixel, for the pixels and everything else.
    cap = limits.max_pixels * 8 + (1 << 20)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflater.decompress(data[meta_end:], cap)
    except zlib.error as exc:
        raise UnsupportedMedia(f"{label} has a deflated data set that does not inflate: {exc}") from exc
    if inflater.unconsumed_tail:
        raise PayloadTooLarge(f"{label} inflates to more than {cap} bytes")


def _file_meta_end(data: bytes) -> int | None:
    # (0002,0000) UL group length, explicit VR little endian, right after the preamble.
    if data[132:138] != b"\x02\x00\x00\x00UL" or len(data) < 144:
        return None
    (length,) = struct.unpack("<I", data[140:144])
    return 144 + int(length)


def _to_rgb(
    pixels: np.ndarray, ds: Dataset, photometric: str, index: int, chosen: Window | None = None
) -> tuple[Image.Image, Window | None, str | None]:
    """The frame as 8-bit RGB, the (centre, width) window applied (None: a VOI lookup table
    or a colour frame, which have no window) and where it came from: "request", "file" or
    "range" (the frame's full range of modality values)."""
    if photometric in _GREY:
        if pixels.ndim != 2:
            raise UnsupportedMedia(f"greyscale DICOM frame {index} has shape {pixels.shape}")
        values = _modality(pixels, ds, index)
        own = None if chosen else _window(ds, index)
        window = chosen or own
        source: str | None = "request" if chosen else "file" if own else "range"
        if window is None and "VOILUTSequence" in ds:
            # A lookup table instead of a window: apply it, then show its output range.
            grey = window_to_uint8(apply_voi(values, ds, index))
            source = None
        else:
            window = window or window_of(*value_range(values))
            grey = window_to_uint8(values, *window_bounds(window))
        inverse = str(ds.get("PresentationLUTShape", "")).strip().upper() == "INVERSE"
        if (photometric == "MONOCHROME1") != inverse:
            grey = 255 - grey
        return grey_to_rgb(grey), window, source
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(pixels, ds)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        return Image.fromarray(_scale_to_uint8(rgb, bits)), None, None
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise UnsupportedMedia(f"colour DICOM frame {index} has shape {pixels.shape}")
    return Image.fromarray(_scale_to_uint8(pixels, int(ds.get("BitsStored") or 8))), None, None


def _scale_to_uint8(pixels: np.ndarray, bits: int) -> np.ndarray:
    if pixels.dtype == np.uint8 and bits <= 8:
        return np.ascontiguousarray(pixels)
    top = float(2 ** max(1, min(bits, 32)) - 1)
    return window_to_uint8(pixels, 0.0, top)


def _modality(pixels: np.ndarray, ds: Dataset, index: int) -> np.ndarray:
    """Stored values to modality values (e.g. Hounsfield units)."""
    transform = _functional_item(ds, index, "PixelValueTransformationSequence")
    if transform is not None and "RescaleSlope" in transform:
        slope = float(transform.RescaleSlope)
        intercept = float(transform.get("RescaleIntercept") or 0.0)
        return np.asarray(pixels, dtype=np.float64) * slope + intercept
    return np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)


def _window(ds: Dataset, index: int) -> Window | None:
    """The file's first VOI window as (centre, width), if it has one."""
    source: Any = ds if "WindowCenter" in ds else _functional_item(ds, index, "FrameVOILUTSequence")
    if source is None or "WindowCenter" not in source or "WindowWidth" not in source:
        return None
    centre, width = _first(source.WindowCenter), _first(source.WindowWidth)
    if centre is None or width is None or width < 1:
        return None
    return centre, width


def _first(value: object) -> float | None:
    if isinstance(value, Sequence) and not isinstance(value, str):
        value = value[0] if len(value) else None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _functional_item(ds: Dataset, index: int, name: str) -> Dataset | None:
    """An enhanced multi-frame file's per-frame (else shared) functional group item."""
    for groups, position in (("PerFrameFunctionalGroupsSequence", index),
                             ("SharedFunctionalGroupsSequence", 0)):
        sequence = ds.get(groups)
        if sequence is not None and len(sequence) > position:
            inner = sequence[position].get(name)
            if inner:
                return inner[0]
    return None
