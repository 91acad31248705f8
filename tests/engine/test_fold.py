"""Batch norm folding and the torch worker that computes through the folded copy."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from service.cams.extractor import resize_map
from service.engine.jobs import ExplainSpec, WorkItem
from service.engine.worker import Worker, _resize_all
from service.models.fold import batch_norm_affine, conv_bn_pairs, effective_bias, fold_batch_norms
from service.models.spec import embedded_default


def with_running_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Eval mode, frozen, batch norms given non-trivial statistics and affine terms."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            size = module.num_features
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.copy_(torch.rand(size, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(size, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(size, generator=generator) - 0.5)
    return model.eval().requires_grad_(False)


@pytest.mark.parametrize("architecture", ["mobilenet_v2", "resnet18", "densenet121"])
def test_folded_model_computes_the_same_logits(architecture: str) -> None:
    model = with_running_stats(torchvision.models.get_model(architecture, weights=None, num_classes=10))
    folded = fold_batch_norms(model)
    assert folded is not None and folded.changed
    inputs = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected, actual = model(inputs), folded.module(inputs)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_folding_keeps_every_module_name_and_leaves_the_model_alone() -> None:
    model = with_running_stats(torchvision.models.mobilenet_v2(weights=None, num_classes=10))
    before = {name: type(m) for name, m in model.named_modules()}
    folded = fold_batch_norms(model)
    assert folded is not None
    assert set(folded.modules) == set(before)
    assert {name: type(m) for name, m in model.named_modules()} == before
    assert isinstance(folded.modules["features.18.1"], nn.Identity)
    assert "features.18.0" in folded.changed and "features.18" not in folded.changed
    assert all(isinstance(folded.modules[name], nn.Conv2d) for name in folded.changed)
    assert not any(p.requires_grad for p in folded.module.parameters())


def test_hooked_outputs_other_than_folded_convolutions_are_unchanged() -> None:
    model = with_running_stats(torchvision.models.mobilenet_v2(weights=None, num_classes=10))
    folded = fold_batch_norms(model)
    assert folded is not None
    inputs = torch.randn(1, 3, 64, 64)

    def outputs(network: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
        seen: dict[str, torch.Tensor] = {}
        modules = dict(network.named_modules())
        handles = [modules[n].register_forward_hook(
            lambda _m, _i, out, n=n: seen.__setitem__(n, out.clone())) for n in names]
        try:
            with torch.inference_mode():
                network(inputs)
        finally:
            for handle in handles:
                handle.remove()
        return seen

    names = ["features.17", "features.18", "features.18.1", "features.18.2"]
    original, changed = outputs(model, names), outputs(folded.module, names)
    for name in names:
        torch.testing.assert_close(changed[name], original[name], rtol=1e-4, atol=1e-4)


class ConvNorm(nn.Module):
    """A convolution and a batch norm; subclasses say how forward uses them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)


def test_batch_norms_affine_map_is_what_it_computes_and_what_fullgrad_reads() -> None:
    norm = with_running_stats(nn.Sequential(nn.BatchNorm2d(4)))[0]
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    affine = batch_norm_affine(norm)
    assert affine is not None
    scale, shift = affine
    torch.testing.assert_close(norm(x), scale.view(1, -1, 1, 1) * x + shift.view(1, -1, 1, 1))
    bias = effective_bias(norm)
    assert bias is not None and torch.equal(bias, shift)


def test_a_convolution_feeding_more_than_its_batch_norm_is_not_folded() -> None:
    class Branchy(ConvNorm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.norm(y) + y

    assert conv_bn_pairs(with_running_stats(Branchy())) == []
    assert fold_batch_norms(with_running_stats(Branchy())) is None


def test_an_untraceable_model_is_not_folded() -> None:
    class DataDependent(ConvNorm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:
                return self.norm(self.conv(x))
            return x

    assert fold_batch_norms(with_running_stats(DataDependent())) is None


def test_training_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norms(torchvision.models.mobilenet_v2(weights=None, num_classes=10).train())


def test_maps_resized_together_equal_maps_resized_one_by_one() -> None:
    generator = torch.Generator().manual_seed(0)
    grids = [torch.rand(7, 7, generator=generator) for _ in range(3)] + [torch.rand(14, 14)]
    sizes: list[tuple[int, int] | None] = [(224, 224), (300, 451), (224, 224), (224, 224)]
    wanted = [*zip(grids, sizes, strict=True), (grids[0], None), (grids[1], (7, 7))]
    out = _resize_all(wanted)
    for (grid, size), array in zip(wanted, out, strict=True):
        if size is None:
            assert array is None
        else:
            assert array is not None
            assert np.array_equal(array, resize_map(grid, size).numpy())


@pytest.fixture(scope="module")
def workers() -> Iterator[tuple[Worker, Worker]]:
    plain, folded = Worker(torch.device("cpu"), 1, fold_batch_norm=False), Worker(torch.device("cpu"), 1)
    plain.load([embedded_default()])
    folded.load([embedded_default()])
    yield plain, folded


def items(spec: ExplainSpec | None, count: int = 3) -> list[WorkItem]:
    loop = asyncio.new_event_loop()
    try:
        rng = np.random.default_rng(0)
        return [
            WorkItem("mobilenet_v2", rng.integers(0, 256, (224, 224, 3), dtype=np.uint8), 5, spec,
                     float("inf"), loop.create_future())
            for _ in range(count)
        ]
    finally:
        loop.close()


@pytest.mark.parametrize("spec", [
    None,
    ExplainSpec(("gradcam", "gradcampp"), ("features.18",), None, (224, 224), (60, 90)),
    ExplainSpec(("gradcam",), ("features.17", "features.18"), (1, 285), None, (30, 30)),
], ids=["predict", "gradcam", "two-layers-two-classes"])
def test_worker_answers_the_same_through_the_folded_copy(
    workers: tuple[Worker, Worker], spec: ExplainSpec | None
) -> None:
    plain, folded = workers
    expected, actual = plain.compute(items(spec)), folded.compute(items(spec))
    for want, got in zip(expected, actual, strict=True):
        assert [i for i, _ in got.predictions] == [i for i, _ in want.predictions]
        np.testing.assert_allclose([s for _, s in got.predictions], [s for _, s in want.predictions],
                                   atol=1e-5)
        assert len(got.explanations) == len(want.explanations)
        for a, b in zip(got.explanations, want.explanations, strict=True):
            assert (a.method, a.layers, a.class_idx) == (b.method, b.layers, b.class_idx)
            assert a.mask.dtype == np.float32 and a.mask.shape == b.mask.shape
            np.testing.assert_allclose(a.mask, b.mask, atol=1e-4)
            assert a.display is not None and b.display is not None
            np.testing.assert_allclose(a.display, b.display, atol=1e-4)


def test_worker_uses_the_model_itself_where_folding_would_show(workers: tuple[Worker, Worker]) -> None:
    from service.cams import get_method

    _, worker = workers
    loaded = worker.models["mobilenet_v2"]
    assert loaded.lean is not None
    gradcam, guided = get_method("gradcam"), get_method("guided_backprop")
    assert worker._runner(loaded, ("features.18",), [gradcam]).through == "lean"
    assert worker._runner(loaded, (), []).through == "lean"
    assert worker._runner(loaded, ("features.18.0",), [gradcam]).through == "model"
    # Guided Backprop declares that it needs the model itself (MethodInfo.exact_network).
    assert type(guided).describe().exact_network and not type(gradcam).describe().exact_network
    assert worker._runner(loaded, ("features.18",), [gradcam, guided]).through == "model"


def test_score_cam_runs_its_masked_passes_through_the_owners_lean_copy(
    workers: tuple[Worker, Worker],
) -> None:
    """Even on a layer the shared pass must read from the model itself (a folded convolution),
    the masked passes go through the copy the model's owner folded at load: no second fold."""
    plain, worker = workers
    loaded = worker.models["mobilenet_v2"]
    assert loaded.lean is not None and "features.18.0" in loaded.lean.changed
    spec = ExplainSpec(("scorecam",), ("features.18.0",), None, None, None,
                       method_params=(("scorecam", (("top_k_channels", 8),)),))
    calls: dict[str, list[int]] = {"model": [], "lean": []}
    handles = [
        network.register_forward_pre_hook(lambda _m, args, name=name: calls[name].append(len(args[0])))
        for name, network in (("model", loaded.module), ("lean", loaded.lean.module))
    ]
    try:
        lean = worker.compute(items(spec, 1))
    finally:
        for handle in handles:
            handle.remove()
    # The shared pass reads the folded convolution from the model; the 8 masked images ran
    # through the lean copy.
    assert calls["model"] == [1] and sum(calls["lean"]) == 8
    itself = plain.compute(items(spec, 1))
    np.testing.assert_allclose(lean[0].explanations[0].mask, itself[0].explanations[0].mask, atol=1e-4)
