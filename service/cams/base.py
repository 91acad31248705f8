"""The contract every CAM method fulfils, and the registry that lists them.

A method sees, for one target layer, a :class:`LayerContext`: the batch of activations ``A``
(B, K, H, W), and, when it declares ``uses_gradients``, the gradients ``g = dY_c/dA`` of each
sample's target score before softmax, both from the forward/backward pass that every method of a
request shares. Methods that need more passes (Score-CAM, Ablation-CAM, Smooth Grad-CAM++ ...) get
them from ``context.probe``, which runs the model from the input or from the target layer on.

Each method declares once, as class attributes, what it needs (``uses_gradients``,
``own_autograd``, ``layer_free``, ``needs_linear_head``, ``needs_transformer``,
``needs_rectifiers``), where its map lies (``grid``) and what it costs (``passes``,
``extra_pass_cost``, :meth:`CAMMethod.extra_passes`). :meth:`CAMMethod.describe` turns that into
the torch-free :class:`~service.methods.MethodInfo` that the HTTP layer refuses requests by and
the worker picks the network by; nothing else restates it.

Most methods only say how channel weights are computed (:meth:`CAMMethod.weights`); the shared
:meth:`CAMMethod.saliency` forms ``ReLU(sum_k w_k A_k)``. A method whose map is an element-wise
combination overrides :meth:`CAMMethod.contributions` (the per-channel terms ``(B, K, H, W)`` that are
summed, or reduced to their first principal component under ``eigen_smooth``); one whose map is
not a sum of channel terms overrides :meth:`CAMMethod.saliency`. Defining a subclass with a
``name`` registers it; nothing else needs to change for a new method to be served.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from service.cams.linalg import first_component
from service.methods import Grid, MethodInfo, MethodParam, check_options

if TYPE_CHECKING:
    from service.cams.probe import Probe


@dataclass
class LayerContext:
    """Everything a method may read for one target layer and one round of targets."""

    layer: str
    activations: Tensor  # (B, K, H, W), detached
    gradients: Tensor | None  # dY_c/dA, (B, K, H, W); None unless the method uses gradients
    inputs: Tensor  # (B, C, H_in, W_in), the normalised model inputs of these samples
    classes: Tensor  # (B,) int64, each sample's target class
    logits: Tensor  # (B, num_classes), detached, from the shared forward pass
    probe: Probe
    eigen_smooth: bool = False


class CAMMethod:
    """Base of all CAM methods. Subclasses set the class attributes and one of the hooks."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    family: ClassVar[str] = "gradient"  # gradient | activation | perturbation | baseline
    paper: ClassVar[str] = ""
    # Reads the gradients of the shared backward pass (``context.gradients``).
    uses_gradients: ClassVar[bool] = True
    # Runs autograd itself through ``context.probe`` (second-order terms, other targets, noise).
    own_autograd: ClassVar[bool] = False
    # Ignores the target layers: one map per sample from the whole network (FullGrad); its
    # ``grid`` must then be ``input``.
    layer_free: ClassVar[bool] = False
    # Where the map lies: the target layer's grid, the input's pixels, or a grid of its own.
    grid: ClassVar[Grid] = "layer"
    # Needs global average pooling followed by one linear layer after the target layer (CAM).
    needs_linear_head: ClassVar[bool] = False
    # Needs a vision transformer's attention blocks (LeGrad); other models get a ValueError.
    needs_transformer: ClassVar[bool] = False
    # Guided Backprop: needs nn.ReLU / nn.ReLU6 modules to guide.
    needs_rectifiers: ClassVar[bool] = False
    passes: ClassVar[str] = "1 forward + 1 backward (shared)"
    # What ``passes`` says, as a number: forward-pass equivalents per image and class beyond
    # the shared pass, for a layer of ``channels`` channels on a ``grid`` (see :meth:`extra_passes`).
    extra_pass_cost: ClassVar[float] = 0.0
    # Its extra passes run from the target layer through the network's tail, at
    # ``extra_pass_cost`` each (Ablation-CAM, Recipro-CAM); after a layer without a tail each
    # runs the whole model and costs a forward (:meth:`pass_cost`; service.engine.cost reads
    # it). Its :meth:`extra_passes` is then a count of passes times ``extra_pass_cost``.
    tail_passes: ClassVar[bool] = False
    # Its map cancels or thresholds what the forward computed (differences of class scores,
    # signed sums, thresholds of activations) or follows gradients through the whole network:
    # a bf16 or fp16 forward moves it by more than the Pearson r of 0.999 the precisions keep
    # (measured per method in docs/performance.md), so under CAMSERVE_PRECISION=bf16|fp16 its
    # batches run in float32. The gradient and activation maps of the target layer keep r.
    full_precision: ClassVar[bool] = False
    params: ClassVar[tuple[MethodParam, ...]] = ()

    registry: ClassVar[dict[str, type[CAMMethod]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.layer_free and cls.grid != "input":
            raise TypeError(f"{cls.__name__} ignores the target layer: declare grid = 'input'")
        if cls.name:
            if cls.name in CAMMethod.registry:
                raise ValueError(f"CAM method {cls.name!r} is defined twice")
            CAMMethod.registry[cls.name] = cls

    @classmethod
    def describe(cls) -> MethodInfo:
        """This method's declaration as plain data, for the HTTP layer and the catalogue."""
        return MethodInfo(
            name=cls.name, title=cls.title or cls.name, family=cls.family, paper=cls.paper,
            passes=cls.passes, params=cls.params, grid=cls.grid,
            uses_gradients=cls.uses_gradients, needs_linear_head=cls.needs_linear_head,
            needs_transformer=cls.needs_transformer, needs_rectifiers=cls.needs_rectifiers,
            # Its own autograd (second order, guided rectifiers, other objectives) or the
            # whole network (FullGrad's biases, input gradients) must see the model as it is.
            exact_network=cls.own_autograd or cls.layer_free,
        )

    def __init__(self, **options: Any) -> None:
        self.options: dict[str, Any] = check_options(self.name, self.params, options)

    def extra_passes(self, channels: int, grid: tuple[int, int] | None = None) -> float:
        """Forward passes (or their equivalent in time) this method adds per image and class,
        on a layer of ``channels`` channels whose grid is ``grid`` (height, width; None when
        unknown); the scheduler and the request budget read it."""
        return self.extra_pass_cost

    def pass_cost(self, has_tail: bool) -> float:
        """What one of its extra passes costs, in forwards, from a layer with a tail
        (``has_tail``) or without one; for the estimate and for the progress alike."""
        return 1.0 if self.tail_passes and not has_tail else self.extra_pass_cost

    def weights(self, context: LayerContext) -> Tensor:
        """Channel weights (B, K)."""
        raise NotImplementedError(f"{type(self).__name__} must define weights or saliency")

    def contributions(self, context: LayerContext) -> Tensor:
        """Per-channel terms (B, K, H, W) whose sum over channels is the raw map."""
        return self.weights(context)[:, :, None, None] * context.activations

    def saliency(self, context: LayerContext) -> Tensor:
        """The raw map (B, H, W) on the layer's grid, before normalisation.

        Under ``eigen_smooth`` the channel terms are replaced by their first principal
        component (pytorch-grad-cam's smoothing), signed to agree with their plain sum.
        """
        terms = self.contributions(context)
        combined = first_component(terms) if context.eigen_smooth else terms.sum(dim=1)
        return torch.relu(combined)

    def fusion_scale(self, normalised: Tensor) -> Tensor:
        """How a layer's normalised map is rescaled before several layers are fused."""
        return normalised


def normalize(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """Min-max each map of (B, H, W) to [0, 1]; a constant map becomes all zeros, never NaN."""
    flat = maps.flatten(1)
    low = flat.min(dim=1).values[:, None, None]
    span = (flat.max(dim=1).values[:, None, None] - low)
    scaled = (maps - low) / span.clamp_min(eps)
    return torch.where(span > eps, scaled, torch.zeros_like(maps)).nan_to_num_(0.0)


def get_method(name: str, options: Mapping[str, Any] | None = None) -> CAMMethod:
    return CAMMethod.registry[name](**dict(options or {}))


def method_names() -> list[str]:
    return list(CAMMethod.registry)


def method_catalog() -> dict[str, MethodInfo]:
    """Every registered method's declaration, in registration order."""
    return {name: cls.describe() for name, cls in CAMMethod.registry.items()}
