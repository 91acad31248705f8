"""Running CAM methods on a batch: hooks, one shared forward/backward, fusion.

Activations are captured by forward hooks that swap the layer's output for a fresh leaf
tensor requiring grad (the model's parameters never require grad). Methods see each layer's
output, and its gradient, as (B, K, H, W): channels-last outputs and ViT's class and patch
tokens are reshaped to that grid (:mod:`service.models.layout`). ``torch.autograd.grad`` of
the target scores with respect to those leaves then runs backward only from the target layer
up, and never touches any parameter's ``.grad``. Every method requested on the same layers
shares that single forward and backward pass. Hooks are removed in ``finally``
(:mod:`service.models.hooks`).

Everything runs through the runner the model's owner hands out
(:meth:`service.models.loader.LoadedModel.runner`, :class:`service.models.runner.Runner`);
each round's methods get it wrapped in a :class:`~service.cams.probe.Probe`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.cams.base import CAMMethod, LayerContext, normalize
from service.cams.maps import BatchOutput, SampleMap
from service.cams.probe import Probe
from service.cams.smoothing import augmented
from service.models.layout import Layout, layout_of, to_grid
from service.models.runner import Runner


@dataclass
class Captured:
    """One layer's output as the model produced it, and how it maps onto a grid."""

    output: Tensor  # native layout; a leaf requiring grad when captured with gradients
    layout: Layout
    size: tuple[int, int]  # the model input's (height, width)

    def grid(self, tensor: Tensor | None = None) -> Tensor:
        """``tensor`` (the output by default, or its gradient) as (B, C, H, W)."""
        return to_grid(self.output if tensor is None else tensor, self.layout, self.size)


@contextmanager
def capture(
    runner: Runner, layers: Sequence[str], with_grad: bool, size: tuple[int, int]
) -> Iterator[dict[str, Captured]]:
    """Record each layer's output; with ``with_grad`` as a leaf that gradients can reach.

    ``size`` is the model input's (height, width), which tells the output's layout
    (:mod:`service.models.layout`): (B, C, H, W), channels last, or a class token and patches.
    """
    store: dict[str, Captured] = {}

    def hook_for(name: str):  # type: ignore[no-untyped-def]
        def hook(_module: nn.Module, _inputs: object, output: object) -> Tensor:
            layout = layout_of(output.shape, size) if isinstance(output, Tensor) else None
            if not isinstance(output, Tensor) or layout is None:
                raise TypeError(
                    f"layer {name!r} does not produce a 4-D tensor or a grid of patch tokens"
                )
            # When an earlier hooked layer already started the graph, this layer stays inside
            # it; a fresh leaf here would cut that earlier layer off from the scores.
            captured = output if output.requires_grad else output.detach().requires_grad_(with_grad)
            store[name] = Captured(captured, layout, size)
            # Downstream in-place ops (ReLU(inplace), +=) must act on a copy, not the capture.
            return captured.clone()

        return hook

    with runner.hooks((name, hook_for(name)) for name in layers):
        yield store


def fuse(maps: list[Tensor], scale: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Several layers' normalised maps brought to the largest grid, element-wise maximum.

    As TorchCAM fuses them: each map is normalised, rescaled by its method's ``fusion_scale``
    (Layer-CAM's ``tanh(2 * map)``), upsampled bilinearly, and the maximum taken.
    """
    if len(maps) == 1:
        return normalize(maps[0])
    rescale = scale or (lambda m: m)
    height = max(m.shape[-2] for m in maps)
    width = max(m.shape[-1] for m in maps)
    resized = [
        F.interpolate(
            rescale(normalize(m))[:, None], size=(height, width), mode="bilinear", align_corners=False
        )[:, 0]
        for m in maps
    ]
    return normalize(torch.stack(resized).amax(dim=0))


def explain_batch(
    runner: Runner,
    inputs: Tensor,
    layers: Sequence[str],
    methods: Sequence[CAMMethod],
    targets: Sequence[Sequence[int] | None],
    *,
    eigen_smooth: bool = False,
    aug_smooth: bool = False,
) -> BatchOutput:
    """Maps of every method for every sample's targets (top-1 where a sample names none),
    computed through ``runner``.

    ``eigen_smooth`` reduces each method's channel terms to their first principal component;
    ``aug_smooth`` averages the maps over horizontal flips and rescalings of the input
    (:mod:`service.cams.smoothing`).
    """

    def once(batch: Tensor, chosen: Sequence[Sequence[int] | None]) -> BatchOutput:
        return explain_once(runner, batch, layers, methods, chosen, eigen_smooth=eigen_smooth)

    return augmented(once, inputs, targets) if aug_smooth else once(inputs, targets)


def _grad_mode(methods: Sequence[CAMMethod]) -> AbstractContextManager[object]:
    """Autograd only as far as some method needs it; inference mode otherwise."""
    if any(m.uses_gradients and not m.layer_free for m in methods):
        return torch.enable_grad()
    if any(m.own_autograd or m.uses_gradients for m in methods):
        # Inference tensors could not enter the autograd graphs these methods build later.
        return torch.no_grad()
    return torch.inference_mode()


def explain_once(
    runner: Runner,
    inputs: Tensor,
    layers: Sequence[str],
    methods: Sequence[CAMMethod],
    targets: Sequence[Sequence[int] | None],
    *,
    eigen_smooth: bool = False,
) -> BatchOutput:
    """One shared forward (and backward, if any method reads gradients) for all methods."""
    layer_methods = [m for m in methods if not m.layer_free]
    with_grad = any(m.uses_gradients for m in layer_methods)
    hooked = layers if layer_methods else []
    size = (int(inputs.shape[-2]), int(inputs.shape[-1]))
    with capture(runner, hooked, with_grad, size) as store, _grad_mode(methods):
        logits = runner.forward(inputs)
    top1 = logits.detach().argmax(dim=1).tolist()
    classes = [list(t) if t else [int(i)] for t, i in zip(targets, top1, strict=True)]
    maps: list[list[SampleMap]] = [[] for _ in classes]
    rounds = max(len(c) for c in classes)
    for round_ in range(rounds):
        active = [b for b, c in enumerate(classes) if len(c) > round_]
        chosen = [classes[b][round_] for b in active]
        index = torch.tensor(active, device=inputs.device)
        class_tensor = torch.tensor(chosen, device=inputs.device)
        gradients: list[Tensor | None] = [None] * len(hooked)
        if with_grad:
            scores = logits[index, class_tensor]
            found = torch.autograd.grad(
                scores.sum(), [store[name].output for name in hooked],
                retain_graph=round_ < rounds - 1,
            )
            gradients = [store[name].grid(g)[index] for name, g in zip(hooked, found, strict=True)]
        probe = Probe(
            runner, inputs[index],
            layouts={name: store[name].layout for name in hooked},
            class_tokens={
                name: store[name].output.detach()[index, :1]
                for name in hooked if store[name].layout == "tokens"
            },
        )
        contexts = [
            LayerContext(
                # float32 whatever the forward ran in (CAMSERVE_PRECISION): the methods' small
                # epsilons and sums stay meaningful; a no-op for a float32 forward.
                layer=name,
                activations=store[name].grid().detach()[index].float(),
                gradients=None if gradient is None else gradient.float(),
                inputs=inputs[index],
                classes=class_tensor,
                logits=logits.detach()[index].float(),
                probe=probe,
                eigen_smooth=eigen_smooth,
            )
            for name, gradient in zip(hooked, gradients, strict=True)
        ]
        # Layer-free methods (FullGrad) see the inputs in place of a layer's activations.
        whole = LayerContext(
            layer="", activations=inputs[index], gradients=None, inputs=inputs[index],
            classes=class_tensor, logits=logits.detach()[index].float(), probe=probe,
            eigen_smooth=eigen_smooth,
        )
        with torch.no_grad():
            for method in methods:
                if method.layer_free:
                    fused = normalize(method.saliency(whole))
                else:
                    fused = fuse([method.saliency(c) for c in contexts], method.fusion_scale)
                for row, (b, class_idx) in enumerate(zip(active, chosen, strict=True)):
                    maps[b].append(SampleMap(method.name, class_idx, fused[row]))
    return BatchOutput(logits=logits.detach(), maps=maps)


def resize_map(grid: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of one (h, w) map, re-normalised so it spans [0, 1] exactly again."""
    if tuple(grid.shape) == size:
        return grid
    resized = F.interpolate(grid[None, None], size=size, mode="bilinear", align_corners=False)
    return normalize(resized[0])[0]
