"""Faithfulness on the real pretrained mobilenet_v2 and the cat photo."""

from __future__ import annotations

import torch

from service.cams import get_method
from service.cams.extractor import explain_batch
from service.models.loader import LoadedModel
from service.quality.faithfulness import faithfulness

EGYPTIAN_CAT = 285
STEPS = 6  # 2 maps x (2 * 6 + 1) + 1 forward passes: enough to order them


def gradcam(loaded: LoadedModel, inputs: torch.Tensor) -> torch.Tensor:
    output = explain_batch(
        loaded.runner(), inputs, [loaded.default_layer], [get_method("gradcam")],
        [[EGYPTIAN_CAT]],
    )
    return output.maps[0][0].grid[None]


def test_gradcam_is_more_faithful_than_a_random_map(mobilenet: LoadedModel, cat_input: torch.Tensor) -> None:
    cam = gradcam(mobilenet, cat_input)
    # A random map on the same 7x7 grid, upsampled the same way: the floor a real map must beat.
    noise = torch.rand(1, *cam.shape[-2:], generator=torch.Generator().manual_seed(0))
    inputs = cat_input.expand(2, -1, -1, -1)
    maps = torch.cat([cam, noise])
    classes = torch.tensor([EGYPTIAN_CAT, EGYPTIAN_CAT])
    scores = faithfulness(mobilenet.module, inputs, maps, classes, steps=STEPS)
    deletion, insertion = scores.deletion_auc.tolist(), scores.insertion_auc.tolist()
    # Grad-CAM: revealing its pixels first brings the cat back much sooner than deleting them.
    assert insertion[0] > deletion[0] + 0.2, (insertion, deletion)
    assert insertion[0] - deletion[0] > insertion[1] - deletion[1], (insertion, deletion)
    assert deletion[0] < deletion[1]
    # The cat photo is confidently a cat, and showing it through the Grad-CAM map keeps that.
    assert scores.deletion_curve[0, 0] > 0.5
    assert 0.0 <= scores.average_drop[0] < 0.1
