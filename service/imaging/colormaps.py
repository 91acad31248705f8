"""Colour maps as 256-entry uint8 lookup tables, taken from matplotlib's registry."""

from __future__ import annotations

from functools import cache, lru_cache

import numpy as np

# The names the contract promises; any other matplotlib map name is accepted too.
COLORMAPS: tuple[str, ...] = ("jet", "turbo", "viridis", "inferno", "magma", "plasma", "gray", "hot")


def available_colormaps() -> tuple[str, ...]:
    return COLORMAPS


def is_colormap(name: str) -> bool:
    return name in COLORMAPS


@cache
def lookup_table(name: str) -> np.ndarray:
    """(256, 3) uint8 RGB table for a colour map name in ``COLORMAPS``."""
    if name not in COLORMAPS:
        raise KeyError(name)
    from matplotlib import colormaps  # imported lazily: only encoding needs it

    rgba = colormaps[name](np.linspace(0.0, 1.0, 256))
    table = np.rint(rgba[:, :3] * 255.0).astype(np.uint8)
    table.flags.writeable = False
    return table


@lru_cache(maxsize=64)
def scaled_table(name: str, factor: float) -> np.ndarray:
    """(256, 3) float32 table: the colour map's RGB values times ``factor``, in float32."""
    table = lookup_table(name).astype(np.float32) * np.float32(factor)
    table.flags.writeable = False
    return table


@lru_cache(maxsize=16)
def blend_table(name: str, alpha: float) -> np.ndarray:
    """(3 * 256 * 256,) uint8: every blended value, indexed by (channel, map index, image value).

    Entry ``(c * 256 + i) * 256 + v`` is ``round((1 - alpha) * v + alpha * colour[i, c])``
    clipped to [0, 255], computed in float32 exactly as a pixel-by-pixel blend would be, so a
    lookup gives the same bytes with one gather instead of six passes of float arithmetic.
    """
    values = np.arange(256, dtype=np.float32) * np.float32(1.0 - alpha)  # (v,)
    colours = scaled_table(name, alpha).T  # (c, i)
    table = colours[:, :, None] + values[None, None, :]  # (c, i, v)
    np.rint(table, out=table)
    np.clip(table, 0, 255, out=table)
    flat = table.astype(np.uint8).reshape(-1)
    flat.flags.writeable = False
    return flat


def to_indices(mask: np.ndarray) -> np.ndarray:
    """Values in [0, 1] as uint8 table indices: ``round(value * 255)`` clipped to [0, 255]."""
    scaled = np.multiply(mask, np.float32(255.0), dtype=np.float32)
    np.rint(scaled, out=scaled)
    np.clip(scaled, 0, 255, out=scaled)
    return scaled.astype(np.uint8)


def apply_colormap(mask: np.ndarray, name: str) -> np.ndarray:
    """Map values in [0, 1] of an (H, W) array to an (H, W, 3) uint8 image."""
    return lookup_table(name)[to_indices(mask)]
