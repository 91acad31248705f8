"""Which modules can be explained, and which one is explained by default.

A candidate layer is any named module whose output holds a spatial grid: a 4-D tensor
(N, C, H, W), a channels-last (N, H, W, C) grid (Swin), or a class token followed by patch tokens
(N, 1 + H*W, C) (ViT); :mod:`service.models.layout` tells them apart by shape. One probe forward
pass with hooks on every module records them in the order they fire, and one backward pass
tells which of them the classifier's input depends on position by position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from service.models.catalog import LayerInfo
from service.models.hooks import forward_hooks
from service.models.layout import Layout, grid_shape, layout_of, to_grid


@dataclass
class _Firing:
    name: str
    output: Tensor
    order: int
    is_container: bool
    layout: Layout
    grid: tuple[int, int, int]  # (channels, height, width)

    @property
    def spatial(self) -> bool:
        return self.grid[1] * self.grid[2] > 1


def inspect_layers(
    module: nn.Module, input_size: tuple[int, int], device: torch.device
) -> tuple[list[LayerInfo], str | None]:
    """Every module with a grid output (in the order of their last firing) and the default.

    The default is the last module with a spatial output (more than one position) whose
    gradient reaches that grid from the classifier's input: the layer just before global
    pooling in a CNN (``features.18`` on mobilenet_v2, ``layer4.1`` on resnet18, ``norm`` on
    swin_t). In a ViT the classifier reads only the class token after the last block, so the
    outputs of the last block's per-token parts (its MLP, its second norm, the block itself)
    get no gradient at the patch tokens; the last layer that does is the last block's input
    norm, ``encoder.layers.encoder_layer_11.ln_1`` on vit_b_16, the layer pytorch-grad-cam
    documents for ViTs.

    The gradient is of a fixed random projection of the last leaf module's input (the
    classifier's features), not of the logits, so a freshly initialised model whose classifier
    is all zeros (torchvision's ViT) still shows its structure. Several modules often yield the
    same tensor (a block, its last activation, the trunk around it; a norm and the permutation
    after it); among them the deepest container is chosen, and a module that computed the
    tensor rather than a view of it. ``None`` when no module has a spatial output.
    """
    firings, features = _fire(module, input_size, device)
    layers = [
        LayerInfo(f.name, f.grid, _kind(module, f.name), f.layout) for f in firings
    ]
    spatial = [f for f in firings if f.spatial]
    if not spatial:
        return layers, None
    last = _last_reached(spatial, features, input_size) or spatial[-1]
    same = [
        f
        for f in firings
        if f.output.data_ptr() == last.output.data_ptr() and f.grid == last.grid
    ]
    pool = [f for f in same if f.is_container] or same
    pool = [f for f in pool if not f.output._is_view()] or pool
    return layers, max(pool, key=lambda f: (f.name.count("."), f.order)).name


def _fire(
    module: nn.Module, input_size: tuple[int, int], device: torch.device
) -> tuple[list[_Firing], Tensor | None]:
    """Grid outputs by module, and the input of the last leaf module to run (with its graph)."""
    records: dict[str, _Firing] = {}
    last_leaf_input: list[Tensor] = []
    counter = iter(range(1 << 30))

    def recorder(name: str, container: bool):  # type: ignore[no-untyped-def]
        def hook(_m: nn.Module, inputs: tuple[object, ...], output: object) -> None:
            if not container and inputs and isinstance(inputs[0], Tensor):
                last_leaf_input[:] = [inputs[0]]
            if not isinstance(output, Tensor):
                return
            layout = layout_of(output.shape, input_size)
            if layout is not None:
                grid = grid_shape(output.shape, layout, input_size)
                records[name] = _Firing(name, output, next(counter), container, layout, grid)

        return hook

    recorders = [
        (child, recorder(name, any(True for _ in child.children())))
        for name, child in module.named_modules() if name
    ]
    probe = torch.zeros(1, 3, *input_size, device=device, requires_grad=True)
    with forward_hooks(recorders), torch.enable_grad():
        module(probe)
    firings = sorted(records.values(), key=lambda f: f.order)
    return firings, (last_leaf_input[0] if last_leaf_input else None)


def _last_reached(
    spatial: list[_Firing], features: Tensor | None, input_size: tuple[int, int]
) -> _Firing | None:
    """The last layer where the features' gradient is non-zero somewhere on its grid.

    Layers are checked from the end in growing chunks, so the backward pass usually stops
    just before the classifier instead of running through the whole network.
    """
    if features is None or not features.requires_grad:
        return None
    generator = torch.Generator().manual_seed(0)
    projection = torch.randn(features.shape, generator=generator).to(features)
    objective = (features * projection).sum()
    pending = [f for f in reversed(spatial) if f.output.requires_grad]
    chunk = 4
    with torch.enable_grad():
        while pending:
            batch, pending = pending[:chunk], pending[chunk:]
            gradients = torch.autograd.grad(
                objective, [f.output for f in batch], allow_unused=True, retain_graph=True
            )
            for firing, gradient in zip(batch, gradients, strict=True):
                if gradient is not None and to_grid(gradient, firing.layout, input_size).any():
                    return firing
            chunk *= 4
    return None


def _kind(module: nn.Module, name: str) -> str:
    return type(module.get_submodule(name)).__name__
