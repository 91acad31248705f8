"""Candidate layers and the automatic default layer."""

from __future__ import annotations

import pytest
import torch
import torchvision

from service.models.layers import inspect_layers


@pytest.mark.parametrize("architecture, expected", [
    ("mobilenet_v2", "features.18"),
    ("resnet18", "layer4.1"),
    ("efficientnet_b0", "features.8"),
])
def test_default_layer_is_the_last_spatial_block(architecture: str, expected: str) -> None:
    model = torchvision.models.get_model(architecture, weights=None).eval()
    layers, default = inspect_layers(model, (224, 224), torch.device("cpu"))
    assert default == expected
    names = [layer.name for layer in layers]
    assert expected in names
    chosen = next(layer for layer in layers if layer.name == expected)
    assert chosen.shape[1:] == (7, 7)


def test_only_modules_with_4d_outputs_are_candidates() -> None:
    model = torchvision.models.resnet18(num_classes=3).eval()
    layers, _ = inspect_layers(model, (64, 64), torch.device("cpu"))
    names = {layer.name for layer in layers}
    assert {"conv1", "layer1.0.conv1", "layer4"} <= names
    assert "fc" not in names  # (N, classes)
    assert "avgpool" in names  # (N, C, 1, 1) is 4-D, though not spatial


def test_a_model_without_spatial_output_has_no_default() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    layers, default = inspect_layers(model, (8, 8), torch.device("cpu"))
    assert layers == [] and default is None
