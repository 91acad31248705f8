"""JPEGs a CUDA worker decodes itself (nvjpeg), handed over as their bytes instead of pixels.

The API reads the header and checks every limit exactly as the CPU decode would
(:func:`service.imaging.decode.iter_frames`: truncated scans, frames, deadline, pixels,
decoded bytes charged to the request), then, for a plain baseline RGB JPEG, hands the worker
an :class:`EncodedImage` instead of decoding it. Anything else (progressive or arithmetic
JPEGs, greyscale, CMYK, EXIF-rotated, MPO, larger than the per-frame byte limit at full size,
every other format) is decoded on the host as before. Torch-free: the API builds these.

:func:`host_decode` is the worker's fallback when the device cannot decode a file: the CPU
path itself, so a file neither can decode gets the same 415 as it always did.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from service.imaging.decode import iter_frames, shrink
from service.imaging.encode import display_size
from service.imaging.frames import Frame
from service.imaging.jpeg import BASELINE, frame_marker, scan_shortfall
from service.imaging.limits import DecodeLimits, frame_bytes, mode_bytes, reduction
from service.imaging.preprocess import resize_for_model

_ORIENTATION = 0x0112


@dataclass(frozen=True)
class EncodedImage:
    """A baseline JPEG whose header the API has read and whose limits it has checked."""

    data: bytes
    width: int
    height: int
    filename: str | None  # for the fallback's messages, as the CPU decode words them
    reduce_to: tuple[int, int] | None  # what the CPU path keeps (DecodeLimits.reduce_to)
    # (height, width) of the image the response shows (overlays, heatmaps, image_png) when it
    # shows one: the worker sends it back, decoded and resized there; None: not wanted.
    base_size: tuple[int, int] | None = None


def routed_frame(
    data: bytes, limits: DecodeLimits, filename: str | None, max_side: int, base: bool,
) -> tuple[Frame, EncodedImage] | None:
    """For a JPEG the device may decode: its frame (size from the header, pixels not decoded:
    the image decodes on the host only if something reads it) and what the worker gets, the
    limits checked and charged as the CPU decode does; None for anything else, nothing
    charged (the CPU path then decodes and checks it). ``max_side``: the overlay cap;
    ``base``: the response shows the image, so the worker sends it back at its display size."""
    if limits.allow_truncated:
        return None
    try:
        if frame_marker(data) != BASELINE:
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data), formats=("JPEG",))
            if image.format != "JPEG" or image.mode != "RGB":
                return None
            if image.getexif().get(_ORIENTATION, 1) != 1:
                return None
        width, height = image.size
        if limits.max_frame_bytes is not None and frame_bytes(width, height, 3) > limits.max_frame_bytes:
            return None  # the host decodes it reduced (libjpeg's scaling), as before
        if scan_shortfall(data) is not None:
            return None  # the CPU path refuses it, with its own message
    except Exception:  # whatever the header walk trips on, the CPU path words the refusal
        return None
    label = f"file {filename!r}" if filename else "the file"
    # What iter_frames checks for a one-frame JPEG, in its order, charging the same bytes.
    limits.check_frames(1, label)
    limits.check_deadline(label)
    limits.check_pixels(width, height, label)
    scale = reduction(width, height, limits.reduce_to)
    if scale > 1:
        image.draft(image.mode, (max(1, width // scale), max(1, height // scale)))
    limits.check_bytes(*image.size, mode_bytes(image.mode), label)
    shown_w, shown_h = display_size(width, height, max_side)
    encoded = EncodedImage(data, width, height, filename, limits.reduce_to,
                           (shown_h, shown_w) if base else None)
    return Frame(image=image, frame=0, source_mode=image.mode, width=width, height=height), encoded


def host_decode(encoded: EncodedImage, input_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
    """The CPU path for a file the device could not decode: the model's input (H, W, 3)
    uint8 and the image at ``base_size``, as the API would have made them; raises the same
    4xx error (415 for a corrupt file) the API's decode raises."""
    limits = DecodeLimits(max(1, encoded.width * encoded.height), 1, reduce_to=encoded.reduce_to)
    frame = next(iter(iter_frames(encoded.data, limits, encoded.filename or "")))
    pixels = resize_for_model(frame.image, input_size)
    if encoded.base_size is None:
        return pixels, None
    height, width = encoded.base_size
    shown = shrink(frame, encoded.reduce_to).image
    if shown.size != (width, height):
        shown = shown.resize((width, height), Image.Resampling.BILINEAR)
    return pixels, np.asarray(shown, dtype=np.uint8)
