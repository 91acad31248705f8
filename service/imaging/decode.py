"""Bytes to displayable 8-bit RGB frames.

The type is sniffed from the bytes (Pillow's own format detection), never from the file
name or the part's content type. Every frame is bounded before its pixels are allocated.
High bit-depth and greyscale frames are windowed to 8 bits and replicated to three
channels; that 8-bit RGB frame is both what the model sees and what overlays are drawn on.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import BadRequest, PayloadTooLarge, UnsupportedMedia

# Our own pixel limit replaces Pillow's global one, which would raise at 2x its value only.
Image.MAX_IMAGE_PIXELS = None

_HIGH_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


@dataclass(frozen=True)
class Frame:
    """One decoded frame, ready to display and to preprocess."""

    image: Image.Image  # mode "RGB", 8 bits per channel, orientation applied
    frame: int  # index of the frame within its file
    source_mode: str  # Pillow mode before conversion, e.g. "I;16" or "P"

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int
    max_frames: int


def decode_image(data: bytes, limits: DecodeLimits, filename: str = "") -> list[Frame]:
    """Decode every frame of an image file, or raise a 4xx domain error."""
    label = f"file {filename!r}" if filename else "the file"
    if not data:
        raise BadRequest(f"{label} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            return list(_frames(image, limits, label))
    except (PayloadTooLarge, UnsupportedMedia):
        raise
    except UnidentifiedImageError as exc:
        raise UnsupportedMedia(
            f"{label} is not an image in a supported format "
            "(JPEG, PNG, TIFF, BMP, WebP, GIF)"
        ) from exc
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        raise UnsupportedMedia(f"{label} could not be decoded: {exc}") from exc


def _frames(image: Image.Image, limits: DecodeLimits, label: str) -> Iterator[Frame]:
    n_frames = int(getattr(image, "n_frames", 1) or 1)
    if n_frames > limits.max_frames:
        raise PayloadTooLarge(
            f"{label} has {n_frames} frames; at most {limits.max_frames} are accepted per file"
        )
    for index in range(n_frames):
        if index:
            image.seek(index)
        width, height = image.size
        if width * height > limits.max_pixels:
            raise PayloadTooLarge(
                f"{label} frame {index} is {width}x{height} = {width * height} pixels; "
                f"at most {limits.max_pixels} are accepted"
            )
        if width == 0 or height == 0:
            raise UnsupportedMedia(f"{label} frame {index} has no pixels")
        image.load()
        yield Frame(image=to_display_rgb(image), frame=index, source_mode=image.mode)


def to_display_rgb(image: Image.Image) -> Image.Image:
    """Orientation applied, high bit depths windowed to 8 bits, any mode to RGB."""
    oriented = ImageOps.exif_transpose(image) or image
    mode = oriented.mode
    if mode in _HIGH_DEPTH_MODES:
        return Image.fromarray(window_to_uint8(np.asarray(oriented))).convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in oriented.info):
        rgba = oriented.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return oriented.convert("RGB")


def window_to_uint8(
    pixels: np.ndarray, low: float | None = None, high: float | None = None
) -> np.ndarray:
    """Linearly map [low, high] (default: the data's full range) to 0..255."""
    values = pixels.astype(np.float64)
    lo = float(values.min()) if low is None else low
    hi = float(values.max()) if high is None else high
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
