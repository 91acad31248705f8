"""Gradient-weighted CAM methods."""

from __future__ import annotations

from torch import Tensor

from service.cams.base import CAMMethod


class GradCAM(CAMMethod):
    """Grad-CAM: each channel weighted by its spatially averaged gradient.

    Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
    Localization", ICCV 2017, arXiv 1610.02391.

    ``w_k = mean_ij dY_c/dA_k(i, j)``; map ``= ReLU(sum_k w_k A_k)``.
    """

    name = "gradcam"
    title = "Grad-CAM"
    paper = "Selvaraju et al. 2017, arXiv 1610.02391"

    def weights(self, activations: Tensor, gradients: Tensor | None) -> Tensor:
        assert gradients is not None
        return gradients.mean(dim=(2, 3))
