"""A decoded frame, and the pixel conversions both decoders share (PIL's and DICOM's).

Kept apart from :mod:`service.imaging.decode` so the DICOM decoder can use them without
importing the module that dispatches to it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Frame:
    """One decoded frame, ready to display and to preprocess.

    ``width`` and ``height`` are the frame's own size (orientation applied), which responses
    report; ``image`` may be smaller (see ``DecodeLimits.reduce_to`` and :func:`shrink`), aspect
    kept, when no output needs more.
    """

    image: Image.Image  # mode "RGB", 8 bits per channel, orientation applied
    frame: int  # index of the frame within its file
    source_mode: str  # mode before conversion, e.g. "I;16", "P" or "MONOCHROME1"
    width: int = 0  # 0: the image's own
    height: int = 0
    # (centre, width) of the linear window that brought the frame to 8 bits, in the values it
    # windowed (modality values for DICOM, stored values for 16-bit files); None: none applied.
    window: tuple[float, float] | None = None
    # Where that window came from: "request", "file" (the DICOM's own) or "range" (the frame's).
    window_source: str | None = None
    modality: str | None = None  # DICOM Modality (e.g. "CT"); None for other files
    # A DICOM frame's file metadata (a pydicom Dataset without its pixel data, shared by the
    # file's frames), for writers that copy its attributes (service.radiology); else None.
    dataset: Any = None

    def __post_init__(self) -> None:
        if not self.width or not self.height:
            object.__setattr__(self, "width", self.image.width)
            object.__setattr__(self, "height", self.image.height)


def grey_to_rgb(pixels: np.ndarray) -> Image.Image:
    """(H, W) uint8 to an RGB image with the grey value in every channel."""
    grey = np.ascontiguousarray(pixels, dtype=np.uint8)
    return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))


Window = tuple[float, float]  # (centre, width), as DICOM's Window Center and Window Width


def window_bounds(window: Window) -> tuple[float, float]:
    """[low, high] of DICOM's linear VOI function (PS3.3 C.11.2.1.2) for a (centre, width):
    values at or below low show black, at or above high white."""
    centre, width = window
    return centre - 0.5 - (width - 1) / 2, centre - 0.5 + (width - 1) / 2


def window_of(low: float, high: float) -> Window:
    """The (centre, width) whose :func:`window_bounds` are [low, high]."""
    return (low + high) / 2 + 0.5, high - low + 1


def value_range(pixels: np.ndarray) -> tuple[float, float]:
    """The finite min and max of a frame, worked through in slices (see window_to_uint8)."""
    bounds = [(float(part.min()), float(part.max())) for _, part in _float_slices(pixels)]
    return min(b[0] for b in bounds), max(b[1] for b in bounds)


def window_to_uint8(
    pixels: np.ndarray, low: float | None = None, high: float | None = None
) -> np.ndarray:
    """Linearly map [low, high] (default: the data's full range) to 0..255; NaN and
    infinities count as 0.

    A large frame is worked through a slice of rows at a time, so the float64 copies this
    needs stay a few megabytes (a whole 16-bit frame in float64 is four times the frame).
    """
    if low is None or high is None:
        bounds = [(float(part.min()), float(part.max())) for _, part in _float_slices(pixels)]
        low = min(b[0] for b in bounds) if low is None else low
        high = max(b[1] for b in bounds) if high is None else high
    out = np.zeros(pixels.shape, dtype=np.uint8)
    if high <= low:
        return out
    factor = 255.0 / (high - low)
    for start, part in _float_slices(pixels):
        window = np.clip(np.rint((part - low) * factor), 0, 255).astype(np.uint8)
        if out.ndim:
            out[start:start + len(part)] = window
        else:
            out[...] = window
    return out


_SLICE_VALUES = 1 << 20


def _float_slices(pixels: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, those rows as finite float64), about a million values at a time."""
    if pixels.ndim == 0 or pixels.size <= _SLICE_VALUES:
        yield 0, _finite(pixels)
        return
    rows = max(1, _SLICE_VALUES * len(pixels) // pixels.size)
    for start in range(0, len(pixels), rows):
        yield start, _finite(pixels[start:start + rows])


def _finite(pixels: np.ndarray) -> np.ndarray:
    return np.nan_to_num(np.asarray(pixels, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
