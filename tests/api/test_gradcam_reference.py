"""Grad-CAM from the service equals a hand computation with plain hooks and autograd."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from service.config import Settings
from service.main import create_app
from tests.conftest import ready_client
from tests.custom_model import INPUT_SIZE, build, png, write_models_file


@pytest.fixture(scope="module")
def tiny_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    models_file = write_models_file(tmp_path_factory.mktemp("tiny"))
    yield from ready_client(create_app(Settings(models_file=models_file)))


def hand_gradcam(image: bytes, layer: str, class_idx: int) -> np.ndarray:
    """Textbook Grad-CAM: hook the layer, backpropagate the class logit, weight by mean gradient."""
    model = build()
    height, width = INPUT_SIZE
    rgb = Image.open(io.BytesIO(image)).convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    x = (x - 0.5) / 0.25
    captured: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        logits = model(x)
    finally:
        handle.remove()
    activations = captured[-1]
    (gradients,) = torch.autograd.grad(logits[0, class_idx], activations)
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activations).sum(dim=1))[0].detach()
    cam = (cam - cam.min()) / (cam.max() - cam.min())
    return cam.numpy()


@pytest.mark.parametrize("layer, class_idx", [("layer4.1", 0), ("layer4.1", 2), ("layer3", 1)])
def test_gradcam_matches_hand_computation(tiny_client: TestClient, layer: str, class_idx: int) -> None:
    image = png(150, 110, seed=class_idx)
    response = tiny_client.post(
        "/explain",
        files={"file": ("x.png", image, "image/png")},
        data={"model": "tiny_resnet", "target_layer": layer, "class_idx": str(class_idx),
              "mask_size": "feature", "mask_encoding": "base64", "outputs": "mask"},
    )
    assert response.status_code == 200, response.text
    mask = response.json()["results"][0]["explanations"][0]["mask"]
    served = np.frombuffer(base64.b64decode(mask["data"]), dtype="<f4").reshape(mask["shape"])
    expected = hand_gradcam(image, layer, class_idx)
    assert served.shape == expected.shape
    np.testing.assert_allclose(served, expected, atol=1e-5)


def test_explaining_leaves_no_hook_and_no_gradient(tiny_client: TestClient, tmp_path: Path) -> None:
    engine = tiny_client.app.state.engine  # type: ignore[attr-defined]
    for _ in range(3):
        tiny_client.post("/explain", files={"file": ("x.png", png(60, 60), "image/png")},
                         data={"model": "tiny_resnet", "target_layer": "layer3,layer4"})
    for worker in _workers(engine):
        module = worker.models["tiny_resnet"].module
        assert not module.training
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
        assert all(not m._forward_hooks and not m._backward_hooks for m in module.modules())


def _workers(engine: object) -> list:  # type: ignore[type-arg]
    # The engine keeps one worker per device; accept either attribute layout.
    workers = getattr(engine, "workers", None)
    if workers is None:
        workers = [engine._worker]
    return list(workers)
