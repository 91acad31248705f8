"""What explaining a batch returns: each sample's maps, with the logits of the shared pass."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class SampleMap:
    method: str
    class_idx: int
    grid: Tensor  # (h, w) in [0, 1], on the layer's (largest) grid; input grid if layer-free


@dataclass
class BatchOutput:
    logits: Tensor  # (B, num_classes), detached
    maps: list[list[SampleMap]]  # per sample, in (class, method) order
