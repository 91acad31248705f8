"""Gradient-weighted CAM methods that read the shared backward pass only.

Each costs nothing beyond the one forward and one backward pass that every gradient method of a
request shares: its map is a cheap function of the activations ``A`` and gradients ``g``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from service.cams.base import CAMMethod, LayerContext


def _gradients(context: LayerContext) -> Tensor:
    if context.gradients is None:
        raise ValueError("this method needs the gradients of the shared backward pass")
    return context.gradients


class GradCAM(CAMMethod):
    """Grad-CAM: each channel weighted by its spatially averaged gradient.

    Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
    Localization", ICCV 2017, arXiv 1610.02391.

    ``w_k = mean_ij dY_c/dA_k(i, j)``; map ``= ReLU(sum_k w_k A_k)``.
    """

    name = "gradcam"
    title = "Grad-CAM"
    paper = "Selvaraju et al. 2017, arXiv 1610.02391"

    def weights(self, context: LayerContext) -> Tensor:
        return _gradients(context).mean(dim=(2, 3))


class GradCAMPlusPlus(CAMMethod):
    """Grad-CAM++: positive gradients weighted per position by the paper's alpha.

    Chattopadhay et al., "Grad-CAM++: Improved Visual Explanations for Deep Convolutional
    Networks", WACV 2018, arXiv 1710.11063, eq. 19 (with an exponential output, the higher
    derivatives are powers of the first):

    ``alpha_k(i,j) = g^2 / (2 g^2 + (sum_ab A_k(a,b)) g^3)`` where ``g != 0``, else 0;
    ``w_k = sum_ij alpha_k(i,j) ReLU(g_k(i,j))``; map ``= ReLU(sum_k w_k A_k)``.
    """

    name = "gradcampp"
    title = "Grad-CAM++"
    paper = "Chattopadhay et al. 2018, arXiv 1710.11063"

    def weights(self, context: LayerContext) -> Tensor:
        grad = _gradients(context)
        return plusplus_weights(context.activations, grad, grad.pow(2), grad.pow(3))


def plusplus_weights(activations: Tensor, first: Tensor, second: Tensor, third: Tensor) -> Tensor:
    """Grad-CAM++'s ``sum_ij alpha ReLU(g)`` from the first three derivative estimates."""
    total = activations.sum(dim=(2, 3), keepdim=True)
    denominator = 2 * second + total * third
    # Where g == 0 the paper's alpha is 0/0: its term vanishes (ReLU(g) is 0) so alpha is set to 0.
    valid = (second != 0) & (denominator != 0)
    alpha = torch.where(valid, second / torch.where(valid, denominator, 1.0), 0.0)
    return (alpha * torch.relu(first)).sum(dim=(2, 3))


class XGradCAM(CAMMethod):
    """XGrad-CAM: gradients averaged with the activations as spatial weights.

    Fu et al., "Axiom-based Grad-CAM: Towards Accurate Visualization and Explanation of CNNs",
    BMVC 2020, arXiv 2008.02312.

    ``w_k = sum_ij g_k(i,j) A_k(i,j) / (sum_ij A_k(i,j) + eps)``; map ``= ReLU(sum_k w_k A_k)``.
    """

    name = "xgradcam"
    title = "XGrad-CAM"
    paper = "Fu et al. 2020, arXiv 2008.02312"

    def weights(self, context: LayerContext) -> Tensor:
        acts = context.activations
        return (_gradients(context) * acts).sum(dim=(2, 3)) / (acts.sum(dim=(2, 3)) + 1e-7)


class LayerCAM(CAMMethod):
    """Layer-CAM: every position weighted by its own positive gradient.

    Jiang et al., "LayerCAM: Exploring Hierarchical Class Activation Maps for Localization",
    IEEE TIP 2021.

    map ``= ReLU(sum_k ReLU(g_k) * A_k)``. When layers are fused, each normalised map is first
    scaled by ``tanh(2 * map)`` so shallow layers' weaker maps still count (the paper's gamma 2).
    """

    name = "layercam"
    title = "Layer-CAM"
    paper = "Jiang et al. 2021, IEEE TIP 30:5875"

    def contributions(self, context: LayerContext) -> Tensor:
        return torch.relu(_gradients(context)) * context.activations

    def fusion_scale(self, normalised: Tensor) -> Tensor:
        return torch.tanh(2.0 * normalised)


class HiResCAM(CAMMethod):
    """HiResCAM: gradients times activations element-wise, without spatial pooling.

    Draelos and Carin, "Use HiResCAM instead of Grad-CAM for faithful explanations of
    convolutional neural networks", arXiv 2011.08891.

    map ``= ReLU(sum_k g_k * A_k)``. Equal to Grad-CAM when the layer feeds global average
    pooling and one linear layer, since ``g`` is then constant over positions.
    """

    name = "hirescam"
    title = "HiResCAM"
    paper = "Draelos and Carin 2020, arXiv 2011.08891"

    def contributions(self, context: LayerContext) -> Tensor:
        return _gradients(context) * context.activations


class GradCAMElementWise(CAMMethod):
    """Element-wise Grad-CAM (pytorch-grad-cam): each channel's term rectified before summing.

    map ``= sum_k ReLU(g_k * A_k)``.
    """

    name = "gradcam_elementwise"
    title = "Grad-CAM element-wise"
    paper = "pytorch-grad-cam (Gildenblat et al.)"

    def contributions(self, context: LayerContext) -> Tensor:
        return torch.relu(_gradients(context) * context.activations)
