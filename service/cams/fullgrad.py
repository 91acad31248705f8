"""FullGrad: input-gradient and every bias-gradient, aggregated over the whole network."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.cams.base import CAMMethod, LayerContext
from service.cams.probe import gather_scores
from service.models.fold import batch_norm_affine
from service.models.hooks import forward_hooks


def effective_bias(module: nn.Module) -> Tensor | None:
    """The bias a layer adds to its output: a convolution's own, or batch norm's folded one.

    In eval mode batch norm computes ``gamma (x - mu) / sqrt(var + eps) + beta``, i.e. a bias
    ``beta - gamma mu / sqrt(var + eps)`` per channel (:func:`service.models.fold.batch_norm_affine`).
    """
    if isinstance(module, nn.BatchNorm2d):
        affine = batch_norm_affine(module)
        return None if affine is None else affine[1]
    if isinstance(module, nn.Conv2d) and module.bias is not None:
        return module.bias.detach()
    return None


def channel_normalize(maps: Tensor, eps: float = 1e-7) -> Tensor:
    """Min-max each channel of (B, K, h, w) to [0, 1] (a constant channel becomes 0)."""
    shifted = maps - maps.amin(dim=(2, 3), keepdim=True)
    return shifted / (shifted.amax(dim=(2, 3), keepdim=True) + eps)


class FullGrad(CAMMethod):
    """FullGrad: the full-gradient decomposition of the class score, over every layer.

    Srinivas and Fleuret, "Full-Gradient Representation for Neural Network Visualization",
    NeurIPS 2019, arXiv 1905.00780.

    ``S = psi(|dY_c/dX * X|) + sum_layers sum_k psi(|b_k * dY_c/dZ_k|)`` where ``Z`` is the
    output of each convolution or batch norm with a bias ``b`` and ``psi`` normalises each channel
    to [0, 1] and upsamples it to the input (the paper's and pytorch-grad-cam's ``|.|``). Ignores
    the target layer; the map is on the input's grid. Normalising then upsampling is linear, so
    each layer's channels are summed on their own grid first and upsampled once.
    """

    name = "fullgrad"
    title = "FullGrad"
    paper = "Srinivas and Fleuret 2019, arXiv 1905.00780"
    uses_gradients = False
    own_autograd = True
    layer_free = True
    grid = "input"
    passes = "1 forward (shared) + 1 forward and backward with input and bias gradients"
    extra_pass_cost = 2.0

    def saliency(self, context: LayerContext) -> Tensor:
        model, modules = context.probe.model, context.probe.modules
        biases = {name: b for name, m in modules.items() if (b := effective_bias(m)) is not None}
        captured: dict[str, Tensor] = {}

        def hook_for(name: str):  # type: ignore[no-untyped-def]
            def hook(_module: nn.Module, _inputs: object, output: Tensor) -> Tensor:
                # Kept in the graph (the input gradient flows through it); downstream in-place
                # activations act on the returned copy, so this stays the layer's own output.
                captured[name] = output
                return output.clone()

            return hook

        with forward_hooks((modules[name], hook_for(name)) for name in biases), torch.enable_grad():
            inputs = context.inputs.detach().clone().requires_grad_(True)
            logits = model(inputs)
            names = list(captured)
            found = torch.autograd.grad(
                gather_scores(logits, context.classes).sum(), [inputs, *(captured[n] for n in names)]
            )
        size = inputs.shape[-2:]
        total = channel_normalize((found[0] * inputs.detach()).abs()).sum(dim=1)
        for name, grad in zip(names, found[1:], strict=True):
            terms = channel_normalize((biases[name][None, :, None, None] * grad).abs()).sum(dim=1)
            upsampled = F.interpolate(terms[:, None], size=size, mode="bilinear", align_corners=False)
            total = total + upsampled[:, 0]
        return total
