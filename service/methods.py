"""The catalogue of CAM methods as plain data: what each is called, takes, needs and returns.

A method declares all of this once, as class attributes of its :class:`service.cams.CAMMethod`
subclass; the engine turns the registry into :class:`MethodInfo` records when it is built
(``engine.methods``, as ``engine.catalog`` holds the models). The HTTP layer validates requests
against these records and never imports the methods themselves, which need torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from service.errors import choices
from service.models.catalog import ModelInfo

# Where a method's map lies: on the target layer's grid, on the input's pixels, or on a grid
# of its own that ignores the target layer (LeGrad: the ViT's patch grid).
Grid = Literal["layer", "input", "own"]


@dataclass(frozen=True)
class MethodParam:
    """A tunable parameter of a method, as listed by ``GET /methods`` and set per request."""

    name: str
    type: str  # int | float | bool
    default: Any
    description: str
    minimum: float | None = None
    maximum: float | None = None

    def check(self, value: object) -> int | float | bool:
        """The value converted to this parameter's type; ``ValueError`` naming the problem."""
        if self.type == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"{self.name} must be true or false, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{self.name} must be a number, got {value!r}")
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an int too large for a float
            finite = False
        if not finite:
            raise ValueError(f"{self.name} must be a finite number, got {value!r:.40}")
        if self.type == "int":
            if float(value) != int(value):
                raise ValueError(f"{self.name} must be an integer, got {value!r}")
            value = int(value)
        else:
            value = float(value)
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"{self.name} must be at least {self.minimum:g}, got {value!r}")
        if self.maximum is not None and value > self.maximum:
            raise ValueError(f"{self.name} must be at most {self.maximum:g}, got {value!r}")
        return value


def check_options(
    method: str, params: Sequence[MethodParam], options: Mapping[str, object]
) -> dict[str, Any]:
    """Every declared parameter's value: the given one checked, else its default.
    ``ValueError`` for an undeclared name or a bad value."""
    declared = {p.name: p for p in params}
    unknown = sorted(set(options) - set(declared))
    if unknown:
        raise ValueError(f"method {method!r} has no parameter {unknown[0]!r}")
    return {
        name: param.check(options[name]) if name in options else param.default
        for name, param in declared.items()
    }


@dataclass(frozen=True)
class MethodInfo:
    """One method as the HTTP layer sees it; built from the method's class declaration."""

    name: str
    title: str
    family: str  # gradient | activation | perturbation | baseline
    paper: str
    passes: str
    params: tuple[MethodParam, ...]
    grid: Grid
    uses_gradients: bool  # reads the gradients of the shared backward pass
    needs_linear_head: bool  # global average pooling, then one linear layer (CAM)
    needs_transformer: bool  # a vision transformer's attention blocks (LeGrad)
    needs_rectifiers: bool  # nn.ReLU / nn.ReLU6 modules to guide (Guided Backprop)
    # Runs on the model itself, never its lean copy (its own autograd, or the whole network).
    exact_network: bool = False

    def options(self, given: Mapping[str, object]) -> dict[str, Any]:
        """All parameter values for a request that sets ``given``; ``ValueError`` if bad."""
        return check_options(self.name, self.params, given)

    def unsuitable(self, model: ModelInfo) -> str | None:
        """Why this method cannot explain ``model`` at all, whatever the layer; None if it can."""
        if self.needs_transformer and not model.attention_blocks:
            return model.attention_problem
        if self.needs_rectifiers and not model.rectifiers:
            return (f"it guides gradients through ReLU or ReLU6 modules, and {model.architecture} "
                    "has none; use saliency or gradcam")
        return None

    def layer_refusal(self, model: ModelInfo, layers: Sequence[str]) -> str | None:
        """Why this method cannot explain ``layers`` of ``model``, worded for the client
        (CAM reads the classifier's weights, so only the layer its linear head pools); None
        when it can."""
        if not self.needs_linear_head:
            return None
        if model.linear_head is None:
            return (
                f"method {self.name!r} needs global average pooling followed by one linear layer "
                f"after the target layer, and model {model.name!r} has none "
                f"({model.linear_head_problem}); use gradcam, which equals CAM on models that "
                "have such a head"
            )
        outside = [layer for layer in layers if layer not in model.linear_head_layers]
        if outside:
            return (
                f"method {self.name!r} only explains the layer its linear head "
                f"{model.linear_head!r} pools, not {outside[0]!r}; valid layers: "
                f"{choices(model.linear_head_layers)}"
            )
        return None
