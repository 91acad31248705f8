"""Extra passes for methods that need more than the shared forward/backward: the methods' runner.

A :class:`Probe` is built for each round of an :func:`~service.cams.extractor.explain_batch`
call, over the samples of that round, and is the one way a method runs or reads the model. It
runs the model on other inputs (Score-CAM's masked images, through the lean copy), from a target
layer on with replaced activations (Ablation-CAM's ablated channels, via the cheap tail of
:mod:`service.cams.tail`), gradients at a layer for other inputs (Smooth Grad-CAM++'s noisy
copies), at the input (the saliency family) or at every biased module (FullGrad), and reads
the classifier's weights (CAM) and a ViT's blocks (LeGrad). Every hook it registers is removed
in ``finally``; gradients are taken with ``torch.autograd.grad``, so the model's parameters never
receive a ``.grad``.

Methods see every layer as (N, K, H, W); a layer whose output has another layout (channels
last, or a class token and patch tokens, see :mod:`service.models.layout`) gets activations put
back into that layout before the model runs on from it, the class token being the sample's own
from the shared forward pass, and has its activations and gradients brought to the grid.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from service.cams.tail import tail_of
from service.cams.twin import twin_forward
from service.models.anatomy import Transformer, transformer_parts
from service.models.fold import effective_bias
from service.models.hooks import forward_hook, forward_hooks, forward_pre_hook
from service.models.layout import Layout, layout_of, to_grid, to_native


@contextmanager
def replaced_output(module: nn.Module, replacement: Tensor) -> Iterator[None]:
    """While active, ``module`` returns ``replacement`` instead of what it computed."""

    def hook(_module: nn.Module, _inputs: object, _output: object) -> Tensor:
        return replacement

    with forward_hook(module, hook):
        yield


def differentiable_attention() -> AbstractContextManager[object]:
    """Attention kernels that autograd can differentiate twice, while gradients are on.

    The fused CPU attention kernels have no double backward, which Shapley-CAM's
    Hessian-vector product through a transformer needs; the plain math kernel has one.
    """
    if not torch.is_grad_enabled():
        return nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def gather_scores(logits: Tensor, classes: Tensor) -> Tensor:
    """Each row's score for its own class: (N, C), (N,) -> (N,)."""
    return logits.gather(1, classes.view(-1, 1)).squeeze(1)


class _Reached(Exception):
    """Stops a forward pass once :meth:`Probe.input_of` has what it needs."""


class Probe:
    def __init__(
        self,
        model: nn.Module,
        modules: Mapping[str, nn.Module],
        inputs: Tensor,
        layouts: Mapping[str, Layout] | None = None,
        class_tokens: Mapping[str, Tensor] | None = None,
        lean: nn.Module | None = None,
    ) -> None:
        """``layouts`` names each target layer's output layout (``nchw`` where absent);
        ``class_tokens`` holds, for ``tokens`` layers, each sample's class token (B, 1, C);
        ``lean`` is the model's lean copy (:meth:`service.models.loader.LoadedModel.make_lean`)
        when its owner has one."""
        self.model = model
        self.modules = modules
        self.inputs = inputs
        self.layouts: Mapping[str, Layout] = layouts or {}
        self.class_tokens: Mapping[str, Tensor] = class_tokens or {}
        self.lean = lean

    def lean_logits(self, inputs: Tensor) -> Tensor:
        """Logits of ``inputs`` without autograd, through the lean copy (batch norm folded,
        channels-last): its owner's, else a twin made once for this model
        (:mod:`service.cams.twin`). For the many masked passes of the Score-CAM family."""
        return twin_forward(self.lean if self.lean is not None else self.model, inputs)

    def input_gradient(
        self,
        classes: Tensor,
        around: Callable[[nn.Module], AbstractContextManager[object]] | None = None,
    ) -> Tensor:
        """``dY_c/dX`` (N, C, H, W) of each input's score for its class in ``classes``, from a
        fresh forward and backward pass; ``around(model)`` is active during the pass (Guided
        Backprop's guided rectifiers)."""
        with torch.enable_grad():
            inputs = self.inputs.detach().clone().requires_grad_(True)
            with around(self.model) if around is not None else nullcontext():
                logits = self.model(inputs)
            (gradient,) = torch.autograd.grad(gather_scores(logits, classes).sum(), [inputs])
        return gradient

    def logits(self, inputs: Tensor) -> Tensor:
        """The model's logits for ``inputs``, under the caller's grad mode (and its hooks)."""
        output: Tensor = self.model(inputs)
        return output

    def transformer(self) -> Transformer:
        """The model's encoder blocks, final norm and head; ValueError when it is no ViT."""
        return transformer_parts(self.model)

    def module_names(self, modules: Sequence[nn.Module]) -> list[str]:
        """Each module's path in the model ("" for one that is not among its named modules)."""
        names = {id(module): name for name, module in self.modules.items()}
        return [names.get(id(module), "") for module in modules]

    def input_of(self, module: nn.Module, inputs: Tensor) -> Tensor:
        """What ``module`` receives (its first argument) when the model runs on ``inputs``;
        the pass stops there, the rest never runs."""
        found: list[Tensor] = []

        def record(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            found.append(args[0].detach())
            raise _Reached

        try:
            with forward_pre_hook(module, record):
                self.model(inputs)
        except _Reached:
            pass
        if not found:
            raise RuntimeError("the module did not run in the model's forward pass")
        return found[0]

    def classifier_weights(self, channels: int) -> Tensor:
        """The weight matrix (classes, K) of the last linear layer that reads ``channels`` = K
        features (CAM's head; the API has checked it reads their global average)."""
        candidates = [
            m for m in self.modules.values() if isinstance(m, nn.Linear) and m.in_features == channels
        ]
        if not candidates:
            raise ValueError(f"no linear layer reads {channels} features: CAM needs a linear head")
        return candidates[-1].weight

    def biases(self) -> dict[str, Tensor]:
        """The bias each module adds to its output, by module name (convolutions and batch
        norms that have one; :func:`service.models.fold.effective_bias`)."""
        return {name: b for name, m in self.modules.items() if (b := effective_bias(m)) is not None}

    def gradients_at(
        self, names: Sequence[str], classes: Tensor
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """One forward and backward pass from a fresh copy of the inputs: that copy, ``dY_c/dX``
        and ``dY_c/dZ`` for the output ``Z`` of each named module that ran (in the order they
        ran, in their own layout), ``Y_c`` each input's score for its class in ``classes``."""
        captured: dict[str, Tensor] = {}

        def hook_for(name: str) -> Callable[[nn.Module, object, Tensor], Tensor]:
            def hook(_module: nn.Module, _inputs: object, output: Tensor) -> Tensor:
                # Kept in the graph (the input gradient flows through it); downstream in-place
                # activations act on the returned copy, so this stays the module's own output.
                captured[name] = output
                return output.clone()

            return hook

        with forward_hooks((self.modules[name], hook_for(name)) for name in names), torch.enable_grad():
            inputs = self.inputs.detach().clone().requires_grad_(True)
            logits = self.model(inputs)
            ran = list(captured)
            found = torch.autograd.grad(
                gather_scores(logits, classes).sum(), [inputs, *(captured[name] for name in ran)]
            )
        return inputs.detach(), found[0], dict(zip(ran, found[1:], strict=True))

    def from_layer(self, layer: str, activations: Tensor, rows: Tensor) -> Tensor:
        """Logits when ``layer`` outputs ``activations`` (N, K, H, W).

        ``rows`` (N,) names the sample each row belongs to; without a tail the whole model
        runs on those samples' inputs with the layer's output replaced.
        """
        class_tokens = self.class_tokens.get(layer)
        activations = to_native(
            activations, self.layouts.get(layer, "nchw"),
            None if class_tokens is None else class_tokens[rows],
        )
        tail = tail_of(self.model, layer)
        with differentiable_attention():
            if tail is not None:
                output: Tensor = tail(activations)
                return output
            with replaced_output(self.modules[layer], activations):
                return self.model(self.inputs[rows])

    def layer_gradients(
        self, inputs: Tensor, layer: str, objective: Callable[[Tensor], Tensor]
    ) -> tuple[Tensor, Tensor]:
        """Activations at ``layer`` for ``inputs`` and the gradient of ``objective(logits)``.

        Both (N, K, H, W), whatever the layer's own layout.
        """
        captured: list[Tensor] = []

        def hook(_module: nn.Module, _inputs: object, output: Tensor) -> Tensor:
            leaf = output.detach().requires_grad_(True)
            captured.append(leaf)
            return leaf.clone()

        with forward_hook(self.modules[layer], hook), torch.enable_grad():
            logits = self.model(inputs)
            (gradient,) = torch.autograd.grad(objective(logits), [captured[-1]])
        size = (int(inputs.shape[-2]), int(inputs.shape[-1]))
        layout = layout_of(captured[-1].shape, size) or "nchw"
        return to_grid(captured[-1].detach(), layout, size), to_grid(gradient, layout, size)
