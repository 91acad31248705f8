"""A gradient-free twin of a model for methods that run it on many perturbed inputs.

The Score-CAM family runs the whole network once per channel (about 1,200 passes for
mobilenet_v2's last layer), never needs gradients through those passes, and dominates the cost
of every request that asks for it. Its passes go through a twin of the served model that does
the same arithmetic in fewer steps:

- batch normalisation folded into the convolution before it (:mod:`service.models.fold`, the
  same folding an inference compiler applies: ``W' = W * g / s``, ``b' = (b - m) * g / s + beta``);
- weights in channels-last layout, the layout oneDNN's CPU convolutions and CUDA's tensor cores
  run fastest, fed channels-last inputs.

The twin's logits equal the model's up to float rounding (about 1e-5 on mobilenet_v2's logits).
A model that ``torch.fx`` cannot trace (data-dependent control flow), or one already folded and
channels-last (the worker's copy, folded the same way), gets no twin: the model itself is used.
Twins are built once per model object, under a lock, and live as long as it.
The served model is never modified.
"""

from __future__ import annotations

import logging
import threading
import weakref

import torch
from torch import Tensor, nn

from service.models.fold import conv_bn_pairs, folded_copy, traced_graph

log = logging.getLogger(__name__)

_twins: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def already_lean(model: nn.Module) -> bool:
    """No batch norm left to fold and convolution weights already channels-last (the worker's
    folded copy under ``CAMSERVE_CHANNELS_LAST``): a twin would only be a second copy."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return (
        not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        and bool(convs)
        and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    )


def build_twin(model: nn.Module) -> nn.Module:
    """A folded, channels-last copy of ``model`` in eval mode; ``model`` itself when it cannot
    trace or is already folded and channels-last."""
    if already_lean(model):
        return model
    graph = traced_graph(model)
    if graph is None:  # the model itself still works
        log.info("no folded twin for %s: it cannot be traced", type(model).__name__)
        return model
    folded = folded_copy(model, conv_bn_pairs(model, graph)).module.eval()
    # Hooks copied along with the modules must not fire in the twin's passes.
    for module in folded.modules():
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    for parameter in folded.parameters():
        parameter.requires_grad_(False)
    return folded.to(memory_format=torch.channels_last).eval()


def twin_of(model: nn.Module) -> nn.Module:
    """The cached twin of ``model`` (built on first use); ``model`` itself when already lean."""
    if already_lean(model):  # not cached: an entry whose value is its own key would never go
        return model
    with _lock:
        twin = _twins.get(model)
        if twin is None:
            twin = build_twin(model)
            _twins[model] = twin
        return twin


def twin_forward(model: nn.Module, inputs: Tensor) -> Tensor:
    """Logits of ``inputs`` (N, C, H, W) through ``model``'s twin, without autograd."""
    twin = twin_of(model)
    with torch.inference_mode():
        return twin(inputs.contiguous(memory_format=torch.channels_last))
