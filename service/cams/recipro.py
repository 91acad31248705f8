"""Recipro-CAM and ViT-ReciproCAM: each position of a layer scored by the network's own tail.

Both methods mask a layer's output spatially, one copy per grid position that keeps only that
position (or its 3x3 neighbourhood, Gaussian-weighted), run every copy through the part of the
network after the layer, and read the target class's softmax score of each copy as the map's
value at its position. No gradient is taken, and the copies cost only the network's tail: on
mobilenet_v2's ``features.18`` (7 x 7) 49 passes through pooling and the classifier, on
``vit_b_16`` 196 passes through the last encoder block and the head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from service.cams.base import CAMMethod, LayerContext, MethodParam
from service.cams.passes import chunked
from service.models.anatomy import Transformer
from service.models.layout import token_grid

# The paper's 3x3 Gaussian: 1/4 at the centre, 1/8 beside it, 1/16 on the diagonals.
GAUSSIAN_3X3 = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16.0


def position_masks(height: int, width: int, gaussian: bool, like: Tensor) -> Tensor:
    """One spatial mask per grid position, row-major: (height * width, height, width).

    Mask ``p = i * width + j`` is 1 at ``(i, j)`` and 0 elsewhere; with ``gaussian`` it is the
    3x3 Gaussian centred on ``(i, j)``, cut off at the grid's border (not renormalised there).
    """
    count = height * width
    masks = torch.eye(count, dtype=like.dtype, device=like.device).view(count, 1, height, width)
    if gaussian:
        kernel = GAUSSIAN_3X3.to(like)[None, None]
        masks = F.conv2d(masks, kernel, padding=1)  # the kernel is symmetric: placed, not flipped
    return masks[:, 0]


class ReciproCAM(CAMMethod):
    """Recipro-CAM: the class score of each position alone, through the network's tail.

    Byun and Lee, "Recipro-CAM: Fast gradient-free visual explanation for convolutional neural
    networks", arXiv 2209.14074.

    For the target layer's activations ``A`` (K, H, W) and each position ``(i, j)``, the masked
    copy ``A^(i,j) = A * M^(i,j)`` keeps only that position (``M^(i,j)`` one there, zero
    elsewhere; with ``gaussian`` the 3x3 Gaussian ``[[1, 2, 1], [2, 4, 2], [1, 2, 1]] / 16``
    centred there). The map is ``S(i, j) = softmax(f_tail(A^(i,j)))_c``, ``f_tail`` the network
    after the layer and ``c`` the target class; min-max normalised like every map.

    Cost: one pass through the tail per position (``H * W``, 49 at mobilenet_v2's
    ``features.18``), ``batch_size`` copies at a time, no backward. The tail is cut from the
    model (:mod:`service.models.tail`); on pooling and a classifier it costs a small fraction of a
    forward, which ``extra_passes`` counts as a quarter (like Ablation-CAM's tail passes).
    Where no tail can be cut the whole model runs per copy with the layer's output replaced.
    """

    name = "reciprocam"
    full_precision = True
    title = "Recipro-CAM"
    # It perturbs the layer's output and reads the score, as Ablation-CAM does channel by
    # channel; its map is not a combination of the activations themselves.
    family = "perturbation"
    paper = "Byun and Lee 2022, arXiv 2209.14074"
    uses_gradients = False
    passes = "1 forward (shared) + 1 tail forward per grid position (batched)"
    extra_pass_cost = 0.25  # per position: a tail pass, far cheaper than a whole forward
    tail_passes = True  # a whole forward each after a layer without a tail
    params = (
        MethodParam("gaussian", "bool", False,
                    "keep each position's 3x3 neighbourhood under a Gaussian, not the position alone"),
        MethodParam("batch_size", "int", 64, "masked copies per tail pass (1..1024)", 1, 1024),
    )

    def extra_passes(self, channels: int, grid: tuple[int, int] | None = None) -> float:
        positions = grid[0] * grid[1] if grid else 1
        return positions * self.extra_pass_cost

    def saliency(self, context: LayerContext) -> Tensor:
        acts = context.activations
        height, width = acts.shape[-2:]
        masks = position_masks(height, width, bool(self.options["gaussian"]), acts)
        scores = torch.zeros(acts.shape[0], height * width, dtype=acts.dtype, device=acts.device)
        weight = self.pass_cost(context.probe.has_tail(context.layer))  # as the estimate counts
        for b in range(acts.shape[0]):
            for start, stop in chunked(height * width, int(self.options["batch_size"]), key="tail",
                                       weight=weight):
                copies = acts[b][None] * masks[start:stop, None]  # (n, K, H, W)
                rows = torch.full((stop - start,), b, dtype=torch.long, device=acts.device)
                logits = context.probe.from_layer(context.layer, copies, rows)
                scores[b, start:stop] = logits.softmax(dim=1)[:, context.classes[b]]
        return scores.view(acts.shape[0], height, width)


def target_block(layer: str, names: list[str]) -> int:
    """Index of the encoder block whose input tokens are masked for a target ``layer``.

    A layer inside block k (its ``ln_1``, the default on a ViT, or any other part) names
    block k; block k's own output is block k+1's input; any other layer (the last block's
    output, the final norm, the embedding) falls back to the last block.
    """
    for index, name in enumerate(names):
        if layer.startswith(name + "."):
            return index
        if layer == name:
            return min(index + 1, len(names) - 1)
    return len(names) - 1


def masked_tail(parts: Transformer, index: int, stream: Tensor, normed: Tensor) -> Tensor:
    """Logits when block ``index`` gets ``stream`` as its input and ``normed`` as its ``ln_1``
    output (N, T, D each), then the later blocks, the final norm and the head on the class token.

    The block's computation is torchvision's ``EncoderBlock.forward`` written out, so that its
    residual and its normalised branch can be masked separately.
    """
    block, attention = parts.blocks[index]
    attended, _ = attention(normed, normed, normed, need_weights=False)
    tokens = block.get_submodule("dropout")(attended) + stream
    tokens = tokens + block.get_submodule("mlp")(block.get_submodule("ln_2")(tokens))
    for later, _ in parts.blocks[index + 1:]:
        tokens = later(tokens)
    logits: Tensor = parts.head(parts.norm(tokens)[:, 0])
    return logits


_NOT_A_VIT = (
    "it masks the patch tokens entering an encoder block of a vision transformer (torchvision's "
    "VisionTransformer, e.g. vit_b_16), and {} has none; use reciprocam on this model"
)


class ViTReciproCAM(CAMMethod):
    """ViT-ReciproCAM: Recipro-CAM for vision transformers, by masking patch tokens.

    Byun and Lee, "ViT-ReciproCAM: Gradient and Attention-Free Visual Explanations for Vision
    Transformer", arXiv 2310.02588.

    At an encoder block with input tokens ``z = [z_cls, z_1 .. z_N]`` (the N patches row-major
    on the h x w grid), each patch position ``p`` gets a copy in which every token is weighted
    by the mask ``m^p`` over the patches (``gaussian``: the 3x3 Gaussian centred on ``p``, as
    in the paper; else one at ``p`` only) and the class token keeps weight 1:
    ``z^p = [z_cls, m^p_1 z_1 .. m^p_N z_N]``. As in the authors' implementation (OpenVINO
    XAI) the block's residual input and its first norm's output are masked alike, so the block
    computes ``x = z^p + MSA(m^p * LN_1(z))``, ``x + MLP(LN_2(x))``; the later blocks, the final
    norm and the head run on, and ``S(p) = softmax(head(LN(x_cls)))_c`` is the map on the patch
    grid (14 x 14 on vit_b_16).

    The masked block is the one the target layer belongs to (the default
    ``encoder_layer_11.ln_1`` masks the last block); a block's own output masks the next one;
    any other layer, the last block. Cost: a forward up to that block (stopped there) and one
    pass through the remaining blocks and the head per patch position, ``batch_size`` at a time:
    on vit_b_16's last block 196 passes of about a twelfth of a forward each.
    """

    name = "vit_reciprocam"
    full_precision = True
    title = "ViT-ReciproCAM"
    family = "perturbation"
    paper = "Byun and Lee 2023, arXiv 2310.02588"
    uses_gradients = False
    needs_transformer = True
    passes = "1 forward to the block + 1 pass of the remaining blocks per patch (batched)"
    # Per patch position: the last of vit_b_16's twelve blocks and the head, rounded up.
    extra_pass_cost = 0.1
    params = (
        MethodParam("gaussian", "bool", True,
                    "weight each patch's 3x3 neighbourhood by a Gaussian, not the patch alone"),
        MethodParam("batch_size", "int", 32, "masked token sets per pass (1..512)", 1, 512),
    )

    def extra_passes(self, channels: int, grid: tuple[int, int] | None = None) -> float:
        positions = grid[0] * grid[1] if grid else 1
        return 1.0 + positions * self.extra_pass_cost

    def saliency(self, context: LayerContext) -> Tensor:
        try:
            parts = context.probe.transformer()
        except ValueError:
            raise ValueError(_NOT_A_VIT.format("this model")) from None
        index = target_block(context.layer, context.probe.module_names([b for b, _ in parts.blocks]))
        block = parts.blocks[index][0]
        stream = context.probe.input_of(block, context.inputs)  # (B, T, D)
        size = (int(context.inputs.shape[-2]), int(context.inputs.shape[-1]))
        grid = token_grid(stream.shape[1] - 1, size)
        if grid is None:
            raise ValueError(f"{stream.shape[1] - 1} patch tokens do not form the input's grid")
        count = grid[0] * grid[1]
        masks = position_masks(grid[0], grid[1], bool(self.options["gaussian"]), stream).flatten(1)
        # The class token (position 0) is kept whole in every copy.
        weights = torch.cat([torch.ones_like(masks[:, :1]), masks], dim=1)[:, :, None]
        scores = torch.zeros(stream.shape[0], count, dtype=stream.dtype, device=stream.device)
        for b in range(stream.shape[0]):
            normed = block.get_submodule("ln_1")(stream[b])
            for start, stop in chunked(count, int(self.options["batch_size"]), key="tokens",
                                       weight=self.extra_pass_cost):
                chunk = weights[start:stop]
                logits = masked_tail(parts, index, stream[b] * chunk, normed * chunk)
                scores[b, start:stop] = logits.softmax(dim=1)[:, context.classes[b]]
        return scores.view(stream.shape[0], *grid)
