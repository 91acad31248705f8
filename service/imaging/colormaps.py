"""Colour maps as 256-entry uint8 lookup tables, taken from matplotlib's registry."""

from __future__ import annotations

from functools import cache

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


def apply_colormap(mask: np.ndarray, name: str) -> np.ndarray:
    """Map values in [0, 1] of an (H, W) array to an (H, W, 3) uint8 image."""
    indices = np.clip(np.rint(mask * 255.0), 0, 255).astype(np.uint8)
    return lookup_table(name)[indices]
