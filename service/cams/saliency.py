"""Gradient saliency at input resolution: vanilla gradients, Guided Backprop, Guided Grad-CAM.

These maps live on the input's grid (one value per input pixel), not on a layer's. Each runs
its own forward and backward pass from a fresh copy of the input that requires grad, with
``torch.autograd.grad``, so no parameter's ``.grad`` is ever written; the hooks Guided Backprop
puts on the ReLUs are removed in ``finally``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.cams.base import CAMMethod, LayerContext
from service.models.hooks import Hook


class _PositiveGradient(torch.autograd.Function):
    """Identity forward; backward lets only positive gradients through (Guided Backprop)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad.clamp_min(0.0)


def _positive_gradient(_module: nn.Module, _inputs: object, output: Tensor) -> Tensor:
    return _PositiveGradient.apply(output)


def guided_rectifiers(rectifiers: Sequence[nn.Module]) -> list[tuple[nn.Module, Hook]]:
    """Forward hooks under which every ReLU / ReLU6 module in ``rectifiers`` back-propagates
    only positive gradients (on top of its own zeroing where its input was inactive);
    functional ``F.relu`` calls are not seen, and no rectifier modules is a ValueError."""
    if not rectifiers:
        raise ValueError("guided backpropagation needs ReLU or ReLU6 modules in the model")
    return [(module, _positive_gradient) for module in rectifiers]


def input_gradient(context: LayerContext, guided: bool = False) -> Tensor:
    """``dY_c/dX`` (B, C, H, W) for each sample's class, optionally through guided ReLUs."""
    probe = context.probe
    hooks = guided_rectifiers(probe.rectifiers()) if guided else []
    return probe.input_gradient(context.classes, hooks)


def channel_max(gradient: Tensor) -> Tensor:
    """The map (B, H, W): the largest absolute gradient over the colour channels."""
    return gradient.abs().amax(dim=1)


class Saliency(CAMMethod):
    """Vanilla gradient saliency: how much each input pixel moves the class score.

    Simonyan et al., "Deep Inside Convolutional Networks: Visualising Image Classification
    Models and Saliency Maps", ICLR workshop 2014, arXiv 1312.6034.

    map ``= max_c |dY_c/dX_c(i, j)|`` over the colour channels, at input resolution. Ignores the
    target layer.
    """

    name = "saliency"
    full_precision = True
    title = "Vanilla gradient saliency"
    family = "gradient"
    paper = "Simonyan et al. 2014, arXiv 1312.6034"
    uses_gradients = False
    own_autograd = True
    layer_free = True
    grid = "input"
    passes = "1 forward (shared) + 1 forward and backward to the input"
    extra_pass_cost = 2.0

    def saliency(self, context: LayerContext) -> Tensor:
        return channel_max(input_gradient(context))


class GuidedBackprop(CAMMethod):
    """Guided Backpropagation: the input gradient with negative gradients stopped at every ReLU.

    Springenberg et al., "Striving for Simplicity: The All Convolutional Net", ICLR workshop
    2015, arXiv 1412.6806.

    At each ReLU the backward signal is ``(input > 0) * ReLU(gradient)``; map ``= max_c |G_c|``
    of the resulting input gradient ``G``, at input resolution. Ignores the target layer; needs
    ReLU or ReLU6 modules.
    """

    name = "guided_backprop"
    full_precision = True
    title = "Guided Backpropagation"
    family = "gradient"
    paper = "Springenberg et al. 2015, arXiv 1412.6806"
    uses_gradients = False
    own_autograd = True
    layer_free = True
    grid = "input"
    needs_rectifiers = True
    passes = "1 forward (shared) + 1 forward and backward through guided ReLUs"
    extra_pass_cost = 2.0

    def saliency(self, context: LayerContext) -> Tensor:
        return channel_max(input_gradient(context, guided=True))


class GuidedGradCAM(CAMMethod):
    """Guided Grad-CAM: Guided Backprop's fine detail, restricted to where Grad-CAM points.

    Selvaraju et al., "Grad-CAM", ICCV 2017, arXiv 1610.02391, section 3.

    map ``= norm(max_c |G_c|) * up(ReLU(sum_k w_k A_k))`` with ``w_k = mean_ij dY_c/dA_k``, the
    Grad-CAM map upsampled bilinearly to the input; at input resolution. Fused layers fuse the
    products.
    """

    name = "guided_gradcam"
    full_precision = True
    title = "Guided Grad-CAM"
    family = "gradient"
    paper = "Selvaraju et al. 2017, arXiv 1610.02391"
    own_autograd = True
    grid = "input"
    needs_rectifiers = True
    passes = "1 forward + 1 backward (shared) + 1 forward and backward through guided ReLUs"
    extra_pass_cost = 2.0

    def saliency(self, context: LayerContext) -> Tensor:
        if context.gradients is None:
            raise ValueError("guided_gradcam needs the gradients of the shared backward pass")
        weights = context.gradients.mean(dim=(2, 3))
        cam = torch.relu((weights[:, :, None, None] * context.activations).sum(dim=1))
        size = context.inputs.shape[-2:]
        upsampled = F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        guided = channel_max(input_gradient(context, guided=True))
        peak = guided.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
        return (guided / peak) * upsampled
