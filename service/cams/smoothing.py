"""Test-time-augmentation smoothing (``aug_smooth``): maps averaged over flips and rescalings.

As OpenMMLab's CAM tools and pytorch-grad-cam describe it: the input is flipped horizontally or
not, times scales 1.0, 1.1 and 0.9 (six variants). Each variant is explained for the classes
chosen on the original image; its maps are brought back to the original geometry (resized to
the original map's grid, unflipped), and the six normalised maps are averaged and normalised.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.nn.functional as F
from torch import Tensor

from service.cams.base import normalize
from service.cams.maps import BatchOutput, SampleMap
from service.cams.passes import boundary

# Explains a batch of inputs for the given targets (None: the top-1 class) in one shared pass.
Explain = Callable[[Tensor, Sequence[Sequence[int] | None]], BatchOutput]

AUGMENTATIONS: tuple[tuple[bool, float], ...] = tuple(
    (flip, scale) for flip in (False, True) for scale in (1.0, 1.1, 0.9)
)


def augment(inputs: Tensor, flip: bool, scale: float) -> Tensor:
    if scale != 1.0:
        height, width = inputs.shape[-2:]
        size = (round(height * scale), round(width * scale))
        inputs = F.interpolate(inputs, size=size, mode="bilinear", align_corners=False)
    return inputs.flip(-1) if flip else inputs


def restore(grid: Tensor, flip: bool, size: tuple[int, int]) -> Tensor:
    """A variant's map in the original geometry: unflipped and resized to ``size``."""
    if flip:
        grid = grid.flip(-1)
    if tuple(grid.shape) != size:
        grid = F.interpolate(grid[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    return grid


def augmented(explain: Explain, inputs: Tensor, targets: Sequence[Sequence[int] | None]) -> BatchOutput:
    """``explain`` (:func:`service.cams.extractor.explain_once` on the request's layers and
    methods) averaged over :data:`AUGMENTATIONS`; the logits are the original image's."""
    base = explain(inputs, targets)
    # The classes the original image chose (its top-1 where none was named) hold for every variant.
    chosen = [list(dict.fromkeys(m.class_idx for m in sample)) for sample in base.maps]
    sums = [[m.grid.clone() for m in sample] for sample in base.maps]
    for flip, scale in AUGMENTATIONS[1:]:
        boundary()  # each variant is a pass of its own, and a point where others may run
        variant = explain(augment(inputs, flip, scale), chosen)
        for b, sample in enumerate(variant.maps):
            for i, found in enumerate(sample):
                size = (sums[b][i].shape[0], sums[b][i].shape[1])
                sums[b][i] += restore(found.grid, flip, size)
    maps = [
        [
            SampleMap(m.method, m.class_idx, normalize((total / len(AUGMENTATIONS))[None])[0])
            for m, total in zip(sample, totals, strict=True)
        ]
        for sample, totals in zip(base.maps, sums, strict=True)
    ]
    return BatchOutput(logits=base.logits, maps=maps)
