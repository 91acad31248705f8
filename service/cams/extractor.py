"""Running CAM methods on a batch: hooks, one shared forward/backward, fusion.

Activations are captured by forward hooks that swap the layer's output for a fresh leaf
tensor requiring grad (the model's parameters never require grad). ``torch.autograd.grad`` of
the target scores with respect to those leaves then runs backward only from the target layer
up, and never touches any parameter's ``.grad``. Every method requested on the same layers
shares that single forward and backward pass. Hooks are removed in ``finally``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.cams.base import CAMMethod, normalize


@dataclass
class SampleMap:
    method: str
    class_idx: int
    grid: Tensor  # (h, w) in [0, 1], on the layer's (largest) grid


@dataclass
class BatchOutput:
    logits: Tensor  # (B, num_classes), detached
    maps: list[list[SampleMap]]  # per sample, in (class, method) order


@contextmanager
def capture(
    modules: dict[str, nn.Module], layers: Sequence[str], with_grad: bool
) -> Iterator[dict[str, Tensor]]:
    """Record each layer's output; with ``with_grad`` as a leaf that gradients can reach."""
    store: dict[str, Tensor] = {}
    handles = []

    def hook_for(name: str):  # type: ignore[no-untyped-def]
        def hook(_module: nn.Module, _inputs: object, output: object) -> Tensor:
            if not isinstance(output, Tensor) or output.dim() != 4:
                raise TypeError(f"layer {name!r} does not produce a 4-D tensor")
            if output.requires_grad:
                # An earlier hooked layer already started the graph: keep this layer inside it,
                # or that earlier layer would be cut off from the scores.
                captured = output
            else:
                captured = output.detach().requires_grad_(with_grad)
            store[name] = captured
            # Downstream in-place ops (ReLU(inplace), +=) must act on a copy, not the capture.
            return captured.clone()

        return hook

    try:
        for name in layers:
            handles.append(modules[name].register_forward_hook(hook_for(name)))
        yield store
    finally:
        for handle in handles:
            handle.remove()


def fuse(maps: list[Tensor]) -> Tensor:
    """Several layers' normalised maps brought to the largest grid, element-wise maximum."""
    if len(maps) == 1:
        return normalize(maps[0])
    height = max(m.shape[-2] for m in maps)
    width = max(m.shape[-1] for m in maps)
    resized = [
        F.interpolate(normalize(m)[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
        for m in maps
    ]
    return normalize(torch.stack(resized).amax(dim=0))


def explain_batch(
    model: nn.Module,
    modules: dict[str, nn.Module],
    inputs: Tensor,
    layers: Sequence[str],
    methods: Sequence[CAMMethod],
    targets: Sequence[Sequence[int] | None],
) -> BatchOutput:
    """Maps of every method for every sample's targets (top-1 where a sample names none)."""
    with_grad = any(method.uses_gradients for method in methods)
    grad_mode = torch.enable_grad() if with_grad else torch.inference_mode()
    with capture(modules, layers, with_grad) as store, grad_mode:
        logits = model(inputs)
    top1 = logits.detach().argmax(dim=1).tolist()
    classes = [list(t) if t else [int(i)] for t, i in zip(targets, top1, strict=True)]
    maps: list[list[SampleMap]] = [[] for _ in classes]
    rounds = max(len(c) for c in classes)
    for round_ in range(rounds):
        active = [b for b, c in enumerate(classes) if len(c) > round_]
        chosen = [classes[b][round_] for b in active]
        index = torch.tensor(active, device=inputs.device)
        gradients: list[Tensor | None] = [None] * len(layers)
        if with_grad:
            scores = logits[index, torch.tensor(chosen, device=inputs.device)]
            found = torch.autograd.grad(
                scores.sum(), [store[name] for name in layers], retain_graph=round_ < rounds - 1
            )
            gradients = [g[index] for g in found]
        with torch.no_grad():
            acts = [store[name].detach()[index] for name in layers]
            for method in methods:
                per_layer = [method.saliency(a, g) for a, g in zip(acts, gradients, strict=False)]
                fused = fuse(per_layer)
                for row, (b, class_idx) in enumerate(zip(active, chosen, strict=False)):
                    maps[b].append(SampleMap(method.name, class_idx, fused[row]))
    return BatchOutput(logits=logits.detach(), maps=maps)


def resize_map(grid: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of one (h, w) map, re-normalised so it spans [0, 1] exactly again."""
    if tuple(grid.shape) == size:
        return grid
    resized = F.interpolate(grid[None, None], size=size, mode="bilinear", align_corners=False)
    return normalize(resized[0])[0]
