"""Tiles of a layer's maps or a convolution's kernels, and the grid they are shown in.

What :mod:`service.quality.introspection` computes on the worker, as plain numpy, and how the
routes lay it out: nothing here needs torch, so the HTTP layer can use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

KernelMode = Literal["mean", "first"]
MIN_TILE = 48  # small grids (7x7 maps, 3x3 kernels) are enlarged to at least this many pixels
MAX_TILE = 128  # large maps are shrunk to at most this, so a grid of 64 stays a sensible size
SEPARATOR = 2  # pixels between tiles
WHITE = (255, 255, 255)
STEEL_BLUE = (70, 130, 180)  # separates grey tiles, whose own white and black carry meaning


@dataclass(frozen=True)
class FeatureMaps:
    shape: tuple[int, int, int]  # (channels, height, width) of the layer's output
    order: list[int]  # channel indices, strongest (highest mean activation) first
    mean: np.ndarray  # (K,) per channel, in ``order``
    max: np.ndarray
    fraction_active: np.ndarray  # share of positions with a positive activation
    tiles: np.ndarray  # (N, h, w, 3) uint8, the first N channels of ``order``, each normalised


@dataclass(frozen=True)
class Kernels:
    weight_shape: tuple[int, int, int, int]  # (out, in per group, kh, kw)
    groups: int
    rendering: Literal["rgb", "input_mean", "first_input", "single_input"]
    tiles: np.ndarray  # (N, kh, kw, 3) uint8, each normalised

    @property
    def separator_colour(self) -> tuple[int, int, int]:
        return WHITE if self.rendering == "rgb" else STEEL_BLUE


def normalise(values: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]; a constant array becomes zeros."""
    low, high = float(values.min()), float(values.max())
    if high - low <= 1e-12:
        return np.zeros_like(values, dtype=np.float32)
    return ((values - low) / (high - low)).astype(np.float32)


def symmetric(values: np.ndarray) -> np.ndarray:
    """Grey levels with 0 at mid-grey, scaled by the largest magnitude."""
    peak = float(np.abs(values).max())
    scaled = values / peak if peak > 1e-12 else np.zeros_like(values)
    return np.clip(np.rint(127.5 + 127.5 * scaled), 0, 255).astype(np.uint8)


def tile_grid(
    tiles: np.ndarray, separator: int = SEPARATOR, colour: tuple[int, int, int] = WHITE
) -> tuple[np.ndarray, int, int, int]:
    """Tiles (N, h, w, 3) uint8 laid out in a near-square grid, ``separator`` pixels of
    ``colour`` between them.

    Each tile is enlarged with nearest neighbours to at least ``MIN_TILE`` pixels (so each cell
    of a 7x7 map or 3x3 kernel stays a visible square) or shrunk to at most ``MAX_TILE``.
    Returns the image, the number of columns and rows, and the tile side in pixels.
    """
    count, height, width = tiles.shape[:3]
    columns = max(1, math.ceil(math.sqrt(count)))
    rows = max(1, math.ceil(count / columns))
    side = max(height, width)
    factor = max(1, math.ceil(MIN_TILE / side))
    tile_h, tile_w = height * factor, width * factor
    if max(tile_h, tile_w) > MAX_TILE:
        shrink = MAX_TILE / max(tile_h, tile_w)
        tile_h, tile_w = max(1, round(tile_h * shrink)), max(1, round(tile_w * shrink))
    grid = np.empty(
        (rows * tile_h + (rows + 1) * separator, columns * tile_w + (columns + 1) * separator, 3),
        dtype=np.uint8,
    )
    grid[:] = colour
    for n, tile in enumerate(tiles):
        r, c = divmod(n, columns)
        if (tile_h, tile_w) == (height * factor, width * factor):
            big = tile.repeat(factor, axis=0).repeat(factor, axis=1)
        else:
            big = np.asarray(Image.fromarray(tile).resize((tile_w, tile_h), Image.Resampling.BILINEAR))
        top = separator + r * (tile_h + separator)
        left = separator + c * (tile_w + separator)
        grid[top:top + tile_h, left:left + tile_w] = big
    return grid, columns, rows, max(tile_h, tile_w)
