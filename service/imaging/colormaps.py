"""Colour maps as 256-entry uint8 lookup tables, taken from matplotlib's registry, and the one
definition of the overlay blend.

The blend, for an image value ``v`` (one channel, 0..255), a map value ``m`` in [0, 1], its table
index ``i = clip(round(255 m), 0, 255)``, that index's colour ``c`` (same channel) and the
request's ``alpha``::

    a   = alpha              (overlay_mode "uniform": every pixel tinted alike)
    a   = alpha * i / 255    (overlay_mode "fade": low values leave the image as it is)
    out = clip(round((1 - a) * v + a * c), 0, 255)

The review page (service/ui/static/app.js, ``blendPixels``) draws with exactly this formula
and the tables :func:`tables_json` serves, so its view and ``overlay_png`` agree.
"""

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
def blend_table(name: str, alpha: float, fade: bool = False) -> np.ndarray:
    """(3 * 256 * 256,) uint8: every blended value, indexed by (channel, map index, image value).

    Entry ``(c * 256 + i) * 256 + v`` is the module's blend formula for that image value, map
    index and channel (``fade``: overlay_mode "fade"), computed in float32 exactly as a
    pixel-by-pixel blend would be, so a lookup gives the same bytes with one gather instead of
    six passes of float arithmetic.
    """
    if fade:
        weights = np.float32(alpha) * np.arange(256, dtype=np.float32) / np.float32(255.0)  # (i,)
        colours = lookup_table(name).astype(np.float32).T * weights[None, :]  # (c, i)
        keep = (np.float32(1.0) - weights)[None, :, None]  # (1, i, 1)
        table = colours[:, :, None] + keep * np.arange(256, dtype=np.float32)[None, None, :]
    else:
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


def tables_json() -> dict[str, object]:
    """Every colour map the API accepts, as the review page reads them: name -> 256 [r, g, b]."""
    return {
        "colormaps": {name: lookup_table(name).tolist() for name in COLORMAPS},
        "blend": "out = clip(round((1 - a) * v + a * c), 0, 255); a = alpha (uniform) or "
                 "alpha * i / 255 (fade), i = clip(round(255 * m), 0, 255)",
    }
