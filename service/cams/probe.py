"""A method's view of the model's runner for one round of an explanation.

A :class:`Probe` is built for each round of an :func:`~service.cams.extractor.explain_batch`
call, over the samples of that round, and is the one way a method runs or reads the model. It
holds the round's inputs and the target layers' layouts and hands everything else to the
runner the model's owner gave the extractor (:class:`service.models.runner.Runner`): forwards
on other inputs (Score-CAM's masked images, through the owner's lean copy), forwards from a
target layer with replaced activations (Ablation-CAM's ablated channels, through the owner's
cached tail), gradients at a layer for other inputs (Smooth Grad-CAM++'s noisy copies), at the
input (the saliency family) or at every biased module (FullGrad), the classifier's weights
(CAM: the owner's ``linear_head`` fact) and a ViT's blocks (LeGrad). A method never sees the
model or its modules themselves (``tests/test_layering.py`` checks it).

Methods see every layer as (N, K, H, W); a layer whose output has another layout (channels
last, or a class token and patch tokens, see :mod:`service.models.layout`) gets activations put
back into that layout before the model runs on from it, the class token being the sample's own
from the shared forward pass, and has its activations and gradients brought to the grid.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager

from torch import Tensor, nn

from service.models.anatomy import Transformer
from service.models.hooks import Hook
from service.models.layout import Layout, to_native
from service.models.runner import Runner, Target, gather_scores

__all__ = ["Probe", "gather_scores"]


class Probe:
    def __init__(
        self,
        runner: Runner,
        inputs: Tensor,
        layouts: Mapping[str, Layout] | None = None,
        class_tokens: Mapping[str, Tensor] | None = None,
    ) -> None:
        """``layouts`` names each target layer's output layout (``nchw`` where absent);
        ``class_tokens`` holds, for ``tokens`` layers, each sample's class token (B, 1, C)."""
        self.runner = runner
        self.inputs = inputs
        self.layouts: Mapping[str, Layout] = layouts or {}
        self.class_tokens: Mapping[str, Tensor] = class_tokens or {}

    def lean_logits(self, inputs: Tensor) -> Tensor:
        """Logits of ``inputs`` without autograd, through the owner's lean copy (batch norm
        folded, channels-last) when it has one. For the many masked passes of the Score-CAM
        family."""
        return self.runner.lean_forward(inputs)

    def input_gradient(self, classes: Tensor, hooks: Iterable[tuple[Target, Hook]] = ()) -> Tensor:
        """``dY_c/dX`` (N, C, H, W) of each input's score for its class in ``classes``, from a
        fresh forward and backward pass with ``hooks`` active (Guided Backprop's rectifiers)."""
        return self.runner.input_gradient(self.inputs, classes, hooks)

    def logits(self, inputs: Tensor) -> Tensor:
        """The model's logits for ``inputs``, under the caller's grad mode (and its hooks)."""
        return self.runner.forward(inputs)

    def hooks(self, pairs: Iterable[tuple[Target, Hook]]) -> AbstractContextManager[None]:
        """Forward hooks on modules the probe handed out, removed in ``finally``."""
        return self.runner.hooks(pairs)

    def transformer(self) -> Transformer:
        """The model's encoder blocks, final norm and head; ValueError when it is no ViT."""
        return self.runner.transformer()

    def rectifiers(self) -> list[nn.Module]:
        """The model's ReLU and ReLU6 modules (Guided Backprop guides through them)."""
        return self.runner.rectifiers()

    def module_names(self, modules: Sequence[nn.Module]) -> list[str]:
        """Each module's path in the model ("" for one that is not among its named modules)."""
        return self.runner.module_names(modules)

    def input_of(self, module: nn.Module, inputs: Tensor) -> Tensor:
        """What ``module`` receives (its first argument) when the model runs on ``inputs``;
        the pass stops there, the rest never runs."""
        return self.runner.input_of(module, inputs)

    def linear_head_weights(self, channels: int) -> Tensor:
        """The weight matrix (classes, K) of the model's linear head (the owner's fact: the
        linear layer reading the global average of the layers the API lets CAM explain),
        which must read ``channels`` = K features."""
        weight = self.runner.linear_head_weight()
        if weight.shape[1] != channels:
            raise ValueError(
                f"the linear head reads {weight.shape[1]} features, not this layer's {channels}: "
                "CAM explains only the layer its linear head pools"
            )
        return weight

    def biases(self) -> dict[str, Tensor]:
        """The bias each module adds to its output, by module name."""
        return self.runner.biases()

    def gradients_at(
        self, names: Sequence[str], classes: Tensor
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """One forward and backward pass from a fresh copy of the inputs: that copy, ``dY_c/dX``
        and ``dY_c/dZ`` for the output ``Z`` of each named module that ran."""
        return self.runner.gradients_at(self.inputs, names, classes)

    def has_tail(self, layer: str) -> bool:
        """Whether :meth:`from_layer` runs only the network after ``layer``."""
        return self.runner.tail(layer) is not None

    def from_layer(self, layer: str, activations: Tensor, rows: Tensor) -> Tensor:
        """Logits when ``layer`` outputs ``activations`` (N, K, H, W).

        ``rows`` (N,) names the sample each row belongs to; without a tail the whole model
        runs on those samples' inputs with the layer's output replaced.
        """
        class_tokens = self.class_tokens.get(layer)
        native = to_native(
            activations, self.layouts.get(layer, "nchw"),
            None if class_tokens is None else class_tokens[rows],
        )
        return self.runner.from_layer(layer, native, self.inputs[rows])

    def layer_gradients(
        self, inputs: Tensor, layer: str, objective: Callable[[Tensor], Tensor]
    ) -> tuple[Tensor, Tensor]:
        """Activations at ``layer`` for ``inputs`` and the gradient of ``objective(logits)``,
        both (N, K, H, W) whatever the layer's own layout."""
        return self.runner.layer_gradients(inputs, layer, objective)
