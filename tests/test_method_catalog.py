"""The plain catalogue of methods the HTTP layer validates against (service.methods)."""

from __future__ import annotations

import pytest

from service.cams import CAMMethod, method_catalog
from service.methods import MethodInfo, MethodParam
from service.models.catalog import LayerInfo, ModelInfo


def model(**changes: object) -> ModelInfo:
    base: dict[str, object] = dict(
        name="net", display_name="net", version="1", architecture="resnet18", num_classes=3,
        input_size=(32, 32), labels=("a", "b", "c"),
        layers=(LayerInfo("layer4", (8, 1, 1), "Sequential"), LayerInfo("layer3", (8, 2, 2), "Sequential")),
        default_layer="layer4", device="cpu", linear_head="fc", linear_head_layers=("layer4",),
        linear_head_problem="", attention_blocks=0, attention_problem="resnet18 has no attention",
        rectifiers=4,
    )
    return ModelInfo(**{**base, **changes})  # type: ignore[arg-type]


def info(**changes: object) -> MethodInfo:
    base: dict[str, object] = dict(
        name="m", title="M", family="gradient", paper="", passes="1", grid="layer",
        params=(MethodParam("k", "int", 2, "a count", 1, 10),), uses_gradients=True,
        needs_linear_head=False, needs_transformer=False, needs_rectifiers=False,
    )
    return MethodInfo(**{**base, **changes})  # type: ignore[arg-type]


def test_each_entry_is_its_methods_class_declaration() -> None:
    catalog = method_catalog()
    assert list(catalog) == list(CAMMethod.registry)
    for name, entry in catalog.items():
        cls = CAMMethod.registry[name]
        assert (entry.params, entry.grid, entry.needs_linear_head, entry.needs_transformer,
                entry.needs_rectifiers, entry.uses_gradients) == (
            cls.params, cls.grid, cls.needs_linear_head, cls.needs_transformer,
            cls.needs_rectifiers, cls.uses_gradients)
    assert catalog["cam"].needs_linear_head and catalog["legrad"].needs_transformer
    assert catalog["legrad"].grid == "own" and catalog["fullgrad"].grid == "input"
    assert catalog["gradcam"].grid == "layer"


def test_options_are_checked_as_the_method_itself_checks_them() -> None:
    scorecam = method_catalog()["scorecam"]
    given = {"top_k_channels": 16.0}
    assert scorecam.options(given) == CAMMethod.registry["scorecam"](**given).options
    with pytest.raises(ValueError, match="no parameter 'top_k'"):
        scorecam.options({"top_k": 3})
    with pytest.raises(ValueError, match="at least 1"):
        info().options({"k": 0})


def test_refusals_read_the_declared_requirements() -> None:
    assert info().layer_refusal(model(linear_head=None), ["layer3"]) is None
    headless = model(linear_head=None, linear_head_layers=(), linear_head_problem="no fc")
    assert "has none (no fc)" in str(info(needs_linear_head=True).layer_refusal(headless, ["layer4"]))
    outside = info(needs_linear_head=True).layer_refusal(model(), ["layer4", "layer3"])
    assert outside is not None and "not 'layer3'" in outside
    assert info(needs_linear_head=True).layer_refusal(model(), ["layer4"]) is None
    assert info(needs_transformer=True).unsuitable(model()) == "resnet18 has no attention"
    assert "ReLU" in str(info(needs_rectifiers=True).unsuitable(model(rectifiers=0)))
    assert info(needs_rectifiers=True).unsuitable(model()) is None


def test_a_method_that_ignores_its_layer_must_say_where_its_map_lies() -> None:
    with pytest.raises(TypeError, match="grid = 'input'"):
        type("Stray", (CAMMethod,), {"layer_free": True})
