"""The contract every CAM method fulfils, and the registry that lists them.

A method sees, for one target layer, the batch of activations ``A`` (B, K, H, W) and, when it
declares ``uses_gradients``, the gradients ``g = dY_c/dA`` of each sample's target score before
softmax. Most methods only say how channel weights are computed (:meth:`CAMMethod.weights`);
the shared :meth:`CAMMethod.saliency` forms ``ReLU(sum_k w_k A_k)``. A method whose map is not a
weighted sum overrides :meth:`CAMMethod.saliency` instead. Defining a subclass with a ``name``
registers it; nothing else needs to change for a new method to be served.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor


@dataclass(frozen=True)
class MethodParam:
    """A tunable parameter of a method, as listed by ``GET /methods``."""

    name: str
    type: str
    default: Any
    description: str


class CAMMethod:
    """Base of all CAM methods. Subclasses set the class attributes and one of the hooks."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    family: ClassVar[str] = "gradient"  # gradient | activation | perturbation | baseline
    paper: ClassVar[str] = ""
    uses_gradients: ClassVar[bool] = True
    passes: ClassVar[str] = "1 forward + 1 backward (shared)"
    apply_relu: ClassVar[bool] = True
    params: ClassVar[tuple[MethodParam, ...]] = ()

    registry: ClassVar[dict[str, type[CAMMethod]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            if cls.name in CAMMethod.registry:
                raise ValueError(f"CAM method {cls.name!r} is defined twice")
            CAMMethod.registry[cls.name] = cls

    def weights(self, activations: Tensor, gradients: Tensor | None) -> Tensor:
        """Channel weights (B, K)."""
        raise NotImplementedError(f"{type(self).__name__} must define weights or saliency")

    def saliency(self, activations: Tensor, gradients: Tensor | None) -> Tensor:
        """The raw map (B, H, W) on the layer's grid, before normalisation."""
        weights = self.weights(activations, gradients)
        combined = torch.einsum("bk,bkhw->bhw", weights, activations)
        return torch.relu(combined) if self.apply_relu else combined


def normalize(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """Min-max each map of (B, H, W) to [0, 1]; a constant map becomes all zeros, never NaN."""
    flat = maps.flatten(1)
    low = flat.min(dim=1).values[:, None, None]
    span = (flat.max(dim=1).values[:, None, None] - low)
    scaled = (maps - low) / span.clamp_min(eps)
    return torch.where(span > eps, scaled, torch.zeros_like(maps)).nan_to_num_(0.0)


def get_method(name: str) -> CAMMethod:
    return CAMMethod.registry[name]()


def method_names() -> list[str]:
    return list(CAMMethod.registry)
