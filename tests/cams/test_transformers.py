"""Transformers: vit_b_16 (class and patch tokens) and swin_t (channels last), untrained.

Random weights are enough for the mechanics: the token-to-grid reshape, the default layers,
agreement with pytorch-grad-cam's documented reshape_transform and TorchCAM's LeGrad, batches
against single images, and hooks that never outlive a call.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM as ReferenceGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn
from torchcam.methods import LeGrad as ReferenceLeGrad

from service.cams import CAMMethod, get_method
from service.cams.base import LayerContext
from service.cams.extractor import explain_batch
from service.config import Settings
from service.main import create_app
from service.models.layout import to_grid, to_native
from service.models.loader import LoadedModel, load_model
from service.models.spec import ModelSpec
from tests.cams.conftest import pearson
from tests.conftest import ready_client
from tests.custom_model import png

VIT_LAYER = "encoder.layers.encoder_layer_11.ln_1"
CLASSES = [[3], [7]]


@pytest.fixture(scope="module")
def vit() -> LoadedModel:
    return load_model(ModelSpec(name="vit", architecture="vit_b_16", weights="random", seed=0),
                      torch.device("cpu"))


@pytest.fixture(scope="module")
def swin() -> LoadedModel:
    return load_model(ModelSpec(name="swin", architecture="swin_t", weights="random", seed=0),
                      torch.device("cpu"))


@pytest.fixture(scope="module")
def images() -> Tensor:
    return torch.randn((2, 3, 224, 224), generator=torch.Generator().manual_seed(3))


def hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


def grids(loaded: LoadedModel, inputs: Tensor, methods: list[str], layer: str | None = None,
          classes: list[list[int]] | None = None) -> dict[str, Tensor]:
    """Each method's maps over the batch, (B, h, w)."""
    out = explain_batch(loaded.runner(), inputs, [layer or loaded.default_layer],
                        [get_method(name) for name in methods], classes or [None] * len(inputs))
    return {
        name: torch.stack([sample[i].grid for sample in out.maps]) for i, name in enumerate(methods)
    }


def test_layouts_and_default_layers(vit: LoadedModel, swin: LoadedModel) -> None:
    assert vit.default_layer == VIT_LAYER
    assert swin.default_layer == "norm"
    vit_layers = {layer.name: layer for layer in vit.layers}
    assert (vit_layers[VIT_LAYER].shape, vit_layers[VIT_LAYER].layout) == ((768, 14, 14), "tokens")
    assert vit_layers["encoder.layers.encoder_layer_11.mlp"].shape == (768, 14, 14)
    assert (vit_layers["conv_proj"].shape, vit_layers["conv_proj"].layout) == ((768, 14, 14), "nchw")
    swin_layers = {layer.name: layer for layer in swin.layers}
    assert (swin_layers["norm"].shape, swin_layers["norm"].layout) == ((768, 7, 7), "nhwc")
    assert (swin_layers["features.7"].shape, swin_layers["features.7"].layout) == ((768, 7, 7), "nhwc")
    assert (swin_layers["permute"].shape, swin_layers["permute"].layout) == ((768, 7, 7), "nchw")
    # CAM's pooled linear head is looked for only on (N, C, H, W) default layers.
    assert vit.info().linear_head is None and "tokens" in vit.info().linear_head_problem
    assert (vit.info().attention_blocks, swin.info().attention_blocks) == (12, 0)


def test_token_and_channels_last_reshapes_invert() -> None:
    tokens = torch.randn(2, 1 + 6 * 4, 5)
    grid = to_grid(tokens, "tokens", (96, 64))
    assert grid.shape == (2, 5, 6, 4)
    assert torch.equal(grid[1, :, 2, 3], tokens[1, 1 + 2 * 4 + 3])
    assert torch.equal(to_native(grid, "tokens", tokens[:, :1]), tokens)
    last = torch.randn(2, 7, 7, 3)
    assert torch.equal(to_native(to_grid(last, "nhwc", (224, 224)), "nhwc"), last)


def test_gradcam_maps_lie_on_the_patch_and_window_grids(
    vit: LoadedModel, swin: LoadedModel, images: Tensor
) -> None:
    vit_map = grids(vit, images, ["gradcam"])["gradcam"]
    swin_map = grids(swin, images, ["gradcam"])["gradcam"]
    assert vit_map.shape == (2, 14, 14) and swin_map.shape == (2, 7, 7)
    for found in (vit_map, swin_map):
        assert torch.isfinite(found).all()
        assert torch.allclose(found.amax(dim=(1, 2)), torch.ones(2))
        assert found.std() > 0.05


class _LayerGrid(ReferenceGradCAM):
    """pytorch-grad-cam's Grad-CAM, its normalised map kept on the layer's grid."""

    grid: tuple[int, int] = (14, 14)

    def get_target_width_height(self, input_tensor: Tensor) -> tuple[int, int]:
        return self.grid[1], self.grid[0]


def vit_reshape(tensor: Tensor, height: int = 14, width: int = 14) -> Tensor:
    """pytorch-grad-cam's documented ViT reshape_transform."""
    result = tensor[:, 1:, :].reshape(tensor.size(0), height, width, tensor.size(2))
    return result.transpose(2, 3).transpose(1, 2)


def swin_reshape(tensor: Tensor) -> Tensor:
    """pytorch-grad-cam's Swin reshape_transform for an output already (B, H, W, C)."""
    return tensor.transpose(2, 3).transpose(1, 2)


@pytest.mark.parametrize("which, layer, reshape, grid", [
    ("vit", VIT_LAYER, vit_reshape, (14, 14)),
    ("swin", "norm", swin_reshape, (7, 7)),
])
def test_gradcam_matches_pytorch_grad_cam(
    request: pytest.FixtureRequest, images: Tensor, which: str, layer: str,
    reshape: Callable[[Tensor], Tensor], grid: tuple[int, int],
) -> None:
    loaded: LoadedModel = request.getfixturevalue(which)
    ours = grids(loaded, images, ["gradcam"], layer, CLASSES)["gradcam"]
    reference = _LayerGrid(model=loaded.module, target_layers=[loaded.module.get_submodule(layer)],
                           reshape_transform=reshape)
    reference.grid = grid
    with reference:
        # The model is frozen: the input carries the graph pytorch-grad-cam calls backward() on.
        theirs = reference(images.clone().requires_grad_(True),
                           targets=[ClassifierOutputTarget(c[0]) for c in CLASSES])
    assert not any(p.grad is not None for p in loaded.module.parameters())
    theirs_t = torch.from_numpy(np.asarray(theirs))
    for b in range(2):
        assert pearson(ours[b], theirs_t[b]) > 0.9999
    assert torch.allclose(ours, theirs_t, atol=1e-4)


def test_legrad_matches_torchcam(vit: LoadedModel, images: Tensor) -> None:
    ours = grids(vit, images, ["legrad"], classes=CLASSES)["legrad"]
    assert ours.shape == (2, 14, 14) and torch.isfinite(ours).all() and ours.std() > 0.05
    blocks: list[nn.Module | str] = [f"encoder.layers.encoder_layer_{i}" for i in range(12)]
    with ReferenceLeGrad(vit.module, blocks) as extractor, torch.enable_grad():
        scores = vit.module(images)
        theirs = extractor([c[0] for c in CLASSES], scores)[0]
    for b in range(2):
        assert pearson(ours[b], theirs[b]) > 0.9999
    assert torch.allclose(ours, theirs, atol=1e-3)


def test_a_batch_equals_its_single_images(vit: LoadedModel, images: Tensor) -> None:
    methods = ["gradcam", "legrad"]
    batch = grids(vit, images, methods, classes=CLASSES)
    for b in range(2):
        single = grids(vit, images[b:b + 1], methods, classes=[CLASSES[b]])
        for name in methods:
            assert torch.allclose(batch[name][b], single[name][0], atol=1e-5), name
    assert hook_count(vit.module) == 0


def test_no_hook_outlives_a_failing_call(vit: LoadedModel, images: Tensor) -> None:
    before = hook_count(vit.module)
    with pytest.raises((IndexError, RuntimeError)):  # class 5000 of 1000
        grids(vit, images[:1], ["legrad"], classes=[[5000]])
    with pytest.raises((AssertionError, RuntimeError)):  # ViT refuses another input size
        grids(vit, images[:1, :, :112, :112], ["gradcam", "legrad"])
    assert hook_count(vit.module) == before == 0


def test_legrad_needs_a_vision_transformer(mobilenet: LoadedModel, images: Tensor) -> None:
    assert CAMMethod.registry["legrad"].needs_transformer
    # What the HTTP layer can refuse with before queueing.
    assert mobilenet.info().attention_blocks == 0
    assert "vision transformer" in mobilenet.info().attention_problem
    with pytest.raises(ValueError, match="vision transformer"):
        grids(mobilenet, images[:1], ["legrad"])
    assert hook_count(mobilenet.module) == 0


class _Replay(CAMMethod):
    """Runs the model on from the layer with its own activations: must give the same logits."""

    def saliency(self, context: LayerContext) -> Tensor:
        rows = torch.arange(len(context.classes))
        replayed = context.probe.from_layer(context.layer, context.activations, rows)
        torch.testing.assert_close(replayed, context.logits, atol=1e-4, rtol=1e-4)
        return context.activations.sum(dim=1)


@pytest.mark.parametrize("which", ["vit", "swin"])
def test_activations_go_back_into_the_native_layout(
    request: pytest.FixtureRequest, images: Tensor, which: str
) -> None:
    loaded: LoadedModel = request.getfixturevalue(which)
    explain_batch(loaded.runner(), images[:1], [loaded.default_layer], [_Replay()], [None])


def test_ablation_through_the_channels_last_tail(swin: LoadedModel, images: Tensor) -> None:
    found = grids(swin, images[:1], ["ablationcam", "shapleycam"], classes=[[3]])
    for grid in found.values():
        assert grid.shape == (1, 7, 7) and torch.isfinite(grid).all()


def test_transformers_are_served_from_a_models_file(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text('[[models]]\nname = "vit"\narchitecture = "vit_b_16"\nweights = "random"\n')
    app = create_app(Settings(models_file=path, warmup=False))
    for client in ready_client(app):
        detail = client.get("/models/vit").json()
        assert detail["default_layer"] == VIT_LAYER
        response = client.post(
            "/explain", files={"file": ("x.png", png(224, 224), "image/png")},
            data={"model": "vit", "methods": "gradcam,legrad", "mask_size": "feature",
                  "outputs": "mask"},
            headers={"X-Request-Timeout": "600"},
        )
        assert response.status_code == 200, response.text
        explanations = response.json()["results"][0]["explanations"]
        assert [e["mask"]["shape"] for e in explanations] == [[14, 14], [14, 14]]
        # Methods built for another kind of network are refused before any work is queued.
        for method, reason in (("guided_backprop", "ReLU"), ("guided_gradcam", "ReLU")):
            refused = client.post(
                "/explain", files={"file": ("x.png", png(224, 224), "image/png")},
                data={"model": "vit", "methods": method},
            )
            assert refused.status_code == 422, refused.text
            assert reason in refused.json()["error"]["message"]
