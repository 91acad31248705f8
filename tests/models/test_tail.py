"""Tails from one load-time trace: the same as tracing each layer as a leaf, and no trace later."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, fx, nn

from service.cams import get_method
from service.cams.extractor import explain_batch
from service.engine.cost import item_passes
from service.engine.jobs import ExplainSpec
from service.models.catalog import LayerInfo, ModelInfo
from service.models.loader import LoadedModel, load_model
from service.models.spec import ModelSpec, embedded_default
from service.models.tail import Tails

CPU = torch.device("cpu")


class _LeafTracer(fx.Tracer):
    def __init__(self, leaf: str) -> None:
        super().__init__()
        self.leaf = leaf

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name == self.leaf or super().is_leaf_module(m, module_qualified_name)


def build_tail(model: nn.Module, layer: str) -> nn.Module | None:
    """The reference: the tail cut from a trace of its own with ``layer`` a leaf (the way the
    service cut tails before it traced once at load); ``None`` when there is none."""
    try:
        graph = _LeafTracer(layer).trace(model)
    except Exception:  # any tracing failure means: no tail, callers use the fallback
        return None
    starts = [n for n in graph.nodes if n.op == "call_module" and n.target == layer]
    if len(starts) != 1:
        return None
    tail = fx.Graph()
    env: dict[fx.Node, fx.Node] = {starts[0]: tail.placeholder("activations")}
    seen_start = False
    for node in graph.nodes:
        if node is starts[0]:
            seen_start = True
            continue
        if not seen_start:
            continue
        if node.op == "output":
            result = node.args[0]
            if not isinstance(result, fx.Node) or result not in env:
                return None
            tail.output(env[result])
            break
        inputs = node.all_input_nodes
        if not any(n in env for n in inputs):
            continue  # not downstream of the layer: copied on demand if it is a constant
        for dependency in inputs:
            if dependency in env:
                continue
            if dependency.op != "get_attr":
                return None  # the tail reads another input-dependent value
            env[dependency] = tail.node_copy(dependency)
        env[node] = tail.node_copy(node, lambda n: env[n])
    else:
        return None
    module = fx.GraphModule(model, tail)
    module.eval()
    return module


@pytest.fixture(scope="module")
def mobilenet() -> LoadedModel:
    return load_model(embedded_default(), CPU)


def random_model(architecture: str) -> LoadedModel:
    return load_model(ModelSpec(name=architecture, architecture=architecture, weights="random",
                                seed=0), CPU)


def layer_outputs(network: nn.Module, names: list[str], size: tuple[int, int]) -> dict[str, Tensor]:
    """Each named module's output on one random image (its native layout and shape)."""
    found: dict[str, Tensor] = {}
    modules = dict(network.named_modules())
    handles = [modules[name].register_forward_hook(
        lambda _m, _i, out, name=name: found.setdefault(name, out)) for name in names]
    try:
        with torch.no_grad():
            network(torch.randn((1, 3, *size), generator=torch.Generator().manual_seed(0)))
    finally:
        for handle in handles:
            handle.remove()
    return found


def assert_same_tails(network: nn.Module, layers: list[str], size: tuple[int, int]) -> int:
    """Every layer's tail from the one trace equals build_tail's (which traces the layer as a
    leaf): the same layers have one, and they compute the same on random activations."""
    tails = Tails(network)
    expected = {layer: build_tail(network, layer) for layer in layers}
    assert {layer for layer in layers if tails.has(layer)} == {
        layer for layer, tail in expected.items() if tail is not None}
    outputs = layer_outputs(network, layers, size)
    generator = torch.Generator().manual_seed(1)
    for layer, reference in expected.items():
        if reference is None:
            assert tails.get(layer) is None
            continue
        shape = outputs[layer].shape
        activations = torch.randn((2, *shape[1:]), generator=generator)
        ours = tails.get(layer)
        assert ours is not None
        with torch.no_grad():
            torch.testing.assert_close(ours(activations), reference(activations),
                                       atol=1e-5, rtol=1e-5, msg=layer)
    return sum(tail is not None for tail in expected.values())


def test_mobilenet_tails_equal_the_leaf_traces(mobilenet: LoadedModel) -> None:
    names = mobilenet.info().layer_names()
    assert len(names) > 200
    with_tail = assert_same_tails(mobilenet.module, names, (224, 224))
    # Every inverted residual with a skip connection stops a tail inside it, but not all do.
    assert 0 < with_tail < len(names) and "features.18" in mobilenet.info().tail_layers


def test_mobilenet_lean_copy_tails_equal_the_leaf_traces(mobilenet: LoadedModel) -> None:
    owner = copy.copy(mobilenet)
    owner.module, owner._tails = copy.deepcopy(mobilenet.module), {}  # the fixture's stay as they are
    owner.make_lean(fold_batch_norm=True, channels_last=False)
    assert owner.lean is not None
    names = [name for name in mobilenet.info().layer_names() if name in owner.lean.modules]
    assert assert_same_tails(owner.lean.module, names, (224, 224)) > 0


@pytest.mark.parametrize("architecture, cut, uncut", [
    # layer1.0.conv1's block adds its input back: the tail would read another value.
    ("resnet18", "layer4.1", "layer1.0.conv1"),
    ("vit_b_16", "encoder.layers.encoder_layer_11", "encoder.layers.encoder_layer_11.mlp"),
])
def test_random_models_tails_equal_the_leaf_traces(architecture: str, cut: str, uncut: str) -> None:
    loaded = random_model(architecture)
    names = loaded.info().layer_names()
    assert assert_same_tails(loaded.module, names, loaded.spec.input_size) > 0
    assert loaded.has_tail(cut) and not loaded.has_tail(uncut)
    assert loaded.info().tail_layers == {name for name in names if Tails(loaded.module).has(name)}


@pytest.fixture
def no_tracing(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """fx tracing made to fail loudly (and be recorded) from here on."""
    traced: list[str] = []

    def refuse(self: fx.Tracer, root: object, *args: object, **kwargs: object) -> fx.Graph:
        traced.append(type(root).__name__)
        raise AssertionError("traced after load")

    monkeypatch.setattr(fx.Tracer, "trace", refuse)
    yield traced


def test_nothing_is_traced_after_load(mobilenet: LoadedModel, no_tracing: list[str]) -> None:
    """Tracing patches nn.Module.__call__ process-wide: answering has_tail, cutting a tail and
    running Ablation-CAM through it must not trace (the owner traced once, at load)."""
    owner = copy.copy(mobilenet)
    owner._info = None  # read the capability map again, now that tracing fails
    owner._tails = dict(mobilenet._tails)  # the load-time traces
    assert owner.has_tail("features.18") and not owner.has_tail("features.16.conv.0")
    tail = owner.runner(("features.18",)).tail("features.18")
    assert tail is not None
    inputs = torch.randn((1, 3, 224, 224), generator=torch.Generator().manual_seed(2))
    maps = explain_batch(owner.runner(("features.18",)), inputs, ["features.18"],
                         [get_method("ablationcam", {"batch_size": 640})], [[3]])
    assert maps.maps[0][0].grid.shape == (7, 7) and no_tracing == []


def spec(method: str, layer: str) -> ExplainSpec:
    return ExplainSpec(methods=(method,), layers=(layer,), classes=None, mask_size=None,
                       display_size=None)


def info(tail_layers: frozenset[str]) -> ModelInfo:
    return ModelInfo(
        name="m", display_name="m", version="1", architecture="x", num_classes=3,
        input_size=(224, 224), labels=("a", "b", "c"),
        layers=(LayerInfo("late", (64, 7, 7), "Conv2d"), LayerInfo("early", (64, 14, 14), "Conv2d")),
        default_layer="late", device="cpu", tail_layers=tail_layers,
    )


@pytest.mark.parametrize("method, late, early", [
    ("ablationcam", 64, 64),  # a pass per channel
    ("reciprocam", 49, 196),  # a pass per grid position
])
def test_tail_passes_cost_a_forward_each_after_a_layer_without_a_tail(
    method: str, late: int, early: int,
) -> None:
    cost = get_method(method).extra_pass_cost
    assert get_method(method).tail_passes and cost < 1
    model = info(frozenset({"late"}))
    # The shared forward and the class round's backward, then the method's passes.
    assert item_passes(spec(method, "late"), model) == round(2 + late * cost)
    assert item_passes(spec(method, "early"), model) == round(2 + early * 1.0)
    assert item_passes(spec(method, "early"), info(frozenset({"late", "early"}))) == round(
        2 + early * cost)


def test_methods_without_tail_passes_cost_the_same_either_way() -> None:
    for method in ("scorecam", "gradcam", "fullgrad", "vit_reciprocam"):
        assert not get_method(method).tail_passes
        assert item_passes(spec(method, "early"), info(frozenset())) == item_passes(
            spec(method, "early"), info(frozenset({"early"})))
