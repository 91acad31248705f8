"""The narrow runner of a loaded model: the one way code outside :mod:`service.models` runs it.

A :class:`Runner` is handed out by the model's owner (:meth:`service.models.loader.LoadedModel.runner`)
over one of the owner's two networks, the model itself or its lean copy, and carries the
owner's facts that a computation needs. It is everything the CAM methods (through their
:class:`~service.cams.probe.Probe`), the worker, the introspection routes and the benchmark do
with a model:

- :meth:`Runner.forward` (under the caller's grad mode and hooks) and :meth:`Runner.lean_forward`
  (no autograd, through the lean copy: the Score-CAM family's many masked passes);
- :meth:`Runner.from_layer`: the logits when a layer outputs given activations, through the
  owner's cached tail of the network after that layer (:mod:`service.models.tail`) or, where
  there is none, through the whole network with the layer's output replaced;
- gradients: at a layer (:meth:`Runner.layer_gradients`), at the input
  (:meth:`Runner.input_gradient`), at several modules and the input at once
  (:meth:`Runner.gradients_at`), always with ``torch.autograd.grad``, so no parameter ever
  receives a ``.grad``;
- :meth:`Runner.hooks`: forward hooks on modules named or handed out here, through the one hook
  context manager (:mod:`service.models.hooks`), removed in ``finally``;
- the parts that methods read: the linear head's weights (CAM, from the owner's ``linear_head``
  fact, never guessed), a ViT's blocks (LeGrad, ViT-ReciproCAM), the rectifiers (Guided
  Backprop), every module's bias (FullGrad).

A bare ``nn.Module`` can be run the same way (``Runner(module)``, in tests); it then has no lean
copy (gradient-free passes run through it), keeps its own tails, and knows no linear head
unless told.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from service.models.anatomy import RECTIFIERS, Transformer, transformer_parts
from service.models.fold import channels_last_weights, effective_bias
from service.models.hooks import Hook, forward_hook, forward_hooks, forward_pre_hook
from service.models.layout import layout_of, to_grid
from service.models.tail import Tails

# A module of the network, by its name in ``named_modules()`` or as handed out by the runner.
Target = str | nn.Module


def gather_scores(logits: Tensor, classes: Tensor) -> Tensor:
    """Each row's score for its own class: (N, C), (N,) -> (N,)."""
    return logits.gather(1, classes.view(-1, 1)).squeeze(1)


def differentiable_attention() -> AbstractContextManager[object]:
    """Attention kernels that autograd can differentiate twice, while gradients are on.

    The fused CPU attention kernels have no double backward, which Shapley-CAM's
    Hessian-vector product through a transformer needs; the plain math kernel has one.
    """
    if not torch.is_grad_enabled():
        return nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


@contextmanager
def replaced_output(module: nn.Module, replacement: Tensor) -> Iterator[None]:
    """While active, ``module`` returns ``replacement`` instead of what it computed."""

    def hook(_module: nn.Module, _inputs: object, _output: object) -> Tensor:
        return replacement

    with forward_hook(module, hook):
        yield


class _Reached(Exception):
    """Stops a forward pass once :meth:`Runner.input_of` has what it needs."""


class Runner:
    def __init__(
        self,
        network: nn.Module,
        modules: Mapping[str, nn.Module] | None = None,
        *,
        gradient_free: Callable[[], nn.Module] | None = None,
        tails: Tails | None = None,
        linear_head: str | None = None,
        through: str = "model",
    ) -> None:
        """``network`` runs everything but :meth:`lean_forward`, which runs the network
        ``gradient_free()`` returns (the owner's lean copy, or its fallback; ``network`` without
        one); ``tails`` is the owner's :class:`~service.models.tail.Tails` of ``network`` (traced
        at load; a bare runner traces its network on its first :meth:`tail`); ``linear_head``
        names CAM's classifier (the owner's fact); ``through`` says which of the owner's
        networks ``network`` is (``model`` or ``lean``)."""
        self._network = network
        self._modules: Mapping[str, nn.Module] = (
            modules if modules is not None else dict(network.named_modules())
        )
        self._gradient_free = gradient_free
        self._tails = tails
        self.linear_head = linear_head
        self.through = through

    # Running the network.

    def forward(self, inputs: Tensor) -> Tensor:
        """The logits of ``inputs``, under the caller's grad mode (and hooks)."""
        output: Tensor = self._network(inputs)
        return output

    def lean_forward(self, inputs: Tensor) -> Tensor:
        """The logits of ``inputs`` (N, C, H, W) without autograd, through the owner's network
        for such passes (batch norm folded, channels-last), else through the network itself;
        the inputs are laid out as that network's weights are (a mix is several times slower)."""
        network = self._gradient_free() if self._gradient_free is not None else self._network
        layout = torch.channels_last if channels_last_weights(network) else torch.contiguous_format
        with torch.inference_mode():
            output: Tensor = network(inputs.contiguous(memory_format=layout))
        return output

    def hooks(self, pairs: Iterable[tuple[Target, Hook]]) -> AbstractContextManager[None]:
        """Each ``(module, hook)`` pair's hook as a forward hook on its module while active
        (:func:`service.models.hooks.forward_hooks`); a hook that returns a value replaces
        the module's output."""
        return forward_hooks((self._module(target), hook) for target, hook in pairs)

    def outputs(self, inputs: Tensor, layers: Sequence[str]) -> dict[str, object]:
        """What each named module outputs (detached) in one gradient-free pass of ``inputs``."""
        found: dict[str, object] = {}

        def record(name: str) -> Hook:
            def hook(_module: nn.Module, _inputs: object, output: object) -> None:
                found[name] = output.detach() if isinstance(output, Tensor) else output

            return hook

        with self.hooks((name, record(name)) for name in layers), torch.inference_mode():
            self._network(inputs)
        return found

    def tail(self, layer: str) -> nn.Module | None:
        """The network after ``layer`` as its own module (built once, kept by the owner);
        None when no such tail can be cut (:mod:`service.models.tail`)."""
        if self._tails is None:
            self._tails = Tails(self._network)
        return self._tails.get(layer)

    def from_layer(self, layer: str, activations: Tensor, inputs: Tensor) -> Tensor:
        """Logits when ``layer`` outputs ``activations`` (in the layer's own layout).

        Through the layer's tail when there is one; otherwise the whole network runs on
        ``inputs`` (one row per row of ``activations``) with the layer's output replaced.
        """
        tail = self.tail(layer)
        with differentiable_attention():
            if tail is not None:
                output: Tensor = tail(activations)
                return output
            with replaced_output(self._modules[layer], activations):
                return self.forward(inputs)

    def input_of(self, module: Target, inputs: Tensor) -> Tensor:
        """What ``module`` receives (its first argument) when the network runs on ``inputs``;
        the pass stops there, the rest never runs."""
        found: list[Tensor] = []

        def record(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            found.append(args[0].detach())
            raise _Reached

        try:
            with forward_pre_hook(self._module(module), record):
                self._network(inputs)
        except _Reached:
            pass
        if not found:
            raise RuntimeError("the module did not run in the model's forward pass")
        return found[0]

    # Gradients.

    def input_gradient(
        self, inputs: Tensor, classes: Tensor, hooks: Iterable[tuple[Target, Hook]] = ()
    ) -> Tensor:
        """``dY_c/dX`` (N, C, H, W) of each input's score for its class in ``classes``, from a
        fresh forward and backward pass with ``hooks`` active (Guided Backprop's rectifiers)."""
        with torch.enable_grad():
            leaf = inputs.detach().clone().requires_grad_(True)
            with self.hooks(hooks):
                logits = self.forward(leaf)
            (gradient,) = torch.autograd.grad(gather_scores(logits, classes).sum(), [leaf])
        return gradient

    def gradients_at(
        self, inputs: Tensor, names: Sequence[str], classes: Tensor
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """One forward and backward pass from a fresh copy of ``inputs``: that copy, ``dY_c/dX``
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

        with self.hooks((name, hook_for(name)) for name in names), torch.enable_grad():
            leaf = inputs.detach().clone().requires_grad_(True)
            logits = self.forward(leaf)
            ran = list(captured)
            found = torch.autograd.grad(
                gather_scores(logits, classes).sum(), [leaf, *(captured[name] for name in ran)]
            )
        return leaf.detach(), found[0], dict(zip(ran, found[1:], strict=True))

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

        with self.hooks([(layer, hook)]), torch.enable_grad():
            logits = self.forward(inputs)
            (gradient,) = torch.autograd.grad(objective(logits), [captured[-1]])
        size = (int(inputs.shape[-2]), int(inputs.shape[-1]))
        layout = layout_of(captured[-1].shape, size) or "nchw"
        return to_grid(captured[-1].detach(), layout, size), to_grid(gradient, layout, size)

    # The parts methods read.

    def linear_head_weight(self) -> Tensor:
        """The weight matrix (classes, K) of CAM's classifier, the owner's ``linear_head``."""
        if self.linear_head is None:
            raise ValueError(
                "CAM needs global average pooling followed by one linear layer, and this model "
                "has none"
            )
        head = self._modules[self.linear_head]
        if not isinstance(head, nn.Linear):
            raise ValueError(f"the linear head {self.linear_head!r} is not an nn.Linear")
        return head.weight

    def transformer(self) -> Transformer:
        """The network's encoder blocks, final norm and head; ValueError when it is no ViT."""
        return transformer_parts(self._network)

    def rectifiers(self) -> list[nn.Module]:
        """The network's ReLU and ReLU6 modules, in order (functional ``F.relu`` is not seen)."""
        return [m for m in self._network.modules() if isinstance(m, RECTIFIERS)]

    def biases(self) -> dict[str, Tensor]:
        """The bias each module adds to its output, by module name (convolutions and batch
        norms that have one; :func:`service.models.fold.effective_bias`)."""
        return {name: b for name, m in self._modules.items() if (b := effective_bias(m)) is not None}

    def convolution(self, layer: str) -> nn.Conv2d:
        """The convolution named ``layer``, whose kernels the introspection routes draw."""
        module = self._modules[layer]
        if not isinstance(module, nn.Conv2d):
            raise ValueError(f"layer {layer!r} is not a Conv2d")
        return module

    def module_names(self, modules: Sequence[nn.Module]) -> list[str]:
        """Each module's path in the network ("" for one that is not among its named modules)."""
        names = {id(module): name for name, module in self._modules.items()}
        return [names.get(id(module), "") for module in modules]

    def _module(self, target: Target) -> nn.Module:
        return self._modules[target] if isinstance(target, str) else target
