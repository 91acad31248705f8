"""What a model is made of, as far as the methods that need a particular kind of network care.

Read once per loaded model (:meth:`service.models.loader.LoadedModel.info`) into the model's
catalogue entry, and by the methods themselves when they run: a vision transformer's encoder
blocks (LeGrad) and the rectifiers Guided Backprop guides through. CAM's linear head is found
numerically, in :mod:`service.models.head`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torchvision.models import VisionTransformer

# The modules Guided Backprop passes only positive gradients through; functional F.relu calls
# are not modules and are not seen.
RECTIFIERS = (nn.ReLU, nn.ReLU6)


def rectifiers(model: nn.Module) -> int:
    """How many :data:`RECTIFIERS` modules ``model`` has."""
    return sum(isinstance(m, RECTIFIERS) for m in model.modules())


@dataclass
class Transformer:
    """What LeGrad reads of a ViT: its encoder blocks and the classifier after them."""

    blocks: list[tuple[nn.Module, nn.MultiheadAttention]]
    norm: nn.Module  # the encoder's final norm
    head: nn.Module  # the classification head


def transformer_parts(model: nn.Module) -> Transformer:
    """A torchvision ViT's blocks, final norm and head; ValueError naming the need otherwise."""
    if not isinstance(model, VisionTransformer):
        raise ValueError(
            f"it needs a vision transformer (torchvision's VisionTransformer, e.g. vit_b_16), "
            f"working on the encoder blocks' attention or tokens, and "
            f"{type(model).__name__} has none; use gradcam, or reciprocam for a gradient-free map"
        )
    blocks = []
    for block in model.encoder.layers:
        attention = getattr(block, "self_attention", None)
        if not isinstance(attention, nn.MultiheadAttention):
            raise ValueError("legrad needs encoder blocks whose self_attention is nn.MultiheadAttention")
        if (
            not attention.batch_first
            or not attention._qkv_same_embed_dim
            or attention.bias_k is not None
            or attention.add_zero_attn
        ):
            raise ValueError("legrad needs batch-first self-attention with one Q/K/V projection")
        blocks.append((block, attention))
    return Transformer(blocks, model.encoder.ln, model.heads)
