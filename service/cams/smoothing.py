"""Test-time-augmentation smoothing (``aug_smooth``): maps averaged over flips and rescalings.

As OpenMMLab's CAM tools and pytorch-grad-cam describe it: the input is flipped horizontally or
not, times scales 1.0, 1.1 and 0.9 (six variants). Each variant is explained for the classes
chosen on the original image; its maps are brought back to the original geometry (resized to
the original map's grid, unflipped), and the six normalised maps are averaged and normalised.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from service.cams.base import CAMMethod, normalize
from service.cams.extractor import BatchOutput, SampleMap, explain_once
from service.cams.passes import boundary

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


def augmented(
    model: nn.Module,
    modules: dict[str, nn.Module],
    inputs: Tensor,
    layers: Sequence[str],
    methods: Sequence[CAMMethod],
    targets: Sequence[Sequence[int] | None],
    *,
    eigen_smooth: bool = False,
) -> BatchOutput:
    """:func:`explain_once` averaged over :data:`AUGMENTATIONS`; logits of the original image."""
    base = explain_once(model, modules, inputs, layers, methods, targets, eigen_smooth=eigen_smooth)
    # The classes the original image chose (its top-1 where none was named) hold for every variant.
    chosen = [list(dict.fromkeys(m.class_idx for m in sample)) for sample in base.maps]
    sums = [[m.grid.clone() for m in sample] for sample in base.maps]
    for flip, scale in AUGMENTATIONS[1:]:
        boundary()  # each variant is a pass of its own, and a point where others may run
        variant = explain_once(
            model, modules, augment(inputs, flip, scale), layers, methods, chosen,
            eigen_smooth=eigen_smooth,
        )
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
