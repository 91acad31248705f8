"""Looking inside the network: a layer's activation maps and a convolution's kernels as images.

Zeiler and Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014, arXiv
1311.2901, look at both: what each channel of a layer responds to in one image, and the learnt
filters themselves. These functions run on the engine's worker (they take its
:class:`~service.models.loader.LoadedModel`) and return numpy arrays and numbers only; tiling
(:func:`tile_grid`) is plain numpy so it can run anywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from service.imaging.colormaps import apply_colormap
from service.models.loader import LoadedModel

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


def model_input(loaded: LoadedModel, pixels: np.ndarray) -> Tensor:
    """The normalised (1, 3, H, W) input for an (H, W, 3) uint8 image at the model's size."""
    image = torch.from_numpy(np.array(pixels, dtype=np.uint8)).to(loaded.device)
    x = image.permute(2, 0, 1)[None].float().div_(255.0)
    mean = torch.tensor(loaded.spec.mean, device=loaded.device).view(1, 3, 1, 1)
    std = torch.tensor(loaded.spec.std, device=loaded.device).view(1, 3, 1, 1)
    return (x - mean) / std


def layer_activations(loaded: LoadedModel, pixels: np.ndarray, layer: str) -> Tensor:
    """The output (K, h, w) of ``layer`` for one image; the hook is removed whatever happens."""
    captured: list[Tensor] = []

    def hook(_module: nn.Module, _inputs: object, output: object) -> None:
        if isinstance(output, Tensor):
            captured.append(output.detach())

    handle = loaded.modules[layer].register_forward_hook(hook)
    try:
        with torch.inference_mode():
            loaded.module(model_input(loaded, pixels))
    finally:
        handle.remove()
    if not captured or captured[0].dim() != 4:
        raise ValueError(f"layer {layer!r} does not produce a 4-D output")
    return captured[0][0].float()


def feature_maps(loaded: LoadedModel, pixels: np.ndarray, layer: str, max_channels: int) -> FeatureMaps:
    """Per-channel statistics of ``layer`` on one image, and its strongest channels as tiles."""
    acts = layer_activations(loaded, pixels, layer)
    flat = acts.flatten(1)
    means = flat.mean(dim=1)
    # Strongest first: highest mean activation, the peak breaking ties (stable for equal pairs).
    order = sorted(range(acts.shape[0]), key=lambda k: (-float(means[k]), -float(flat[k].max())))
    index = torch.tensor(order, device=acts.device)
    shown = acts[index[:max_channels]].cpu().numpy()
    return FeatureMaps(
        shape=(int(acts.shape[0]), int(acts.shape[1]), int(acts.shape[2])),
        order=order,
        mean=means[index].cpu().numpy(),
        max=flat.max(dim=1).values[index].cpu().numpy(),
        fraction_active=(flat > 0).float().mean(dim=1)[index].cpu().numpy(),
        tiles=np.stack([apply_colormap(normalise(tile), "viridis") for tile in shown]),
    )


def kernels(loaded: LoadedModel, layer: str, mode: KernelMode, max_kernels: int) -> Kernels:
    """A convolution's kernels as tiles: in colour when it reads the 3 input colours (the first
    layer), otherwise in grey, averaged over the input channels (``mean``) or the first one
    (``first``); a depthwise kernel has a single input channel and is shown as it is.

    Colour kernels are min-max normalised per kernel; grey ones symmetrically, so mid-grey is a
    weight of 0, white the kernel's largest positive weight and black its largest negative.
    """
    module = loaded.modules[layer]
    if not isinstance(module, nn.Conv2d):
        raise ValueError(f"layer {layer!r} is not a Conv2d")
    weight = module.weight.detach().float().cpu()[:max_kernels]
    out, per_group, kh, kw = (int(v) for v in module.weight.shape)
    if per_group == 3 and module.groups == 1:
        tiles = [(normalise(k.permute(1, 2, 0).numpy()) * 255).round().astype(np.uint8) for k in weight]
        rendering: Literal["rgb", "input_mean", "first_input", "single_input"] = "rgb"
    else:
        if per_group == 1:
            planes, rendering = weight[:, 0], "single_input"
        elif mode == "first":
            planes, rendering = weight[:, 0], "first_input"
        else:
            planes, rendering = weight.mean(dim=1), "input_mean"
        tiles = [np.repeat(_symmetric(p.numpy())[..., None], 3, axis=2) for p in planes]
    return Kernels((out, per_group, kh, kw), module.groups, rendering, np.stack(tiles))


def normalise(values: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]; a constant array becomes zeros."""
    low, high = float(values.min()), float(values.max())
    if high - low <= 1e-12:
        return np.zeros_like(values, dtype=np.float32)
    return ((values - low) / (high - low)).astype(np.float32)


def _symmetric(values: np.ndarray) -> np.ndarray:
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
