"""Methods computed from the activations alone (no backward pass), and the random baseline."""

from __future__ import annotations

import torch
from torch import Tensor

from service.cams.base import CAMMethod, LayerContext, MethodParam
from service.cams.gradient import _gradients
from service.cams.linalg import first_component, kernel_first_component


class CAM(CAMMethod):
    """CAM: each channel weighted by the linear classifier's weight for the class.

    Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016,
    arXiv 1512.04150. Needs global average pooling then one linear layer after the target layer.

    ``w_k = W[c, k]``; map ``= ReLU(sum_k w_k A_k)``.
    """

    name = "cam"
    title = "CAM"
    family = "activation"
    paper = "Zhou et al. 2016, arXiv 1512.04150"
    uses_gradients = False
    needs_linear_head = True
    passes = "1 forward (shared)"

    def weights(self, context: LayerContext) -> Tensor:
        matrix = context.probe.linear_head_weights(context.activations.shape[1])
        return matrix[context.classes].to(context.activations.dtype)


class EigenCAM(CAMMethod):
    """Eigen-CAM: the activations' first principal component, class-agnostic.

    Muhammad and Yeasin, "Eigen-CAM: Class Activation Map using Principal Components",
    IJCNN 2020, arXiv 2008.00299.

    map ``= ReLU(X v_1)`` with ``X`` the centred positions x channels matrix and ``v_1`` its
    first right singular vector, signed to correlate positively with the mean activation.
    """

    name = "eigencam"
    title = "Eigen-CAM"
    family = "activation"
    paper = "Muhammad and Yeasin 2020, arXiv 2008.00299"
    uses_gradients = False
    passes = "1 forward (shared)"

    def saliency(self, context: LayerContext) -> Tensor:
        return torch.relu(first_component(context.activations))


class EigenGradCAM(CAMMethod):
    """Eigen-Grad-CAM (pytorch-grad-cam): Eigen-CAM on the gradient-weighted activations.

    map ``= ReLU(X v_1)`` with ``X`` the centred matrix of ``g * A``, signed to correlate
    positively with ``sum_k g_k A_k``.
    """

    name = "eigengradcam"
    title = "Eigen-Grad-CAM"
    paper = "pytorch-grad-cam (Gildenblat et al.)"

    def saliency(self, context: LayerContext) -> Tensor:
        return torch.relu(first_component(_gradients(context) * context.activations))


class KPCACAM(CAMMethod):
    """KPCA-CAM: Eigen-CAM with kernel PCA (sigmoid kernel).

    Karmani et al., "KPCA-CAM: Visual Explainability of Deep Computer Vision Models using Kernel
    PCA", MMSP 2024.

    map ``= ReLU(sqrt(l_1) a_1)``, the first component of the double-centred kernel matrix
    ``tanh(gamma <x_i, x_j> + 1)`` between positions (gamma ``1/K`` unless set).
    """

    name = "kpca_cam"
    title = "KPCA-CAM"
    family = "activation"
    paper = "Karmani et al. 2024, MMSP"
    uses_gradients = False
    passes = "1 forward (shared)"
    params = (
        MethodParam("gamma", "float", 0.0, "kernel coefficient; 0 means 1/channels (0..100)", 0.0, 100.0),
    )

    def saliency(self, context: LayerContext) -> Tensor:
        gamma = float(self.options["gamma"]) or None
        return torch.relu(kernel_first_component(context.activations, gamma=gamma))


class FEM(CAMMethod):
    """FEM, the Feature Explanation Method: channels weighted by how often they fire strongly.

    Fuad et al., "Features understanding in 3D CNNs for actions recognition in video", IPTA 2020.

    ``w_k = mean_ij [A_k(i,j) > mean(A_k) + k std(A_k)]``; map ``= ReLU(sum_k w_k A_k)``.
    """

    name = "fem"
    full_precision = True
    title = "FEM"
    family = "activation"
    paper = "Fuad et al. 2020, IPTA"
    uses_gradients = False
    passes = "1 forward (shared)"
    params = (MethodParam("k", "float", 2.0, "threshold in standard deviations (0..10)", 0.0, 10.0),)

    def weights(self, context: LayerContext) -> Tensor:
        acts = context.activations
        mean = acts.mean(dim=(2, 3), keepdim=True)
        std = acts.std(dim=(2, 3), keepdim=True, unbiased=False)
        return (acts > mean + float(self.options["k"]) * std).to(acts.dtype).mean(dim=(2, 3))


class RandomCAM(CAMMethod):
    """Random baseline: uniform weights in [-1, 1]; the floor a real method's scores must beat.

    ``w_k ~ U(-1, 1)`` from a generator seeded with ``seed`` per sample; map
    ``= ReLU(sum_k w_k A_k)``.
    """

    name = "random"
    full_precision = True
    title = "Random"
    family = "baseline"
    paper = "baseline (pytorch-grad-cam RandomCAM)"
    uses_gradients = False
    passes = "1 forward (shared)"
    params = (MethodParam("seed", "int", 0, "seed of the weights (0..2^31-1)", 0, 2**31 - 1),)

    def weights(self, context: LayerContext) -> Tensor:
        batch, channels = context.activations.shape[:2]
        generator = torch.Generator().manual_seed(int(self.options["seed"]))
        draw = torch.rand(channels, generator=generator) * 2 - 1
        return draw.expand(batch, channels).to(context.activations.device, context.activations.dtype)
