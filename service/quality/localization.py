"""Localisation scores of a map against an annotated bounding box.

Boxes are ``(x0, y0, x1, y1)`` in pixels of the map's own grid, ``x1`` and ``y1`` exclusive.

- Pointing game (Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016,
  arXiv 1608.00507): a hit when the map's maximum lies in the box, grown by ``tolerance`` pixels
  (the paper's 15 at the original image size); the score of a set is its share of hits.
- Energy inside the box (Wang et al., "Score-CAM", CVPR-W 2020, arXiv 1910.01279, "energy-based
  pointing game"): the share of the map's total mass that falls in the box, in [0, 1].
"""

from __future__ import annotations

from torch import Tensor

Box = tuple[int, int, int, int]


def pointing_game(saliency: Tensor, box: Box, tolerance: int = 0) -> bool:
    """Whether the maximum of ``saliency`` (H, W) lies within ``box`` grown by ``tolerance``."""
    width = saliency.shape[1]
    index = int(saliency.flatten().argmax())
    y, x = divmod(index, width)
    x0, y0, x1, y1 = box
    return x0 - tolerance <= x < x1 + tolerance and y0 - tolerance <= y < y1 + tolerance


def energy_in_box(saliency: Tensor, box: Box) -> float:
    """Share of the map's total (non-negative) mass that lies inside ``box``; 0 for an empty map."""
    values = saliency.clamp_min(0.0)
    total = float(values.sum())
    if total <= 0.0:
        return 0.0
    x0, y0, x1, y1 = box
    return float(values[max(y0, 0):y1, max(x0, 0):x1].sum()) / total


def scale_box(box: Box, size: tuple[int, int], to: tuple[int, int]) -> Box:
    """A box given on an image of ``size`` (height, width) mapped onto a grid of ``to``."""
    (height, width), (to_h, to_w) = size, to
    x0, y0, x1, y1 = box
    return (
        int(x0 * to_w / width), int(y0 * to_h / height),
        max(int(x0 * to_w / width) + 1, round(x1 * to_w / width)),
        max(int(y0 * to_h / height) + 1, round(y1 * to_h / height)),
    )
