"""Bytes to displayable 8-bit RGB frames.

The type is sniffed from the bytes (the DICOM preamble, else Pillow's own format
detection restricted to the supported formats), never from the file name or the part's
content type. Every frame is bounded before its pixels are allocated. High bit-depth and
greyscale frames are windowed to 8 bits and replicated to three channels; that 8-bit RGB
frame is both what the model sees and what overlays are drawn on.
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import partial

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from service.errors import BadRequest, ServiceError, UnsupportedMedia
from service.imaging.frames import (
    Frame,
    Window,
    grey_to_rgb,
    value_range,
    window_bounds,
    window_of,
    window_to_uint8,
)
from service.imaging.jpeg import scan_shortfall
from service.imaging.limits import DecodeLimits, frame_bytes, mode_bytes, reduction, shrunk_size

__all__ = ["DecodeLimits", "Frame", "decode_image", "iter_frames", "shrink"]

# Our own pixel limit replaces Pillow's global one, which would raise at 2x its value only.
Image.MAX_IMAGE_PIXELS = None


class _PerThread(threading.local):
    """Pillow reads ``ImageFile.LOAD_TRUNCATED_IMAGES`` as a truth value on every load; this
    one is true only on a thread decoding for a caller that allows truncated files, so one
    request's setting never leaks into another's decode on another thread."""

    allowed = False

    def __bool__(self) -> bool:
        return self.allowed


_truncated_ok = _PerThread()


def _allow_truncated(allowed: bool) -> None:
    if ImageFile.LOAD_TRUNCATED_IMAGES is not _truncated_ok:
        # Whatever else set it (True, globally, for every caller) is replaced, not obeyed.
        ImageFile.LOAD_TRUNCATED_IMAGES = _truncated_ok  # type: ignore[assignment]
    _truncated_ok.allowed = allowed

# Only these decoders ever see client bytes: Pillow's other plugins (EPS runs Ghostscript,
# PSD, ICO, ...) are attack surface the contract does not promise. (The JPEG opener also
# yields the MPO files many cameras write.)
PILLOW_FORMATS = ("JPEG", "PNG", "TIFF", "BMP", "WEBP", "GIF")
SUPPORTED = "JPEG, PNG, TIFF, BMP, WebP, GIF, DICOM"

_HIGH_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "I;16S", "I;32", "I;32S", "F"}


def shrink(frame: Frame, reduce_to: tuple[int, int] | None) -> Frame:
    """The frame with its image no larger than ``reduce_to`` needs (see limits.shrunk_size),
    so a request holds small copies while it waits; its reported size is kept."""
    size = shrunk_size(frame.image.width, frame.image.height, reduce_to)
    if size == frame.image.size:
        return frame
    image = frame.image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return replace(frame, image=image)


def is_dicom(data: bytes) -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def may_be_bare_dicom(data: bytes) -> bool:
    """A data set written without preamble and file meta (older modalities still do this)
    usually opens with a group 0x0008 or 0x0002 tag, in either byte order."""
    return data[:2] in (b"\x08\x00", b"\x00\x08", b"\x02\x00") and len(data) > 16


def decode_image(data: bytes, limits: DecodeLimits, filename: str = "") -> list[Frame]:
    """Decode every frame of an image file, or raise a 4xx domain error."""
    return list(iter_frames(data, limits, filename))


def iter_frames(
    data: bytes, limits: DecodeLimits, filename: str = "", window: Window | None = None
) -> Iterator[Frame]:
    """Every frame of an image file, one at a time, so a caller can shrink each (and let go
    of the full-size pixels) before the next is decoded; or a 4xx domain error.

    ``window`` (centre, width) replaces the file's own window (DICOM) or the full range
    (16-bit and float frames); 8-bit frames are shown as they are."""
    label = f"file {filename!r}" if filename else "the file"
    if not data:
        raise BadRequest(f"{label} is empty")
    _allow_truncated(limits.allow_truncated)
    try:
        with warnings.catch_warnings():
            # Malformed files make decoders warn; the outcome (a frame or a 4xx) is what counts.
            warnings.simplefilter("ignore")
            if is_dicom(data):
                # Imported here so pydicom loads only when a DICOM file arrives.
                from service.imaging.dicom import decode_dicom

                yield from decode_dicom(data, limits, label, window=window)
                return
            try:
                image = Image.open(io.BytesIO(data), formats=PILLOW_FORMATS)
            except UnidentifiedImageError:
                if not may_be_bare_dicom(data):
                    raise
                from service.imaging.dicom import decode_dicom

                yield from decode_dicom(data, limits, label, bare=True, window=window)
                return
            if image.format in ("JPEG", "MPO") and not limits.allow_truncated:
                _check_scans(data, image, label)
            yield from _frames(image, limits, label, window)
    except ServiceError:
        raise
    except UnidentifiedImageError as exc:
        raise UnsupportedMedia(f"{label} is not an image in a supported format ({SUPPORTED})") from exc
    except Exception as exc:
        # Decoders fed hostile bytes fail in many ways (struct.error, IndexError, ...);
        # every one of them means "not a decodable image", never a fault of the service.
        if "truncated" in str(exc):
            raise UnsupportedMedia(f"{label} is truncated: {_reason(exc)}; {_WHOLE_FILE}") from exc
        raise UnsupportedMedia(f"{label} could not be decoded: {_reason(exc)}") from exc


_WHOLE_FILE = "send the whole file"


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


def _check_scans(data: bytes, image: Image.Image, label: str) -> None:
    shortfall = scan_shortfall(data)
    if shortfall is not None:
        width, height = image.size
        raise UnsupportedMedia(
            f"{label} is truncated: its scan {shortfall.scan} has {shortfall.have} bytes, and a "
            f"{width}x{height} JPEG needs at least {shortfall.need}; {_WHOLE_FILE}"
        )


def declared_bytes(data: bytes, reduce_to: tuple[int, int] | None) -> int:
    """What the first frame of a non-DICOM file decodes to, read from its header alone (a
    large JPEG at the reduced size it is decoded at); 0 for what is no readable image here
    (DICOM, or bytes the decoder will refuse on their own). Nothing is decoded."""
    if is_dicom(data) or may_be_bare_dicom(data):
        return 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
            width, height, mode, kind = image.width, image.height, image.mode, image.format
    except Exception:
        return 0
    scale = reduction(width, height, reduce_to) if kind in ("JPEG", "MPO") else 1
    return frame_bytes(max(1, width // scale), max(1, height // scale), mode_bytes(mode))


def _frames(
    image: Image.Image, limits: DecodeLimits, label: str, window: Window | None = None
) -> Iterator[Frame]:
    n_frames, more = _count_frames(image, limits, label)
    limits.check_frames(n_frames, label, at_least=more)
    for index in range(n_frames):
        frame_label = f"{label} frame {index}" if n_frames > 1 else label
        limits.check_deadline(frame_label)
        if index:
            image.seek(index)
        width, height = image.size
        limits.check_pixels(width, height, frame_label)
        scale = reduction(width, height, limits.reduce_to) if image.format in ("JPEG", "MPO") else 1
        if scale > 1:
            # libjpeg scales while it decodes: the full-size pixels are never built.
            image.draft(image.mode, (max(1, width // scale), max(1, height // scale)))
        limits.check_bytes(*image.size, mode_bytes(image.mode), frame_label)
        _allow_truncated(limits.allow_truncated)
        image.load()
        shown, used, source = _display_rgb(image, window)
        # Reported at the size the file declares, orientation applied, however it was decoded.
        turned = shown.size != image.size
        yield Frame(image=shown, frame=index, source_mode=image.mode,
                    width=height if turned else width, height=width if turned else height,
                    window=used, window_source=source)


def _count_frames(image: Image.Image, limits: DecodeLimits, label: str) -> tuple[int, bool]:
    """The file's frame count, and whether counting stopped one past the limit.

    WebP and APNG declare their count; TIFF and GIF are counted by stepping from frame to
    frame, which Pillow's ``n_frames`` does for all of them (for TIFF in time that grows with
    the square of the count). Stepping stops one past what the limits allow.
    """
    if image.format == "MPO":
        return 1, False  # an MPO's extra pictures are previews or depth maps, not frames
    step: Callable[[int], object]
    if image.format == "TIFF":
        step = image.seek  # reads the page's tags, not its pixels
    elif image.format == "GIF" and hasattr(image, "_seek"):
        step = partial(image._seek, update_image=False)  # moves on without decoding
    else:
        return int(getattr(image, "n_frames", 1) or 1), False
    cap = limits.frames_cap
    count = 1
    try:
        while count <= cap:
            if count % 64 == 0:
                limits.check_deadline(label)
            step(count)
            count += 1
    except EOFError:
        pass
    image.seek(0)
    return count, count > cap


def to_display_rgb(image: Image.Image) -> Image.Image:
    """Orientation applied, high bit depths windowed to 8 bits, any mode to RGB.

    The orientation step copies the frame only when it turns it: at the largest size
    accepted each copy is tens of megabytes.
    """
    return _display_rgb(image)[0]


def _display_rgb(
    image: Image.Image, window: Window | None = None
) -> tuple[Image.Image, Window | None, str | None]:
    """:func:`to_display_rgb`, with ``window`` replacing the full range of high bit depths,
    the window it applied and where from ("request", "range"; None for 8-bit modes)."""
    oriented = image
    if image.getexif().get(_ORIENTATION, 1) != 1:
        oriented = ImageOps.exif_transpose(image)
    mode = oriented.mode
    if mode in _HIGH_DEPTH_MODES:
        pixels = np.asarray(oriented)
        if pixels.ndim != 2:
            raise UnsupportedMedia(f"unsupported pixel layout {mode} {pixels.shape}")
        source = "request" if window is not None else "range"
        if window is None:
            low, high = value_range(pixels)
            window = window_of(low, high)
        return grey_to_rgb(window_to_uint8(pixels, *window_bounds(window))), window, source
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in oriented.info
    ):
        # Transparent pixels are shown on white, as a browser would show them.
        rgba = oriented.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB"), None, None
    return oriented.convert("RGB"), None, None


_ORIENTATION = 0x0112
