"""Pointing game and energy inside the box, by hand."""

from __future__ import annotations

import torch

from service.quality.localization import energy_in_box, pointing_game, scale_box


def test_pointing_game_hits_when_the_peak_is_in_the_box() -> None:
    saliency = torch.zeros(10, 20)
    saliency[4, 12] = 1.0  # y=4, x=12
    assert pointing_game(saliency, (10, 2, 15, 6))
    assert not pointing_game(saliency, (0, 0, 12, 10))  # x1 is exclusive
    assert pointing_game(saliency, (0, 0, 12, 10), tolerance=1)
    assert not pointing_game(saliency, (13, 0, 20, 10))


def test_energy_is_the_share_of_mass_inside() -> None:
    saliency = torch.zeros(4, 4)
    saliency[0, 0], saliency[3, 3] = 3.0, 1.0
    assert energy_in_box(saliency, (0, 0, 2, 2)) == 0.75
    assert energy_in_box(saliency, (0, 0, 4, 4)) == 1.0
    assert energy_in_box(torch.zeros(4, 4), (0, 0, 2, 2)) == 0.0


def test_boxes_are_scaled_to_the_map_grid() -> None:
    assert scale_box((100, 50, 300, 150), (200, 400), (100, 100)) == (25, 25, 75, 75)
    assert scale_box((0, 0, 1, 1), (200, 400), (7, 7)) == (0, 0, 1, 1)  # never empty
