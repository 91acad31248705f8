"""Vanilla gradient, Guided Backprop and Guided Grad-CAM: by hand on a tiny network, and on
the cat photo through /explain."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn

from service.cams import get_method, normalize
from service.cams.extractor import explain_batch
from service.cams.probe import Probe
from service.cams.saliency import guided_rectifiers  # importing it registers the three methods
from service.models.runner import Runner

SIZE = 4
CLASS0 = [[0]]


class TwoPaths(nn.Module):
    """1x1 conv to two channels, ReLU, average pooling, and class 0 = channel 0 - channel 1.

    Channel 0 (weights 1, 2, 3) fires on the left half of the test image (+1), channel 1
    (weights -4, -4, -4) on the right half (-1). The vanilla gradient of class 0 at a pixel is
    (1, 2, 3) / 16 on the left and (4, 4, 4) / 16 on the right; Guided Backprop stops the
    negative gradient of channel 1 at the ReLU, so it is (1, 2, 3) / 16 on the left, 0 on the right.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [-4.0, -4.0, -4.0]]).view(2, 3, 1, 1))
            self.fc.weight.copy_(torch.tensor([[1.0, -1.0], [0.0, 0.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def two_paths() -> nn.Module:
    return TwoPaths().eval().requires_grad_(False)


def halves() -> torch.Tensor:
    x = torch.ones(1, 3, SIZE, SIZE)
    x[..., SIZE // 2:] = -1.0
    return x


def run(model: nn.Module, inputs: torch.Tensor, name: str, layer: str, targets: list) -> torch.Tensor:
    output = explain_batch(Runner(model), inputs, [layer], [get_method(name)], targets)
    return torch.stack([sample[0].grid for sample in output.maps])


def test_vanilla_gradient_by_hand(two_paths: nn.Module) -> None:
    found = run(two_paths, halves(), "saliency", "conv", CLASS0)[0]
    # Raw map 3/16 on the left, 4/16 on the right: normalised, 0 and 1.
    expected = torch.zeros(SIZE, SIZE)
    expected[:, SIZE // 2:] = 1.0
    torch.testing.assert_close(found, expected)


def test_guided_backprop_stops_negative_gradients_at_the_relu(two_paths: nn.Module) -> None:
    found = run(two_paths, halves(), "guided_backprop", "conv", CLASS0)[0]
    expected = torch.zeros(SIZE, SIZE)
    expected[:, :SIZE // 2] = 1.0  # only the path with a positive weight is seen
    torch.testing.assert_close(found, expected)
    assert_clean(two_paths)


def test_guided_gradcam_is_guided_backprop_where_gradcam_points(two_paths: nn.Module) -> None:
    # Random signs: channel 0 fires where a pixel's weighted sum is positive, channel 1 elsewhere.
    inputs = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    targets = [[0], [0]]
    product = run(two_paths, inputs, "guided_gradcam", "relu", targets)
    guided = run(two_paths, inputs, "guided_backprop", "relu", targets)
    cam = run(two_paths, inputs, "gradcam", "relu", targets)  # at the conv's grid = the input's
    for b in range(2):
        raw_guided = guided[b]  # min-max normalised: its minimum here is 0, so = guided / peak
        assert raw_guided.min() == 0
        torch.testing.assert_close(product[b], normalize((raw_guided * cam[b])[None])[0], atol=1e-6, rtol=0)
    # Where Grad-CAM is zero, so is Guided Grad-CAM.
    assert (product[1][cam[1] == 0] == 0).all()


def test_a_model_without_relus_is_refused_for_guided_backprop() -> None:
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="ReLU"):
        run(model, halves(), "guided_backprop", "0", CLASS0)
    assert_clean(model)


def test_batched_equals_single(two_paths: nn.Module) -> None:
    inputs = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    for name in ("saliency", "guided_backprop", "guided_gradcam"):
        batched = run(two_paths, inputs, name, "relu", [[0], [1], [0]])
        for b in range(3):
            single = run(two_paths, inputs[b:b + 1], name, "relu", [[[0], [1], [0]][b]])
            torch.testing.assert_close(single[0], batched[b], atol=1e-6, rtol=0)
    assert_clean(two_paths)


def test_hooks_are_removed_even_after_an_error(two_paths: nn.Module) -> None:
    probe = Probe(Runner(two_paths), halves())
    hooks = guided_rectifiers(probe.rectifiers())
    assert [module for module, _ in hooks] == [two_paths.relu]
    with pytest.raises(RuntimeError, match="boom"), probe.hooks(hooks):
        assert len(two_paths.relu._forward_hooks) == 1
        raise RuntimeError("boom")
    assert_clean(two_paths)


def assert_clean(model: nn.Module) -> None:
    for module in model.modules():
        assert not module._forward_hooks and not module._backward_hooks
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


CAT_FACE_224 = (55, 15, 190, 220)  # x0, y0, x1, y1 of the face box of test_explain at 224x224


def test_the_three_maps_of_the_cat_are_at_input_resolution(client: TestClient, cat_png: bytes) -> None:
    form = {"methods": "saliency,guided_backprop,guided_gradcam", "outputs": "mask",
            "mask_size": "feature", "class_idx": "285"}
    response = client.post("/explain", files={"file": ("cat.png", cat_png, "image/png")}, data=form)
    assert response.status_code == 200, response.text
    explanations = response.json()["results"][0]["explanations"]
    assert [e["method"] for e in explanations] == ["saliency", "guided_backprop", "guided_gradcam"]
    x0, y0, x1, y1 = CAT_FACE_224
    for e in explanations:
        mask = np.array(e["mask"]["data"], dtype=np.float32)
        assert mask.shape == (224, 224)  # one value per input pixel, even on "feature"
        assert mask.min() == 0.0 and mask.max() == pytest.approx(1.0)
        inside = mask[y0:y1, x0:x1].sum() / mask.sum()
        assert inside > 0.5, (e["method"], inside)  # the box is 54% of the image
    vanilla, guided, product = (np.array(e["mask"]["data"]) for e in explanations)
    assert not np.allclose(vanilla, guided) and not np.allclose(guided, product)
