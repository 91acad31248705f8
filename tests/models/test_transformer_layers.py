"""Grid layouts read from output shapes, and untrained models declared with weights = "random"."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from service.models.layers import inspect_layers
from service.models.layout import layout_of, token_grid
from service.models.loader import build_module
from service.models.spec import ModelSpec, read_models_file


@pytest.mark.parametrize("shape, size, layout", [
    ((1, 1280, 7, 7), (224, 224), "nchw"),
    ((1, 512, 4, 3), (128, 96), "nchw"),
    ((1, 768, 1, 1), (224, 224), "nchw"),  # pooled: 1 x 1 is still a grid
    ((1, 7, 7, 768), (224, 224), "nhwc"),  # Swin's last stage
    ((1, 56, 56, 96), (224, 224), "nhwc"),  # Swin's patch embedding
    ((1, 197, 768), (224, 224), "tokens"),  # ViT-B/16: class token and 14 x 14 patches
    ((1, 50, 768), (224, 224), "tokens"),  # ViT-B/32: 7 x 7 patches
    ((1, 196, 768), (224, 224), None),  # no class token in front of a square grid
    ((1, 1000), (224, 224), None),
])
def test_layout_is_read_from_the_shape(
    shape: tuple[int, ...], size: tuple[int, int], layout: str | None
) -> None:
    assert layout_of(shape, size) == layout


def test_patch_grids_follow_the_input_aspect() -> None:
    assert token_grid(196, (224, 224)) == (14, 14)
    assert token_grid(12 * 20, (192, 320)) == (12, 20)
    assert token_grid(7, (224, 224)) is None


def test_a_small_vit_has_token_layers_and_its_last_input_norm_is_the_default() -> None:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=3,
    ).eval()
    layers, default = inspect_layers(model, (32, 32), torch.device("cpu"))
    found = {layer.name: layer for layer in layers}
    # The head starts at zero; the default is found from the classifier's input, not its output.
    assert not model.heads.head.weight.any()
    assert default == "encoder.layers.encoder_layer_1.ln_1"
    assert (found[default].shape, found[default].layout) == ((16, 4, 4), "tokens")
    assert found["conv_proj"].layout == "nchw"
    assert "heads" not in found


def test_random_weights_are_declared_and_seeded(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text('[[models]]\nname = "r"\narchitecture = "resnet18"\nweights = "random"\n'
                    'num_classes = 3\nseed = 7\n')
    spec = read_models_file(path)[0]
    assert spec.weights is None and spec.seed == 7
    state = torch.random.get_rng_state()
    first, second = build_module(spec), build_module(spec)
    other = build_module(spec.model_copy(update={"seed": 8}))
    assert torch.equal(torch.random.get_rng_state(), state)  # loading draws nothing globally
    assert torch.equal(first.conv1.weight, second.conv1.weight)
    assert not torch.equal(first.conv1.weight, other.conv1.weight)


def test_zero_initialised_matrices_are_drawn_for_untrained_models() -> None:
    spec = ModelSpec(name="v", architecture="vit_b_16", weights="random", num_classes=4)
    module = build_module(spec)
    assert isinstance(module, torchvision.models.VisionTransformer)
    assert module.heads.head.weight.std() > 0.01
    assert not module.heads.head.bias.any()  # biases keep torchvision's zeros
