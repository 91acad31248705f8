"""Masks and images to what goes over the wire: float lists, base64 float32, PNG."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from types import ModuleType

import numpy as np
from PIL import Image

from service.imaging.colormaps import blend_table, lookup_table, to_indices

_fast_deflate: ModuleType | None
try:  # Intel ISA-L's deflate: the same PNGs at about four times zlib's speed on x86
    from isal import isal_zlib as _fast_deflate
except ImportError:  # pragma: no cover - isal ships wheels for the platforms torch runs on
    _fast_deflate = None

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOUR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (grey, grey+alpha, RGB, RGBA)


def display_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Original size with the longer side capped at ``max_side``, aspect kept."""
    longest = max(width, height)
    if longest <= max_side:
        return width, height
    scale = max_side / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


# The element types a base64 mask may travel as, little-endian (uint8: value x 255, rounded).
MASK_DTYPES = {"float32": "<f4", "float16": "<f2", "uint8": "u1"}


def mask_to_base64(mask: np.ndarray, dtype: str = "float32") -> str:
    """A mask in [0, 1] as base64 of ``dtype`` values, row-major (see :data:`MASK_DTYPES`)."""
    if dtype == "uint8":
        # Rounded into a uint8 buffer directly: no float64 temporary of the whole mask.
        scaled = np.multiply(mask, 255.0, dtype=np.float32)
        raw = np.rint(scaled, out=scaled).astype(np.uint8).tobytes()
    else:
        raw = np.ascontiguousarray(mask, dtype=MASK_DTYPES[dtype]).tobytes()
    return base64.b64encode(raw).decode("ascii")


def mask_from_base64(data: str, shape: tuple[int, ...], dtype: str = "float32") -> np.ndarray:
    """The float32 mask :func:`mask_to_base64` encoded."""
    values = np.frombuffer(base64.b64decode(data), dtype=MASK_DTYPES[dtype]).reshape(shape)
    if dtype == "uint8":
        return values.astype(np.float32) / np.float32(255.0)
    return values.astype(np.float32)


def png_bytes(pixels: np.ndarray, compress_level: int = 3) -> bytes:
    """An (H, W), (H, W, 1|2|3|4) uint8 array as an 8-bit PNG file.

    Every row uses PNG's Sub filter (the byte minus the same channel of the pixel to its left),
    computed with one numpy subtraction, and the rows are deflated (:func:`deflate`).
    ``compress_level`` 0 stores the rows unfiltered and uncompressed. Other arrays go through
    Pillow.
    """
    array = np.ascontiguousarray(pixels)
    channels = 1 if array.ndim == 2 else array.shape[-1] if array.ndim == 3 else 0
    if array.dtype != np.uint8 or channels not in _COLOUR_TYPES or 0 in array.shape:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG", compress_level=compress_level)
        return buffer.getvalue()
    height, width = array.shape[:2]
    rows = array.reshape(height, width * channels)
    scanlines = np.empty((height, width * channels + 1), dtype=np.uint8)
    if compress_level == 0:
        scanlines[:, 0] = 0  # filter None
        scanlines[:, 1:] = rows
    else:
        scanlines[:, 0] = 1  # filter Sub; uint8 arithmetic wraps modulo 256 as PNG requires
        scanlines[:, 1:1 + channels] = rows[:, :channels]
        np.subtract(rows[:, channels:], rows[:, :-channels], out=scanlines[:, 1 + channels:])
    data = deflate(scanlines.data, compress_level)
    header = struct.pack(">IIBBBBB", width, height, 8, _COLOUR_TYPES[channels], 0, 0, 0)
    return PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def deflate(data: memoryview | bytes, compress_level: int) -> bytes:
    """A zlib stream of ``data`` (zlib levels: 0 stores, 1-9 compress harder and slower).

    With ISA-L installed, levels 1-3, 4-6 and 7-9 become its levels 1, 2 and 3; otherwise
    zlib's run-length strategy, which suits Sub-filtered rows as well as its default does
    and is several times faster.
    """
    if compress_level == 0:
        return zlib.compress(data, 0)
    if _fast_deflate is not None:
        return _fast_deflate.compress(data, (compress_level + 2) // 3)
    compressor = zlib.compressobj(compress_level, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    return compressor.compress(data) + compressor.flush()


def png_base64(pixels: np.ndarray, compress_level: int = 3) -> str:
    """Encode an (H, W[, C]) uint8 array as base64 PNG (see :func:`png_bytes`)."""
    return base64.b64encode(png_bytes(pixels, compress_level)).decode("ascii")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def overlay(
    image: Image.Image, mask: np.ndarray, colormap: str, alpha: float, fade: bool = False
) -> np.ndarray:
    """Blend the coloured map over the image; ``mask`` must already have the image's size.

    Each pixel follows the blend formula of :mod:`service.imaging.colormaps` (``fade``: its
    "fade" mode), in float32, looked up in :func:`~service.imaging.colormaps.blend_table`.
    """
    base = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    _check_same_size(base, mask)
    table = blend_table(colormap, float(alpha), fade).reshape(3, 256 * 256)
    index = to_indices(mask).astype(np.uint16)
    index <<= 8
    blended = np.empty(base.shape, dtype=np.uint8)
    for channel in range(3):  # entry i * 256 + v of the channel's table
        np.take(table[channel], index | base[:, :, channel], out=blended[:, :, channel])
    return blended


def heatmap_rgba(mask: np.ndarray, colormap: str) -> np.ndarray:
    """The coloured map with alpha = map value, for blending on the client."""
    indices = to_indices(mask)
    return np.dstack([lookup_table(colormap)[indices], indices])


def _check_same_size(image: np.ndarray, mask: np.ndarray) -> None:
    if image.shape[:2] != mask.shape:
        raise ValueError(f"mask {mask.shape} does not match image {image.shape[:2]}")
