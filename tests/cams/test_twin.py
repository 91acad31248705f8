"""The folded, channels-last twin that runs the Score-CAM family's masked passes."""

from __future__ import annotations

import torch
from torch import nn

from service.cams.twin import build_twin, twin_forward, twin_of
from service.models.loader import LoadedModel


def batch_norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_the_twin_gives_the_models_logits_with_no_batch_norm_left(mobilenet: LoadedModel,
                                                                   photos: torch.Tensor) -> None:
    model = mobilenet.module
    twin = twin_of(model)
    assert twin is not model and batch_norms(twin) == 0
    with torch.no_grad():
        expected = model(photos)
    torch.testing.assert_close(twin_forward(model, photos), expected, atol=1e-4, rtol=1e-4)
    assert twin_forward(model, photos).argmax(dim=1).tolist() == expected.argmax(dim=1).tolist()


def test_the_served_model_is_left_as_it_was(mobilenet: LoadedModel) -> None:
    model = mobilenet.module
    before = {name: p.clone() for name, p in model.state_dict().items()}
    twin_of(model)
    assert batch_norms(model) == 52  # mobilenet_v2's own, untouched
    first = model.features[0][0].weight
    assert first.is_contiguous() and not first.requires_grad
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_one_twin_per_model(tiny: nn.Module, mobilenet: LoadedModel) -> None:
    assert twin_of(tiny) is twin_of(tiny)
    assert twin_of(tiny) is not twin_of(mobilenet.module)


def test_hooks_on_the_model_do_not_follow_into_the_twin(tiny: nn.Module,
                                                       tiny_inputs: torch.Tensor) -> None:
    calls: list[int] = []
    handle = tiny.features[2].register_forward_hook(lambda *_: calls.append(1))
    try:
        twin = build_twin(tiny)
        with torch.no_grad():
            twin(tiny_inputs)
    finally:
        handle.remove()
    assert calls == []


class Branching(nn.Module):
    """A forward pass that depends on the data: symbolic tracing cannot follow it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        if out.mean() > 0:
            return out.mean(dim=(2, 3))
        return -out.mean(dim=(2, 3))


def test_a_model_that_cannot_be_traced_is_used_as_it_is() -> None:
    model = Branching().eval()
    assert build_twin(model) is model
    inputs = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(twin_forward(model, inputs), model(inputs))


def test_a_model_already_folded_and_channels_last_is_its_own_twin(mobilenet: LoadedModel) -> None:
    from service.models.fold import fold_batch_norms

    folded = fold_batch_norms(mobilenet.module)
    assert folded is not None
    lean = folded.module.to(memory_format=torch.channels_last)
    assert build_twin(lean) is lean
    # Folded but not channels-last still gets a copy in the faster layout.
    again = fold_batch_norms(mobilenet.module)
    assert again is not None
    assert build_twin(again.module) is not again.module
