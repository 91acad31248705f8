"""Score-CAM and its smoothed variants: channels weighted by the score of the masked input.

Each channel ``A_k`` becomes a mask ``up(norm(A_k))`` (normalised to [0, 1] on the layer's grid,
then upsampled bilinearly to the input, as TorchCAM does); the masked input's class score
``Y_c(X * mask)`` is the channel's evidence, and ``w = softmax_k(Y_c(M_k) - Y_c(X))``.

Cost is one forward pass per channel (per noise draw or step), batched ``batch_size`` at a time,
through the model owner's lean copy (batch norm folded, channels-last;
:meth:`service.models.runner.Runner.lean_forward`), or the folded channels-last copy the owner
makes for them when its lean copy is not one (:mod:`service.models.loader`). Two savings keep
the map exact:

- a channel that is zero everywhere contributes ``w_k * 0`` to the map; its score only enters
  the softmax's denominator, a positive factor common to all channels that min-max
  normalisation removes, so it is never run;
- the baseline ``Y_c(X)`` is a constant per sample under the softmax; it is subtracted only to
  keep the exponent small.

``top_k_channels`` runs only the k channels with the highest mean activation and weights only
those (the others get weight 0): an approximation whose agreement with the exact map is
measured in ``tests/cams`` and printed by ``python -m service.bench``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from service.cams.base import CAMMethod, LayerContext, MethodParam
from service.cams.passes import chunked


def channel_masks(activations: Tensor, eps: float = 1e-8) -> Tensor:
    """Each channel min-max normalised over its grid: (B, K, h, w) -> [0, 1]."""
    low = activations.amin(dim=(2, 3), keepdim=True)
    shifted = activations - low
    return shifted / (shifted.amax(dim=(2, 3), keepdim=True) + eps)


class ScoreCAM(CAMMethod):
    """Score-CAM: channels weighted by the softmax of their masked inputs' scores.

    Wang et al., "Score-CAM: Score-Weighted Visual Explanations for Convolutional Neural
    Networks", CVPR workshops 2020, arXiv 1910.01279.

    ``M_k = X * up(norm(A_k))``; ``w = softmax_k(Y_c(M_k) - Y_c(X))``;
    map ``= ReLU(sum_k w_k A_k)``.
    """

    name = "scorecam"
    full_precision = True
    title = "Score-CAM"
    family = "perturbation"
    paper = "Wang et al. 2020, arXiv 1910.01279"
    uses_gradients = False
    passes = "1 forward (shared) + 1 forward per non-zero channel (batched)"
    params: ClassVar[tuple[MethodParam, ...]] = (
        MethodParam("batch_size", "int", 32, "masked inputs per forward pass (1..512)", 1, 512),
        MethodParam("top_k_channels", "int", 0,
                    "only the k channels of highest mean activation; 0 means all (0..100000)",
                    0, 100_000),
    )

    def draws(self) -> int:
        """How many masked passes each channel gets (noise samples, integration steps)."""
        return 1

    def extra_passes(self, channels: int, grid: tuple[int, int] | None = None) -> float:
        top_k = int(self.options["top_k_channels"])
        return float(min(top_k, channels) if top_k else channels) * self.draws()

    def vary(self, masks: Tensor, draw: int, generator: torch.Generator) -> Tensor:
        """The ``draw``-th variant of a chunk of masks (n, 1, H, W)."""
        return masks

    def channels(self, activations: Tensor) -> list[Tensor]:
        """Per sample, the channels that get masked passes, in ascending order."""
        live = activations.flatten(2).ne(0).any(dim=2)  # (B, K)
        top_k = int(self.options["top_k_channels"])
        chosen = []
        for row, alive in zip(activations, live, strict=True):
            indices = alive.nonzero().flatten()
            if top_k and indices.numel() > top_k:
                strength = row[indices].mean(dim=(1, 2))
                indices = indices[strength.topk(top_k).indices].sort().values
            chosen.append(indices)
        return chosen

    def weights(self, context: LayerContext) -> Tensor:
        acts = context.activations
        masks = channel_masks(acts)
        size = context.inputs.shape[-2:]
        batch_size = int(self.options["batch_size"])
        baseline = context.logits.gather(1, context.classes[:, None])[:, 0]
        # Channels never run keep -inf: softmax gives them weight 0.
        scores = torch.full(acts.shape[:2], float("-inf"), dtype=acts.dtype, device=acts.device)
        # Python ints once: indexing with a 0-d CUDA tensor would wait for the GPU every chunk.
        classes = [int(c) for c in context.classes.tolist()]
        for b, indices in enumerate(self.channels(acts)):
            if indices.numel() == 0:
                continue
            total = torch.zeros(indices.numel(), dtype=acts.dtype, device=acts.device)
            for draw in range(self.draws()):
                # One generator per sample and draw: a map never depends on its batch neighbours.
                # On the inputs' device, so a GPU's noise is drawn there (CPU: as before).
                generator = torch.Generator(device=acts.device)
                generator.manual_seed(int(self.options.get("seed", 0)) + draw)
                for start, stop in chunked(indices.numel(), batch_size, key="masked"):
                    chunk = indices[start:stop]
                    up = F.interpolate(masks[b, chunk][:, None], size=size, mode="bilinear",
                                       align_corners=False)
                    masked = self.vary(up, draw, generator) * context.inputs[b]
                    logits = context.probe.lean_logits(masked)
                    total[start:stop] += logits[:, classes[b]].to(acts.dtype) - baseline[b]
            scores[b, indices] = total / self.draws()
        return torch.softmax(scores, dim=1).nan_to_num(0.0)


class SSCAM(ScoreCAM):
    """SS-CAM: Score-CAM with each mask's score averaged over noisy copies of the mask.

    Wang et al., "SS-CAM: Smoothed Score-CAM for Sharper Visual Feature Localization",
    arXiv 2006.14255.

    ``w = softmax_k(mean_n Y_c(X * (up(norm(A_k)) + eps_n)) - Y_c(X))``,
    ``eps_n ~ N(0, std^2)``, n = 1..N (TorchCAM's N 35, std 2.0).
    """

    name = "sscam"
    title = "SS-CAM"
    paper = "Wang et al. 2020, arXiv 2006.14255"
    passes = "1 forward (shared) + N forwards per non-zero channel (batched)"
    params = (
        *ScoreCAM.params,
        MethodParam("num_samples", "int", 35, "noisy copies of each mask (1..100)", 1, 100),
        MethodParam("std", "float", 2.0, "noise standard deviation on the [0, 1] mask (0..10)", 0.0, 10.0),
        MethodParam("seed", "int", 0, "seed of the noise (0..2^31-1)", 0, 2**31 - 1),
    )

    def draws(self) -> int:
        return int(self.options["num_samples"])

    def vary(self, masks: Tensor, draw: int, generator: torch.Generator) -> Tensor:
        # Drawn where the masks are, with the generator of that device: on a GPU, no CPU-side
        # normals and no copy per chunk (its numbers differ from the CPU's for the same seed).
        noise = torch.randn(masks.shape, generator=generator, device=masks.device, dtype=torch.float32)
        return masks + float(self.options["std"]) * noise.to(masks.dtype)


class ISCAM(ScoreCAM):
    """IS-CAM: Score-CAM with each mask's score integrated along a path from zero.

    Naidu et al., "IS-CAM: Integrated Score-CAM for axiomatic-based explanations",
    arXiv 2010.03023.

    ``w = softmax_k(mean_{i=1..N} Y_c(X * (i/N) up(norm(A_k))) - Y_c(X))`` (TorchCAM's N 10).
    """

    name = "iscam"
    title = "IS-CAM"
    paper = "Naidu et al. 2020, arXiv 2010.03023"
    passes = "1 forward (shared) + N forwards per non-zero channel (batched)"
    params = (
        *ScoreCAM.params,
        MethodParam("num_samples", "int", 10, "integration steps (1..100)", 1, 100),
    )

    def draws(self) -> int:
        return int(self.options["num_samples"])

    def vary(self, masks: Tensor, draw: int, generator: torch.Generator) -> Tensor:
        return masks * ((draw + 1) / self.draws())
