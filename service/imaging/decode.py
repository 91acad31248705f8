"""Bytes to displayable 8-bit RGB frames.

The type is sniffed from the bytes (the DICOM preamble, else Pillow's own format
detection restricted to the supported formats), never from the file name or the part's
content type. Every frame is bounded before its pixels are allocated. High bit-depth and
greyscale frames are windowed to 8 bits and replicated to three channels; that 8-bit RGB
frame is both what the model sees and what overlays are drawn on.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import BadRequest, PayloadTooLarge, ServiceError, UnsupportedMedia

# Our own pixel limit replaces Pillow's global one, which would raise at 2x its value only.
Image.MAX_IMAGE_PIXELS = None

# Only these decoders ever see client bytes: Pillow's other plugins (EPS runs Ghostscript,
# PSD, ICO, ...) are attack surface the contract does not promise. (The JPEG opener also
# yields the MPO files many cameras write.)
PILLOW_FORMATS = ("JPEG", "PNG", "TIFF", "BMP", "WEBP", "GIF")
SUPPORTED = "JPEG, PNG, TIFF, BMP, WebP, GIF, DICOM"

_HIGH_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "I;16S", "I;32", "I;32S", "F"}


@dataclass(frozen=True)
class Frame:
    """One decoded frame, ready to display and to preprocess."""

    image: Image.Image  # mode "RGB", 8 bits per channel, orientation applied
    frame: int  # index of the frame within its file
    source_mode: str  # mode before conversion, e.g. "I;16", "P" or "MONOCHROME1"

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int  # per frame
    max_frames: int  # per file
    images_left: int | None = None  # what the request's image budget still allows

    def check_frames(self, n_frames: int, label: str) -> None:
        """Refuse a file by its declared frame count, before decoding any frame."""
        if n_frames > self.max_frames:
            raise PayloadTooLarge(
                f"{label} has {n_frames} frames; at most {self.max_frames} are accepted per file"
            )
        if self.images_left is not None and n_frames > self.images_left:
            raise PayloadTooLarge(
                f"{label} has {n_frames} frames, more than the {self.images_left} images "
                "(frames included) this request may still carry; split it"
            )

    def check_pixels(self, width: int, height: int, label: str) -> None:
        """Refuse a frame by its declared size, before its pixels are allocated."""
        if width * height > self.max_pixels:
            raise PayloadTooLarge(
                f"{label} is {width}x{height} = {width * height} pixels; "
                f"at most {self.max_pixels} are accepted per frame"
            )
        if width <= 0 or height <= 0:
            raise UnsupportedMedia(f"{label} has no pixels")


def is_dicom(data: bytes) -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def may_be_bare_dicom(data: bytes) -> bool:
    """A data set written without preamble and file meta (older modalities still do this)
    usually opens with a group 0x0008 or 0x0002 tag, in either byte order."""
    return data[:2] in (b"\x08\x00", b"\x00\x08", b"\x02\x00") and len(data) > 16


def decode_image(data: bytes, limits: DecodeLimits, filename: str = "") -> list[Frame]:
    """Decode every frame of an image file, or raise a 4xx domain error."""
    label = f"file {filename!r}" if filename else "the file"
    if not data:
        raise BadRequest(f"{label} is empty")
    try:
        with warnings.catch_warnings():
            # Malformed files make decoders warn; the outcome (a frame or a 4xx) is what counts.
            warnings.simplefilter("ignore")
            if is_dicom(data):
                # Imported here so pydicom loads only when a DICOM file arrives.
                from service.imaging.dicom import decode_dicom

                return decode_dicom(data, limits, label)
            try:
                image = Image.open(io.BytesIO(data), formats=PILLOW_FORMATS)
            except UnidentifiedImageError:
                if not may_be_bare_dicom(data):
                    raise
                from service.imaging.dicom import decode_dicom

                return decode_dicom(data, limits, label, bare=True)
            return list(_frames(image, limits, label))
    except ServiceError:
        raise
    except UnidentifiedImageError as exc:
        raise UnsupportedMedia(f"{label} is not an image in a supported format ({SUPPORTED})") from exc
    except Exception as exc:
        # Decoders fed hostile bytes fail in many ways (struct.error, IndexError, ...);
        # every one of them means "not a decodable image", never a fault of the service.
        raise UnsupportedMedia(f"{label} could not be decoded: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


def _frames(image: Image.Image, limits: DecodeLimits, label: str) -> Iterator[Frame]:
    # An MPO's extra pictures are previews or depth maps of the one photo, not frames.
    n_frames = 1 if image.format == "MPO" else int(getattr(image, "n_frames", 1) or 1)
    limits.check_frames(n_frames, label)
    for index in range(n_frames):
        if index:
            image.seek(index)
        width, height = image.size
        limits.check_pixels(width, height, f"{label} frame {index}")
        image.load()
        yield Frame(image=to_display_rgb(image), frame=index, source_mode=image.mode)


def to_display_rgb(image: Image.Image) -> Image.Image:
    """Orientation applied, high bit depths windowed to 8 bits, any mode to RGB."""
    oriented = ImageOps.exif_transpose(image) or image
    mode = oriented.mode
    if mode in _HIGH_DEPTH_MODES:
        pixels = np.asarray(oriented)
        if pixels.ndim != 2:
            raise UnsupportedMedia(f"unsupported pixel layout {mode} {pixels.shape}")
        return grey_to_rgb(window_to_uint8(pixels))
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in oriented.info
    ):
        # Transparent pixels are shown on white, as a browser would show them.
        rgba = oriented.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return oriented.convert("RGB")


def grey_to_rgb(pixels: np.ndarray) -> Image.Image:
    """(H, W) uint8 to an RGB image with the grey value in every channel."""
    grey = np.ascontiguousarray(pixels, dtype=np.uint8)
    return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))


def window_to_uint8(
    pixels: np.ndarray, low: float | None = None, high: float | None = None
) -> np.ndarray:
    """Linearly map [low, high] (default: the data's full range) to 0..255."""
    values = np.nan_to_num(pixels.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo = float(values.min()) if low is None else low
    hi = float(values.max()) if high is None else high
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
