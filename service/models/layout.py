"""Where a layer's output keeps its spatial grid, and the reshapes to and from (B, C, H, W).

CAM methods read every layer as channels on a grid, (B, C, H, W). Three output layouts become
that grid:

- ``nchw``: (B, C, H, W), convolutional feature maps, used as they are;
- ``nhwc``: (B, H, W, C), channels last (Swin's stages and its final norm);
- ``tokens``: (B, 1 + H*W, C), a class token followed by the patch tokens in row-major order
  (ViT's encoder blocks); the class token is left out of the grid.

The layout is read from the output's shape and the model's input size (H_in, W_in): a grid
``(h, w)`` belongs to the image when one stride ``s`` gives ``h = H_in / s`` and ``w = W_in / s``,
each rounded either way. A 4-D output is ``nhwc`` only when its middle two sizes are such a grid
and its last two are not; every other 4-D output is ``nchw``. A 3-D output is ``tokens`` when its
token count less one is the area of such a grid (the grid closest to the input's aspect ratio is
taken). The rule is the same at layer discovery and at capture time, so both always agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

Layout = Literal["nchw", "nhwc", "tokens"]


def fits(grid: tuple[int, int], size: tuple[int, int]) -> bool:
    """Whether some stride maps the input ``size`` onto ``grid`` (each side rounded either way).

    ``h`` is ``size[0] / s`` rounded up or down exactly when ``size[0] / (h + 1) < s <
    size[0] / (h - 1)``; the grid fits when the two sides' open intervals meet.
    """
    (h, w), (height, width) = grid, size
    if not (1 <= h <= height and 1 <= w <= width):
        return False
    low = max(height / (h + 1), width / (w + 1))
    high = min(height / (h - 1) if h > 1 else math.inf, width / (w - 1) if w > 1 else math.inf)
    return low < high


def token_grid(count: int, size: tuple[int, int]) -> tuple[int, int] | None:
    """The grid (h, w) of ``count`` patch tokens for an input of ``size``; None if none fits."""
    if count < 1:
        return None
    aspect = math.log(size[0] / size[1])
    grids = [
        (h, count // h) for h in range(1, count + 1)
        if count % h == 0 and fits((h, count // h), size)
    ]
    if not grids:
        return None
    return min(grids, key=lambda g: abs(math.log(g[0] / g[1]) - aspect))


def layout_of(shape: Sequence[int], size: tuple[int, int]) -> Layout | None:
    """The layout of an output of ``shape`` for an input of ``size``; None if it has no grid."""
    if len(shape) == 4:
        if fits((shape[1], shape[2]), size) and not fits((shape[2], shape[3]), size):
            return "nhwc"
        return "nchw"
    if len(shape) == 3 and token_grid(shape[1] - 1, size) is not None:
        return "tokens"
    return None


def grid_shape(shape: Sequence[int], layout: Layout, size: tuple[int, int]) -> tuple[int, int, int]:
    """(channels, height, width) of an output of ``shape`` in ``layout``."""
    if layout == "nchw":
        return (shape[1], shape[2], shape[3])
    if layout == "nhwc":
        return (shape[3], shape[1], shape[2])
    grid = token_grid(shape[1] - 1, size)
    if grid is None:
        raise ValueError(f"{shape[1]} tokens do not form a patch grid for an input of {size}")
    return (shape[2], *grid)


def to_grid(output: Tensor, layout: Layout, size: tuple[int, int]) -> Tensor:
    """``output`` as (B, C, H, W), a view where the layout allows; differentiable."""
    if layout == "nchw":
        return output
    if layout == "nhwc":
        return output.permute(0, 3, 1, 2)
    channels, height, width = grid_shape(output.shape, layout, size)
    return output[:, 1:].transpose(1, 2).reshape(output.shape[0], channels, height, width)


def to_native(grid: Tensor, layout: Layout, class_tokens: Tensor | None = None) -> Tensor:
    """The inverse of :func:`to_grid`: (B, C, H, W) back to ``layout``; differentiable.

    A ``tokens`` layout needs the class tokens the grid leaves out, (B, 1, C) or (1, 1, C).
    """
    if layout == "nchw":
        return grid
    if layout == "nhwc":
        return grid.permute(0, 2, 3, 1)
    if class_tokens is None:
        raise ValueError("a token layout needs its class tokens back")
    patches = grid.flatten(2).transpose(1, 2)
    return torch.cat([class_tokens.to(patches).expand(patches.shape[0], -1, -1), patches], dim=1)
