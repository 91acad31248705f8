"""Gradient methods that run autograd themselves: other objectives, second order, noise.

They cannot reuse the shared backward pass (its objective is ``Y_c`` and it keeps no graph for a
second derivative), so they differentiate through the probe: from the target layer on (the cheap
tail), or from noisy copies of the input.
"""

from __future__ import annotations

import torch
from torch import Tensor

from service.cams.base import CAMMethod, LayerContext, MethodParam
from service.cams.gradient import plusplus_weights
from service.cams.passes import chunked
from service.cams.probe import gather_scores


class ShapleyCAM(CAMMethod):
    """Shapley-CAM: gradient corrected by the Hessian-vector product along the activations.

    Cai, "CAMs as Shapley Value-based Explainers", arXiv 2501.06261: a second-order estimate
    of each channel's Shapley value.

    ``w_k = mean_ij (g - 0.5 * H A)_k(i,j)`` with ``H A = d(g . A)/dA``, the gradient of ``g``
    along ``A``; map ``= ReLU(sum_k w_k A_k)``. Where the network after the layer is linear in
    it (global pooling then a linear layer) ``H A = 0`` and the map equals Grad-CAM's.
    """

    name = "shapleycam"
    full_precision = True
    title = "Shapley-CAM"
    paper = "Cai 2025, arXiv 2501.06261"
    uses_gradients = False
    own_autograd = True
    passes = "1 forward (shared) + tail forward, backward and double backward"
    extra_pass_cost = 3.0

    def weights(self, context: LayerContext) -> Tensor:
        rows = torch.arange(context.activations.shape[0], device=context.activations.device)
        with torch.enable_grad():
            acts = context.activations.detach().clone().requires_grad_(True)
            logits = context.probe.from_layer(context.layer, acts, rows)
            score = gather_scores(logits, context.classes).sum()
            (grad,) = torch.autograd.grad(score, [acts], create_graph=True)
            hvp = torch.zeros_like(grad)
            if grad.requires_grad:
                (found,) = torch.autograd.grad(
                    grad, [acts], grad_outputs=acts.detach(), allow_unused=True
                )
                if found is not None:
                    hvp = found
        return (grad.detach() - 0.5 * hvp.detach()).mean(dim=(2, 3))


class FinerCAM(CAMMethod):
    """Finer-CAM: Grad-CAM of the target's margin over its most similar classes.

    Zhang et al., "Finer-CAM: Spotting the Difference Reveals Finer Details for Visual
    Explanation", CVPR 2025, arXiv 2501.11309.

    With ``c'`` the ``comparisons`` classes whose logits are nearest to ``Y_c`` and ``p`` the
    softmax probabilities, the objective is ``S = sum_c' p_c' (Y_c - alpha Y_c') / sum_c' p_c'``
    (pytorch-grad-cam's weighting); ``w_k = mean_ij dS/dA_k(i,j)``; map ``= ReLU(sum_k w_k A_k)``.
    """

    name = "finercam"
    full_precision = True
    title = "Finer-CAM"
    paper = "Zhang et al. 2025, arXiv 2501.11309"
    uses_gradients = False
    own_autograd = True
    passes = "1 forward (shared) + tail forward and backward"
    extra_pass_cost = 2.0
    params = (
        MethodParam("alpha", "float", 1.0, "weight of the similar classes' scores (0..10)", 0.0, 10.0),
        MethodParam("comparisons", "int", 3, "how many nearest classes to compare with (1..20)", 1, 20),
    )

    def weights(self, context: LayerContext) -> Tensor:
        logits = context.logits
        distance = (logits - gather_scores(logits, context.classes)[:, None]).abs()
        distance.scatter_(1, context.classes[:, None], float("inf"))
        count = min(int(self.options["comparisons"]), logits.shape[1] - 1)
        others = distance.topk(count, dim=1, largest=False).indices  # (B, count)
        alpha = float(self.options["alpha"])
        rows = torch.arange(logits.shape[0], device=logits.device)
        with torch.enable_grad():
            acts = context.activations.detach().clone().requires_grad_(True)
            out = context.probe.from_layer(context.layer, acts, rows)
            probs = out.softmax(dim=1).gather(1, others)
            main = gather_scores(out, context.classes)[:, None]
            margin = (probs * (main - alpha * out.gather(1, others))).sum(1) / probs.sum(1)
            (grad,) = torch.autograd.grad(margin.sum(), [acts])
        return grad.mean(dim=(2, 3))


class SmoothGradCAMPlusPlus(CAMMethod):
    """Smooth Grad-CAM++: Grad-CAM++ with derivatives averaged over noisy copies of the input.

    Omeiza et al., "Smooth Grad-CAM++: An Enhanced Inference Level Visualization Technique for
    Deep Convolutional Neural Network Models", arXiv 1908.01224.

    ``D_p = mean_n g(X + eps_n)^p``, ``eps_n ~ N(0, std^2)``, n = 1..N; Grad-CAM++'s alpha and
    weights (eq. 19) with ``g^2 -> D_2``, ``g^3 -> D_3``, ``g -> D_1``, on the clean image's
    activations. The noise is drawn per sample from a generator seeded with ``seed``, so a map
    does not depend on the other images of its batch.
    """

    name = "smoothgradcampp"
    full_precision = True
    title = "Smooth Grad-CAM++"
    paper = "Omeiza et al. 2019, arXiv 1908.01224"
    uses_gradients = False
    own_autograd = True
    passes = "1 forward (shared) + N forward and backward (noisy copies, batched)"
    params = (
        MethodParam("num_samples", "int", 4, "noisy copies averaged (1..64)", 1, 64),
        MethodParam("std", "float", 0.3, "noise standard deviation on the normalised input (0..5)",
                    0.0, 5.0),
        MethodParam("seed", "int", 0, "seed of the noise (0..2^31-1)", 0, 2**31 - 1),
    )

    def extra_passes(self, channels: int, grid: tuple[int, int] | None = None) -> float:
        return 2.0 * int(self.options["num_samples"])  # a forward and a backward per copy

    def weights(self, context: LayerContext) -> Tensor:
        inputs = context.inputs
        count, std = int(self.options["num_samples"]), float(self.options["std"])
        noise = torch.stack([
            torch.randn((count, *inputs.shape[1:]),
                        generator=torch.Generator().manual_seed(int(self.options["seed"])))
            for _ in range(inputs.shape[0])
        ], dim=1).to(inputs.device, inputs.dtype)  # (N, B, C, H, W)
        noisy = (inputs[None] + std * noise).flatten(0, 1)
        classes = context.classes.repeat(count)
        found = []
        for start, stop in chunked(noisy.shape[0], noisy.shape[0], key="noisy"):
            chosen = classes[start:stop]

            def score(logits: Tensor, chosen: Tensor = chosen) -> Tensor:
                return gather_scores(logits, chosen).sum()

            _, part = context.probe.layer_gradients(noisy[start:stop], context.layer, score)
            found.append(part)
        grads = torch.cat(found).view(count, *context.activations.shape)
        return plusplus_weights(
            context.activations, grads.mean(0), grads.pow(2).mean(0), grads.pow(3).mean(0)
        )
