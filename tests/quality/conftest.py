"""The real pretrained mobilenet_v2, loaded once for the quality tests, and its inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.imaging.preprocess import resize_for_model
from service.models.loader import LoadedModel, load_model
from service.models.spec import registered_specs

DATA = Path(__file__).resolve().parent.parent / "data"


@pytest.fixture(scope="session")
def mobilenet() -> LoadedModel:
    return load_model(registered_specs(None)["mobilenet_v2"], torch.device("cpu"))


def model_input(loaded: LoadedModel, image: Image.Image) -> torch.Tensor:
    """The normalised (1, 3, H, W) input the service would build for ``image``."""
    pixels = resize_for_model(image, loaded.spec.input_size).astype(np.float32) / 255.0
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None]
    mean = torch.tensor(loaded.spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(loaded.spec.std).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.fixture(scope="session")
def cat_input(mobilenet: LoadedModel) -> torch.Tensor:
    return model_input(mobilenet, Image.open(DATA / "chelsea.png"))
