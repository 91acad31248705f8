"""Extra passes for methods that need more than the shared forward/backward.

A :class:`Probe` is built for each round of an :func:`~service.cams.extractor.explain_batch`
call, over the samples of that round. It runs the model on other inputs (Score-CAM's masked
images), from a target layer on with replaced activations (Ablation-CAM's ablated channels, via
the cheap tail of :mod:`service.cams.tail`), and gradients at a layer for other inputs (Smooth
Grad-CAM++'s noisy copies). Every hook it registers is removed in ``finally``; gradients are
taken with ``torch.autograd.grad``, so the model's parameters never receive a ``.grad``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from service.cams.tail import tail_of


@contextmanager
def replaced_output(module: nn.Module, replacement: Tensor) -> Iterator[None]:
    """While active, ``module`` returns ``replacement`` instead of what it computed."""

    def hook(_module: nn.Module, _inputs: object, _output: object) -> Tensor:
        return replacement

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def gather_scores(logits: Tensor, classes: Tensor) -> Tensor:
    """Each row's score for its own class: (N, C), (N,) -> (N,)."""
    return logits.gather(1, classes.view(-1, 1)).squeeze(1)


class Probe:
    def __init__(self, model: nn.Module, modules: Mapping[str, nn.Module], inputs: Tensor) -> None:
        self.model = model
        self.modules = modules
        self.inputs = inputs

    def forward(self, inputs: Tensor, batch_size: int = 0) -> Tensor:
        """Logits for ``inputs``, in chunks of ``batch_size`` rows (all at once when 0)."""
        if batch_size <= 0 or inputs.shape[0] <= batch_size:
            return self.model(inputs)
        return torch.cat([self.model(chunk) for chunk in inputs.split(batch_size)])

    def from_layer(self, layer: str, activations: Tensor, rows: Tensor) -> Tensor:
        """Logits when ``layer`` outputs ``activations`` (N, K, H, W).

        ``rows`` (N,) names the sample each row belongs to; without a tail the whole model
        runs on those samples' inputs with the layer's output replaced.
        """
        tail = tail_of(self.model, layer)
        if tail is not None:
            output: Tensor = tail(activations)
            return output
        with replaced_output(self.modules[layer], activations):
            return self.model(self.inputs[rows])

    def from_layer_chunked(
        self, layer: str, activations: Tensor, rows: Tensor, batch_size: int
    ) -> Tensor:
        """:meth:`from_layer` in chunks of ``batch_size`` rows."""
        return torch.cat([
            self.from_layer(layer, acts, idx)
            for acts, idx in zip(activations.split(batch_size), rows.split(batch_size), strict=True)
        ])

    def layer_gradients(
        self, inputs: Tensor, layer: str, objective: Callable[[Tensor], Tensor]
    ) -> tuple[Tensor, Tensor]:
        """Activations at ``layer`` for ``inputs`` and the gradient of ``objective(logits)``."""
        captured: list[Tensor] = []

        def hook(_module: nn.Module, _inputs: object, output: Tensor) -> Tensor:
            leaf = output.detach().requires_grad_(True)
            captured.append(leaf)
            return leaf.clone()

        handle = self.modules[layer].register_forward_hook(hook)
        try:
            with torch.enable_grad():
                logits = self.model(inputs)
                (gradient,) = torch.autograd.grad(objective(logits), [captured[-1]])
        finally:
            handle.remove()
        return captured[-1].detach(), gradient
