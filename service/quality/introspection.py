"""Looking inside the network: a layer's activation maps and a convolution's kernels as images.

Zeiler and Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014, arXiv
1311.2901, look at both: what each channel of a layer responds to in one image, and the learnt
filters themselves. These functions run on the engine's worker (they take its
:class:`~service.models.loader.LoadedModel`, and run the model only through the runner it hands
out, over the model itself: the kernels shown are the learnt ones, not the lean copy's folded
ones) and return numpy arrays and numbers only; tiling
(:func:`service.quality.tiles.tile_grid`) is plain numpy so it can run anywhere.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

from service.imaging.colormaps import apply_colormap
from service.models.loader import LoadedModel
from service.quality.tiles import FeatureMaps, KernelMode, Kernels, normalise, symmetric


def model_input(loaded: LoadedModel, pixels: np.ndarray) -> Tensor:
    """The normalised (1, 3, H, W) input for an (H, W, 3) uint8 image at the model's size."""
    image = torch.from_numpy(np.array(pixels, dtype=np.uint8)).to(loaded.device)
    x = image.permute(2, 0, 1)[None].float().div_(255.0)
    mean = torch.tensor(loaded.spec.mean, device=loaded.device).view(1, 3, 1, 1)
    std = torch.tensor(loaded.spec.std, device=loaded.device).view(1, 3, 1, 1)
    return (x - mean) / std


def layer_activations(loaded: LoadedModel, pixels: np.ndarray, layer: str) -> Tensor:
    """The output (K, h, w) of ``layer`` for one image; the hook is removed whatever happens."""
    runner = loaded.runner((layer,), exact=True)
    output = runner.outputs(model_input(loaded, pixels), [layer]).get(layer)
    if not isinstance(output, Tensor) or output.dim() != 4:
        raise ValueError(f"layer {layer!r} does not produce a 4-D output")
    return output[0].float()


def feature_maps(loaded: LoadedModel, pixels: np.ndarray, layer: str, max_channels: int) -> FeatureMaps:
    """Per-channel statistics of ``layer`` on one image, and its strongest channels as tiles."""
    acts = layer_activations(loaded, pixels, layer)
    flat = acts.flatten(1)
    means = flat.mean(dim=1)
    peaks = flat.max(dim=1).values
    # Strongest first: highest mean activation, the peak breaking ties (stable for equal pairs).
    # The statistics come to the host once, not one float() (a device sync) per channel.
    mean_list, peak_list = means.tolist(), peaks.tolist()
    order = sorted(range(acts.shape[0]), key=lambda k: (-mean_list[k], -peak_list[k]))
    index = torch.tensor(order, device=acts.device)
    shown = acts[index[:max_channels]].cpu().numpy()
    return FeatureMaps(
        shape=(int(acts.shape[0]), int(acts.shape[1]), int(acts.shape[2])),
        order=order,
        mean=means[index].cpu().numpy(),
        max=peaks[index].cpu().numpy(),
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
    module = loaded.runner(exact=True).convolution(layer)
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
        tiles = [np.repeat(symmetric(p.numpy())[..., None], 3, axis=2) for p in planes]
    return Kernels((out, per_group, kh, kw), module.groups, rendering, np.stack(tiles))
