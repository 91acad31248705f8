"""Torch-free facts about loaded models, which the HTTP layer validates requests against."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerInfo:
    name: str
    shape: tuple[int, int, int]  # (channels, height, width) at the model's input size
    kind: str  # the module's class name, e.g. Conv2d
    # How the output holds that grid: nchw, nhwc (channels last) or tokens (class token, then
    # patches); see service.models.layout.
    layout: str = "nchw"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    display_name: str
    version: str
    architecture: str
    num_classes: int
    input_size: tuple[int, int]
    labels: tuple[str, ...]
    layers: tuple[LayerInfo, ...]
    default_layer: str
    device: str
    # CAM's classifier: the linear layer reading the global average of ``linear_head_layers``;
    # None (and the reason in ``linear_head_problem``) when the model has no such head.
    linear_head: str | None = None
    linear_head_layers: tuple[str, ...] = ()
    linear_head_problem: str = "not checked"
    # LeGrad's encoder blocks with nn.MultiheadAttention (a torchvision ViT); 0 (and the reason
    # in ``attention_problem``) when the model has none.
    attention_blocks: int = 0
    attention_problem: str = "not checked"
    # nn.ReLU / nn.ReLU6 modules, through which Guided Backprop passes only positive gradients.
    rectifiers: int = 0
    # The layers after which the network runs on its own (a cheap tail, service.models.tail):
    # a tail method's passes from any other layer cost a whole forward each.
    tail_layers: frozenset[str] = frozenset()
    # What it was trained on (see ModelSpec): DICOM modalities and a few words for people.
    modalities: tuple[str, ...] = ()
    domain: str | None = None

    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]
