"""FullGrad: input-gradient and every bias-gradient, aggregated over the whole network."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from service.cams.base import CAMMethod, LayerContext


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
    full_precision = True
    title = "FullGrad"
    paper = "Srinivas and Fleuret 2019, arXiv 1905.00780"
    uses_gradients = False
    own_autograd = True
    layer_free = True
    grid = "input"
    passes = "1 forward (shared) + 1 forward and backward with input and bias gradients"
    extra_pass_cost = 2.0

    def saliency(self, context: LayerContext) -> Tensor:
        biases = context.probe.biases()
        inputs, input_gradient, gradients = context.probe.gradients_at(list(biases), context.classes)
        size = inputs.shape[-2:]
        total = channel_normalize((input_gradient * inputs).abs()).sum(dim=1)
        for name, grad in gradients.items():
            terms = channel_normalize((biases[name][None, :, None, None] * grad).abs()).sum(dim=1)
            upsampled = F.interpolate(terms[:, None], size=size, mode="bilinear", align_corners=False)
            total = total + upsampled[:, 0]
        return total
