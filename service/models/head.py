"""Finding the classifier that CAM needs: global average pooling, then one linear layer.

CAM weights a layer's channels by the classifier's weights, which is only meaningful when the
logits are exactly ``W mean_ij A(i, j) + b``. That is checked numerically, not by module
types: one probe pass records the default layer's output ``A``, the last linear layer's input and
the logits, and the head counts only when its input is the spatial mean of ``A`` and its output
is the logits. The layers CAM may then explain are those whose output is that same ``A``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from service.models.hooks import forward_hooks, forward_pre_hook


@dataclass(frozen=True)
class LinearHead:
    name: str | None  # module path of the linear layer; None when the model has no such head
    layers: tuple[str, ...]  # layers whose output the head pools
    reason: str  # why there is no head ("" when there is one)


def find_linear_head(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    layers: Sequence[str],
    default_layer: str,
    input_size: tuple[int, int],
    device: torch.device,
) -> LinearHead:
    linears = [name for name, m in modules.items() if isinstance(m, nn.Linear)]
    if not linears:
        return LinearHead(None, (), "the model has no linear layer")
    head_name = linears[-1]
    head = modules[head_name]
    outputs: dict[str, Tensor] = {}
    head_input: list[Tensor] = []

    def record(name: str):  # type: ignore[no-untyped-def]
        def hook(_m: nn.Module, _inputs: object, output: object) -> None:
            if isinstance(output, Tensor):
                outputs[name] = output.detach().clone()

        return hook

    def record_input(_m: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        head_input.append(inputs[0].detach().clone())

    generator = torch.Generator().manual_seed(0)
    probe = torch.randn((1, 3, *input_size), generator=generator).to(device)
    with (
        forward_hooks((modules[name], record(name)) for name in layers),
        forward_pre_hook(head, record_input),
        torch.inference_mode(),
    ):
        logits = model(probe)
    pooled_source = outputs.get(default_layer)
    if pooled_source is None or not head_input:
        return LinearHead(None, (), "the default layer or the linear layer did not run")
    pooled = pooled_source.mean(dim=(2, 3))
    features = head_input[-1].flatten(1)
    if features.shape != pooled.shape or not torch.allclose(features, pooled, rtol=1e-4, atol=1e-5):
        return LinearHead(
            None, (), f"the last linear layer {head_name!r} does not read the global average of "
            f"the default layer {default_layer!r}",
        )
    with torch.inference_mode():
        direct = head(features)
    if not torch.allclose(direct, logits, rtol=1e-4, atol=1e-4):
        return LinearHead(None, (), f"the model's output is not the output of {head_name!r}")
    same = tuple(
        name for name in layers
        if name in outputs and outputs[name].shape == pooled_source.shape
        and torch.equal(outputs[name], pooled_source)
    )
    return LinearHead(head_name, same, "")
