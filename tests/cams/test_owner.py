"""The loaded model's owner: its lean copy, its capability map and tails, and the runner it hands out."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from service.cams import get_method
from service.cams.extractor import explain_batch
from service.models.fold import channels_last_weights, gradient_free_copy
from service.models.loader import LoadedModel, own
from service.models.runner import Runner
from tests.cams.conftest import Tiny

LAYER = "features.18"


def batch_norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.fixture(scope="module")
def owner(mobilenet: LoadedModel) -> LoadedModel:
    """A second owner of mobilenet_v2 (the shared fixture stays as it was), made lean as the
    worker makes it."""
    owned = own(copy.deepcopy(mobilenet.module), (224, 224), name="mobilenet_v2")
    owned.make_lean(fold_batch_norm=True, channels_last=True)
    return owned


def test_masked_passes_run_through_the_owners_lean_copy(owner: LoadedModel, photos: Tensor) -> None:
    runner = owner.runner((LAYER,))
    assert runner.through == "lean" and owner.lean is not None
    assert batch_norms(owner.lean.module) == 0 and batch_norms(owner.module) == 52
    with torch.no_grad():
        expected = owner.module(photos)
    calls: list[int] = []
    handle = owner.lean.module.register_forward_pre_hook(lambda _m, args: calls.append(len(args[0])))
    try:
        found = runner.lean_forward(photos)
    finally:
        handle.remove()
    assert calls == [2]
    torch.testing.assert_close(found, expected, atol=1e-4, rtol=1e-4)


def test_without_a_channels_last_lean_copy_the_owner_makes_one_for_masked_passes(
    mobilenet: LoadedModel, photos: Tensor,
) -> None:
    owned = own(copy.deepcopy(mobilenet.module), (224, 224))
    owned.make_lean(fold_batch_norm=False, channels_last=False)  # both settings off
    runner = owned.runner((LAYER,))
    before = {name: p.clone() for name, p in owned.module.state_dict().items()}
    calls: list[int] = []
    handle = owned.module.register_forward_hook(lambda *_: calls.append(1))
    try:
        spare = owned.gradient_free_network()
        found = runner.lean_forward(photos)
    finally:
        handle.remove()
    assert owned.lean is None and spare is not owned.module and owned.gradient_free_network() is spare
    assert batch_norms(spare) == 0 and channels_last_weights(spare)
    assert calls == []  # hooks on the model do not follow into the copy
    with torch.no_grad():
        torch.testing.assert_close(found, owned.module(photos), atol=1e-4, rtol=1e-4)
    # The served model is left as it was.
    assert batch_norms(owned.module) == 52 and not channels_last_weights(owned.module)
    for name, value in owned.module.state_dict().items():
        assert torch.equal(value, before[name]), name
    # A channels-last lean copy serves them itself: no second copy.
    owned.make_lean(fold_batch_norm=True, channels_last=True)
    assert owned.lean is not None and owned.gradient_free_network() is owned.lean.module


class Branching(nn.Module):
    """A forward pass that depends on the data: symbolic tracing cannot follow it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        if out.mean() > 0:
            return out.mean(dim=(2, 3))
        return -out.mean(dim=(2, 3))


def test_a_model_that_cannot_be_traced_runs_its_masked_passes_itself() -> None:
    model = Branching().eval().requires_grad_(False)
    assert gradient_free_copy(model) is model
    inputs = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(Runner(model).lean_forward(inputs), model(inputs))


def test_the_capability_map_is_read_once_and_names_the_linear_head(tiny: nn.Module) -> None:
    owned = own(copy.deepcopy(tiny), (16, 16))
    info = owned.info()
    assert owned.info() is info
    assert info.linear_head == "fc" and "features" in info.linear_head_layers
    assert info.rectifiers == 2 and info.attention_blocks == 0
    assert owned.runner().linear_head == "fc"


def test_tails_are_kept_by_the_owner_one_per_network_and_layer(owner: LoadedModel) -> None:
    lean, itself = owner.runner((LAYER,)), owner.runner((LAYER,), exact=True)
    assert (lean.through, itself.through) == ("lean", "model")
    tail = lean.tail(LAYER)
    assert tail is not None and owner.has_tail(LAYER)
    assert owner.runner((LAYER,)).tail(LAYER) is tail  # a later runner finds it cut already
    assert itself.tail(LAYER) is not tail  # the model's own tail runs the model's modules
    # A new lean copy gets tails cut from it, not the old copy's.
    owner.make_lean(fold_batch_norm=True, channels_last=True)
    assert owner.runner((LAYER,)).tail(LAYER) is not tail
    assert owner.runner((LAYER,), exact=True).tail(LAYER) is itself.tail(LAYER)


class _Decoy(Tiny):
    """Tiny with one more linear layer of the same width, registered after the real head and
    never run: a classifier found by its type and width would be this one."""

    def __init__(self) -> None:
        super().__init__()
        self.decoy = nn.Linear(6, 5)


def test_cam_reads_the_owners_linear_head_and_never_guesses(tiny: nn.Module,
                                                          tiny_inputs: Tensor) -> None:
    decoy = _Decoy()
    decoy.load_state_dict(tiny.state_dict(), strict=False)
    owned = own(decoy, (16, 16))
    assert owned.info().linear_head is None  # the last linear layer does not make the logits
    with pytest.raises(ValueError, match="linear layer"):
        explain_batch(owned.runner(), tiny_inputs, ("features",), [get_method("cam")], [None] * 3)
    # A runner over a bare module knows no head unless told; told, CAM uses that one.
    with pytest.raises(ValueError, match="linear layer"):
        explain_batch(Runner(decoy), tiny_inputs, ("features",), [get_method("cam")], [None] * 3)
    told = explain_batch(Runner(decoy, linear_head="fc"), tiny_inputs, ("features",),
                         [get_method("cam")], [None] * 3)
    gradcam = explain_batch(Runner(decoy), tiny_inputs, ("features",), [get_method("gradcam")],
                            [None] * 3)
    for a, b in zip(told.maps, gradcam.maps, strict=True):
        torch.testing.assert_close(a[0].grid, b[0].grid, atol=1e-5, rtol=0)
