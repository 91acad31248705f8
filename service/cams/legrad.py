"""LeGrad: a vision transformer explained by the gradients of its attention maps."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.cams.base import CAMMethod, LayerContext, MethodParam
from service.cams.probe import Probe, gather_scores
from service.models.layout import token_grid


def attention_with_probabilities(
    attention: nn.MultiheadAttention, tokens: Tensor
) -> tuple[Tensor, Tensor]:
    """Self-attention of ``tokens`` (B, T, D) recomputed in full: its output and its
    post-softmax probabilities (B, heads, T, T), the latter a leaf that requires grad."""
    batch, count, width = tokens.shape
    heads = attention.num_heads
    per_head = width // heads
    query, key, value = F.linear(tokens, attention.in_proj_weight, attention.in_proj_bias).chunk(3, -1)

    def split(t: Tensor) -> Tensor:
        return t.reshape(batch, count, heads, per_head).transpose(1, 2)

    scores = split(query) @ split(key).transpose(-2, -1) / math.sqrt(per_head)
    probabilities = scores.softmax(dim=-1).detach().requires_grad_(True)
    mixed = (probabilities @ split(value)).transpose(1, 2).reshape(batch, count, width)
    return attention.out_proj(mixed), probabilities


class LeGrad(CAMMethod):
    """LeGrad: positive gradients of each block's score with respect to its attention maps.

    Bousselham et al., "LeGrad: An Explainability Method for Vision Transformers via Feature
    Formation Sensitivity", arXiv 2404.03214.

    For each encoder block ``l`` with output tokens ``z^l`` (B, T, D) and post-softmax attention
    ``P^l`` (B, heads, T, T), the block's own class score is the classifier applied to its
    tokens, ``s^l = head(LN(mean_t z^l_t))`` (the authors' code and TorchCAM 0.5 pool the mean
    token; ``class_token`` reads ``z^l_0`` instead, as the ViT's own classifier does), and

    ``E^l = mean_{heads, queries} ReLU(ds^l_c / dP^l)``, a value per key token;
    map ``= mean_l E^l`` over the patch keys (the class-token key dropped), on the patch grid.

    The target layer is ignored: the map always lies on the ViT's patch grid (14 x 14 on
    vit_b_16). The attention probabilities are recomputed from the blocks' own projections
    (torchvision's blocks do not return them) by forward hooks that are removed in ``finally``;
    gradients come from ``torch.autograd.grad``, so no parameter's ``.grad`` is touched. Example:
    ``POST /explain`` with ``methods=legrad`` on a model whose architecture is ``vit_b_16``.
    """

    name = "legrad"
    title = "LeGrad"
    family = "gradient"
    paper = "Bousselham et al. 2024, arXiv 2404.03214"
    uses_gradients = False
    own_autograd = True
    needs_transformer = True
    grid = "own"  # the patch grid, whatever the target layer
    passes = "1 forward (shared) + 1 forward recording attention + 1 short backward per block"
    extra_pass_cost = 2.0
    params = (
        MethodParam("blocks", "int", 0, "only the last k encoder blocks; 0 means all (0..1000)",
                    0, 1000),
        MethodParam("class_token", "bool", False,
                    "score each block through its class token instead of its mean token"),
    )

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        # The map ignores the layer: one computation serves every layer of a round.
        self._last: tuple[Probe, Tensor, Tensor] | None = None

    def saliency(self, context: LayerContext) -> Tensor:
        last = self._last
        if last is not None and last[0] is context.probe and torch.equal(last[1], context.classes):
            return last[2]
        found = self._relevance(context.probe, context.inputs, context.classes)
        self._last = (context.probe, context.classes, found)
        return found

    def _relevance(self, probe: Probe, inputs: Tensor, classes: Tensor) -> Tensor:
        parts = probe.transformer()
        blocks = parts.blocks[-int(self.options["blocks"]):] if self.options["blocks"] else parts.blocks
        tokens: list[Tensor] = []
        probabilities: list[Tensor] = []

        def record_tokens(_m: nn.Module, _inputs: object, output: Tensor) -> None:
            tokens.append(output)

        def recompute_for(attention: nn.MultiheadAttention) -> Callable[..., tuple[Tensor, None]]:
            def hook(_m: nn.Module, args: tuple[Tensor, ...], _output: object) -> tuple[Tensor, None]:
                query, key, value = args[:3]
                if not (query is key is value):
                    raise ValueError("legrad needs self-attention (the same query, key and value)")
                output, found = attention_with_probabilities(attention, query)
                probabilities.append(found)
                return output, None

            return hook

        recording = probe.hooks(
            pair for block, attention in blocks
            for pair in ((attention, recompute_for(attention)), (block, record_tokens))
        )
        with recording, torch.enable_grad():
            probe.logits(inputs.detach().clone())
            maps = []
            for index, (z, p) in enumerate(zip(tokens, probabilities, strict=True)):
                pooled = z[:, 0] if self.options["class_token"] else z.mean(dim=1)
                scores = gather_scores(parts.head(parts.norm(pooled)), classes)
                (gradient,) = torch.autograd.grad(
                    scores.sum(), [p], retain_graph=index < len(tokens) - 1
                )
                # float32 from here whatever the forward ran in (CAMSERVE_PRECISION), as the
                # extractor gives the other methods their gradients.
                maps.append(gradient.float().relu().mean(dim=(1, 2))[:, 1:])
        relevance = torch.stack(maps).mean(dim=0)  # (B, T - 1)
        grid = token_grid(relevance.shape[1], (int(inputs.shape[-2]), int(inputs.shape[-1])))
        if grid is None:
            raise ValueError(f"{relevance.shape[1]} patch tokens do not form the input's grid")
        return relevance.reshape(relevance.shape[0], *grid)
