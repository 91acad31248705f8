"""Fixtures for the CAM engine: the real mobilenet_v2 with two photos, and a tiny network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from service.models.loader import LoadedModel, load_model, own
from service.models.runner import Runner
from service.models.spec import IMAGENET_MEAN, IMAGENET_STD, embedded_default

DATA = Path(__file__).parent.parent / "data"
# Cheap settings for the expensive methods, for tests of plumbing and state rather than exactness.
CHEAP = {
    "scorecam": {"top_k_channels": 8},
    "sscam": {"top_k_channels": 4, "num_samples": 2},
    "iscam": {"top_k_channels": 4, "num_samples": 2},
    "smoothgradcampp": {"num_samples": 2},
}


class Tiny(nn.Module):
    """conv-relu-conv-relu, global average pooling, one linear layer: 5 classes on 16x16."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
            nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@pytest.fixture(scope="session")
def tiny() -> nn.Module:
    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():
        model.features[1].running_mean.uniform_(-0.5, 0.5)
        model.features[1].running_var.uniform_(0.5, 2.0)
        model.features[1].bias.uniform_(-0.2, 0.2)
    return model.eval().requires_grad_(False)


def runner_of(model: nn.Module) -> Runner:
    """The runner a worker would get for ``model``: from its owner, which reads the model's
    layers and capability map (CAM's linear head among them) as it does for a loaded model."""
    return own(model, (16, 16)).runner()


@pytest.fixture(scope="session")
def tiny_inputs() -> torch.Tensor:
    return torch.randn((3, 3, 16, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def mobilenet() -> LoadedModel:
    return load_model(embedded_default(), torch.device("cpu"))


def photo(name: str) -> torch.Tensor:
    image = Image.open(DATA / name).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (pixels - mean) / std


@pytest.fixture(scope="session")
def photos() -> torch.Tensor:
    """The cat and the coffee mug, normalised for mobilenet_v2: (2, 3, 224, 224)."""
    return torch.stack([photo("chelsea.png"), photo("coffee.png")])


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    stacked = torch.stack([torch.as_tensor(a).flatten().double(), torch.as_tensor(b).flatten().double()])
    return float(torch.corrcoef(stacked)[0, 1])
