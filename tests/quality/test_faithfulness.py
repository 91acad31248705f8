"""Faithfulness scores on a tiny model whose answers can be worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from service.quality import faithfulness as fa

SIZE = 8  # 8x8 images; the model looks at the top-left 4x4 quarter
LOG3 = math.log(3.0)  # a logit of ln 3 against 0 gives probability 0.75


class RegionModel(nn.Module):
    """Two logits: ``scale * (mean of the top-left quarter - outside * mean of the rest)`` and 0.

    Counts the images it sees, so tests can check how many forward passes a score costs.
    """

    def __init__(self, scale: float = LOG3, outside: float = 0.0) -> None:
        super().__init__()
        self.scale, self.outside = scale, outside
        self.images = 0
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.images += x.shape[0]
        self.calls += 1
        inside = torch.zeros(SIZE, SIZE, dtype=torch.bool)
        inside[:4, :4] = True
        plane = x[:, 0]
        score = plane[:, inside].mean(dim=1) - self.outside * plane[:, ~inside].mean(dim=1)
        return torch.stack([self.scale * score, torch.zeros_like(score)], dim=1)


def region_map() -> Tensor:
    m = torch.zeros(1, SIZE, SIZE)
    m[0, :4, :4] = 1.0
    return m


def ones(batch: int = 1) -> Tensor:
    return torch.ones(batch, 3, SIZE, SIZE)


CLASS0 = torch.tensor([0])


def test_curves_and_areas_match_the_hand_computation() -> None:
    # Steps of 16 pixels: the region map deletes the whole region at the first step, so the
    # probability falls from 0.75 to 0.5 at once; insertion rises from 0.5 to 0.75 at once.
    scores = fa.faithfulness(RegionModel(), ones(), region_map(), CLASS0, steps=4)
    torch.testing.assert_close(scores.deletion_curve, torch.tensor([[0.75, 0.5, 0.5, 0.5, 0.5]]))
    torch.testing.assert_close(scores.insertion_curve, torch.tensor([[0.5, 0.75, 0.75, 0.75, 0.75]]))
    torch.testing.assert_close(scores.deletion_auc, torch.tensor([(0.5 * 0.75 + 1.75) / 4]))
    torch.testing.assert_close(scores.insertion_auc, torch.tensor([(0.25 + 3.5 * 0.75) / 4]))
    # The region is kept whole by M * X: no drop, no increase.
    torch.testing.assert_close(scores.average_drop, torch.tensor([0.0]))
    assert scores.increase_in_confidence.tolist() == [False]


def test_a_map_on_the_region_beats_its_reverse() -> None:
    model = RegionModel()
    good, reverse = region_map(), 1.0 - region_map()
    good_scores = fa.faithfulness(model, ones(), good, CLASS0, steps=4)
    reverse_scores = fa.faithfulness(model, ones(), reverse, CLASS0, steps=4)
    assert good_scores.deletion_auc < good_scores.insertion_auc
    assert reverse_scores.deletion_auc > reverse_scores.insertion_auc
    # The reverse map keeps the region until the last step: the mirror image of the good one.
    torch.testing.assert_close(reverse_scores.deletion_auc, good_scores.insertion_auc)
    torch.testing.assert_close(reverse_scores.insertion_auc, good_scores.deletion_auc)
    # M * X with the reverse map blanks the region: the probability falls to 0.5.
    torch.testing.assert_close(reverse_scores.average_drop, torch.tensor([(0.75 - 0.5) / 0.75]))


def test_average_drop_of_a_half_map() -> None:
    half = torch.full((1, SIZE, SIZE), 0.5)
    drop = fa.average_drop(RegionModel(), ones(), half, CLASS0)
    expected = (0.75 - 1 / (1 + math.exp(-0.5 * LOG3))) / 0.75
    torch.testing.assert_close(drop, torch.tensor([expected]))


def test_increase_in_confidence_when_the_map_hides_distractors() -> None:
    # The model is pulled down by the pixels outside the region; hiding them raises confidence.
    model = RegionModel(outside=1.0)
    assert fa.increase_in_confidence(model, ones(), region_map(), CLASS0).tolist() == [True]
    assert fa.average_drop(model, ones(), region_map(), CLASS0).tolist() == [0.0]
    assert fa.increase_in_confidence(model, ones(), 1.0 - region_map(), CLASS0).tolist() == [False]


def test_the_class_chosen_is_the_one_scored() -> None:
    # For class 1 (the constant logit) the region is evidence against: the order flips.
    scores = fa.faithfulness(RegionModel(), ones(), region_map(), torch.tensor([1]), steps=4)
    assert scores.deletion_auc > scores.insertion_auc


def test_a_baseline_tensor_is_used_for_removed_pixels() -> None:
    # With the baseline equal to the image, deleting changes nothing: a flat curve at 0.75.
    curve = fa.deletion_curve(RegionModel(), ones(), region_map(), CLASS0, steps=4, baseline=ones())
    torch.testing.assert_close(curve, torch.full((1, 5), 0.75))


def test_coarse_maps_are_resized_to_the_input() -> None:
    coarse = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    scores = fa.faithfulness(RegionModel(), ones(), coarse, CLASS0, steps=4)
    assert scores.deletion_auc < scores.insertion_auc


def test_samples_are_batched_together_and_chunked_without_changing_results() -> None:
    inputs = torch.cat([ones(), 0.5 * ones()])
    maps = torch.cat([region_map(), 1.0 - region_map()])
    classes = torch.tensor([0, 0])
    steps = 4
    model = RegionModel()
    together = fa.faithfulness(model, inputs, maps, classes, steps=steps, chunk_size=64)
    # One clean pass, the 2 * steps perturbed copies of both samples, one pass of M * X.
    assert model.images == 2 * (2 * steps + 2)
    assert model.calls == 3
    small = RegionModel()
    chunked = fa.faithfulness(small, inputs, maps, classes, steps=steps, chunk_size=3)
    assert small.images == model.images and small.calls > model.calls
    for b in range(2):
        alone = fa.faithfulness(RegionModel(), inputs[b:b + 1], maps[b:b + 1], classes[b:b + 1], steps=steps)
        torch.testing.assert_close(together.deletion_auc[b:b + 1], alone.deletion_auc)
        torch.testing.assert_close(together.insertion_auc[b:b + 1], alone.insertion_auc)
    torch.testing.assert_close(together.deletion_curve, chunked.deletion_curve)
    torch.testing.assert_close(together.insertion_curve, chunked.insertion_curve)


def test_single_scores_agree_with_the_combined_call() -> None:
    model = RegionModel(outside=0.5)
    maps = torch.rand(1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    inputs = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    both = fa.faithfulness(model, inputs, maps, CLASS0, steps=8)
    torch.testing.assert_close(fa.deletion_auc(model, inputs, maps, CLASS0, steps=8), both.deletion_auc)
    torch.testing.assert_close(fa.insertion_auc(model, inputs, maps, CLASS0, steps=8), both.insertion_auc)
    torch.testing.assert_close(fa.average_drop(model, inputs, maps, CLASS0), both.average_drop)


def test_auc_of_a_constant_and_a_ramp() -> None:
    torch.testing.assert_close(fa.auc(torch.full((1, 9), 0.3)), torch.tensor([0.3]))
    torch.testing.assert_close(fa.auc(torch.linspace(0, 1, 11)[None]), torch.tensor([0.5]))


@pytest.mark.parametrize("steps", [0, -1])
def test_bad_arguments_are_refused(steps: int) -> None:
    with pytest.raises(ValueError, match="steps"):
        fa.faithfulness(RegionModel(), ones(), region_map(), CLASS0, steps=steps)
    with pytest.raises(ValueError, match="one entry per sample"):
        fa.faithfulness(RegionModel(), ones(2), region_map(), CLASS0)
