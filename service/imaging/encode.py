"""Masks and images to what goes over the wire: float lists, base64 float32, PNG."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from service.imaging.colormaps import apply_colormap


def display_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Original size with the longer side capped at ``max_side``, aspect kept."""
    longest = max(width, height)
    if longest <= max_side:
        return width, height
    scale = max_side / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def mask_to_list(mask: np.ndarray) -> list[list[float]]:
    return np.asarray(mask, dtype=np.float32).round(6).tolist()


def mask_to_base64(mask: np.ndarray) -> str:
    """Little-endian float32, row-major."""
    raw = np.ascontiguousarray(mask, dtype="<f4").tobytes()
    return base64.b64encode(raw).decode("ascii")


def mask_from_base64(data: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(data), dtype="<f4").reshape(shape)


def png_base64(pixels: np.ndarray, compress_level: int = 3) -> str:
    """Encode an (H, W, 3|4) uint8 array as base64 PNG."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=compress_level)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def overlay(image: Image.Image, mask: np.ndarray, colormap: str, alpha: float) -> np.ndarray:
    """Blend the coloured map over the image; ``mask`` must already have the image's size."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    _check_same_size(base, mask)
    colour = apply_colormap(mask, colormap).astype(np.float32)
    blended = (1.0 - alpha) * base + alpha * colour
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def heatmap_rgba(mask: np.ndarray, colormap: str) -> np.ndarray:
    """The coloured map with alpha = map value, for blending on the client."""
    colour = apply_colormap(mask, colormap)
    alpha = np.clip(np.rint(mask * 255.0), 0, 255).astype(np.uint8)
    return np.dstack([colour, alpha])


def _check_same_size(image: np.ndarray, mask: np.ndarray) -> None:
    if image.shape[:2] != mask.shape:
        raise ValueError(f"mask {mask.shape} does not match image {image.shape[:2]}")
