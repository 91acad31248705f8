"""Which modules can be explained, and which one is explained by default.

A candidate layer is any named module whose output is a 4-D tensor (N, C, H, W). One probe
forward pass with hooks on every module records them in the order they fire.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from service.models.catalog import LayerInfo


@dataclass
class _Firing:
    name: str
    output: torch.Tensor
    order: int
    is_container: bool


def inspect_layers(
    module: nn.Module, input_size: tuple[int, int], device: torch.device
) -> tuple[list[LayerInfo], str | None]:
    """Every module with a 4-D output (in the order of their last firing) and the default.

    The default is the last module with a spatial 4-D output, i.e. the one just before
    global pooling. Several modules usually yield that same tensor (a block, its last
    activation, the trunk around it); the deepest block among them is chosen, e.g.
    ``features.18`` on mobilenet_v2 and ``layer4.1`` on resnet18. ``None`` when no module
    has a spatial 4-D output.
    """
    firings = _fire(module, input_size, device)
    layers = [
        LayerInfo(f.name, tuple(f.output.shape[1:]), _kind(module, f.name))  # type: ignore[arg-type]
        for f in firings
    ]
    spatial = [f for f in firings if f.output.shape[2] * f.output.shape[3] > 1]
    if not spatial:
        return layers, None
    last = spatial[-1]
    same = [
        f
        for f in firings
        if f.output.data_ptr() == last.output.data_ptr() and f.output.shape == last.output.shape
    ]
    pool = [f for f in same if f.is_container] or same
    return layers, max(pool, key=lambda f: (f.name.count("."), f.order)).name


def _fire(module: nn.Module, input_size: tuple[int, int], device: torch.device) -> list[_Firing]:
    records: dict[str, _Firing] = {}
    counter = iter(range(1 << 30))
    handles = []

    def recorder(name: str, container: bool):  # type: ignore[no-untyped-def]
        def hook(_m: nn.Module, _inputs: object, output: object) -> None:
            if isinstance(output, torch.Tensor) and output.dim() == 4:
                records[name] = _Firing(name, output, next(counter), container)

        return hook

    try:
        for name, child in module.named_modules():
            if name:
                container = any(True for _ in child.children())
                handles.append(child.register_forward_hook(recorder(name, container)))
        with torch.inference_mode():
            module(torch.zeros(1, 3, *input_size, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return sorted(records.values(), key=lambda f: f.order)


def _kind(module: nn.Module, name: str) -> str:
    return type(module.get_submodule(name)).__name__
