"""Ablation-CAM: channels weighted by how much the score drops when they are removed."""

from __future__ import annotations

import torch
from torch import Tensor

from service.cams.base import CAMMethod, LayerContext, MethodParam
from service.cams.passes import chunked
from service.cams.probe import gather_scores


class AblationCAM(CAMMethod):
    """Ablation-CAM: the relative drop of the class score when a channel is zeroed.

    Desai and Ramaswamy, "Ablation-CAM: Visual Explanations for Deep Convolutional Network via
    Gradient-free Localization", WACV 2020.

    ``w_k = (Y_c - Y_c(A with A_k = 0)) / Y_c``; map ``= ReLU(sum_k w_k A_k)``.

    The ablated activations run only through the network after the layer (its tail, see
    :mod:`service.models.tail`), ``batch_size`` copies at a time. A channel that is already zero
    everywhere cannot change the score when zeroed: its weight is 0 without a pass.
    """

    name = "ablationcam"
    full_precision = True
    title = "Ablation-CAM"
    family = "perturbation"
    paper = "Desai and Ramaswamy 2020, WACV"
    uses_gradients = False
    passes = "1 forward (shared) + 1 tail forward per non-zero channel (batched)"
    # A tail pass runs only the layers after the target: far cheaper than a whole forward.
    extra_pass_cost = 0.25
    tail_passes = True  # a whole forward each after a layer without a tail
    params = (
        MethodParam("batch_size", "int", 64, "ablated copies per pass (1..1024)", 1, 1024),
    )

    def extra_passes(self, channels: int, grid: tuple[int, int] | None = None) -> float:
        return channels * self.extra_pass_cost

    def weights(self, context: LayerContext) -> Tensor:
        acts = context.activations
        batch_size = int(self.options["batch_size"])
        original = gather_scores(context.logits, context.classes)
        # The paper divides by Y_c; keep its sign but never divide by zero.
        safe = torch.where(original.abs() < 1e-12, torch.full_like(original, 1e-12), original)
        weights = torch.zeros(acts.shape[:2], dtype=acts.dtype, device=acts.device)
        live = acts.flatten(2).ne(0).any(dim=2)
        # Python ints once: indexing with a 0-d CUDA tensor waits for the GPU every chunk.
        classes = [int(c) for c in context.classes.tolist()]
        positions = torch.arange(max(1, batch_size), device=acts.device)  # made once, on the device
        weight = self.pass_cost(context.probe.has_tail(context.layer))  # as the estimate counts
        for b in range(acts.shape[0]):
            indices = live[b].nonzero().flatten()
            for start, stop in chunked(indices.numel(), batch_size, key="ablated",
                                       weight=weight):
                chunk = indices[start:stop]
                ablated = acts[b].expand(chunk.numel(), *acts.shape[1:]).clone()
                ablated[positions[:chunk.numel()], chunk] = 0
                rows = torch.full((chunk.numel(),), b, dtype=torch.long, device=acts.device)
                logits = context.probe.from_layer(context.layer, ablated, rows)
                # float32 whatever the forward ran in (CAMSERVE_PRECISION): an index_put does
                # not promote, and a bf16 minus a 0-d float32 stays bf16.
                dropped = logits[:, classes[b]]
                weights[b, chunk] = (original[b] - dropped.to(weights.dtype)) / safe[b]
        return weights
