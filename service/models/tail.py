"""The part of a network after a target layer, as its own module, so perturbations are cheap.

Ablation-CAM, Shapley-CAM and Finer-CAM change or differentiate a layer's activations and need
the class scores that follow. Running the whole network for each change repeats everything
before the layer, which is most of the cost; running only the tail (on mobilenet_v2's
``features.18``: pooling and the classifier) costs almost nothing.

The tail is cut from a ``torch.fx`` trace in which the target layer is a leaf: every node that
depends on the layer's output is copied, with that output as the tail's only input. When the
trace fails (data-dependent control flow) or the tail reads another value computed from the
input (a skip connection around the layer), there is no tail and the runner
(:meth:`service.models.runner.Runner.from_layer`) runs the whole model with the layer's output
replaced instead.

Tails are built here and kept by the model's owner (:class:`service.models.loader.LoadedModel`),
one per network and layer, next to its other capabilities; nothing is cached in this module.
"""

from __future__ import annotations

from torch import fx, nn


class _LeafTracer(fx.Tracer):
    def __init__(self, leaf: str) -> None:
        super().__init__()
        self.leaf = leaf

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name == self.leaf or super().is_leaf_module(m, module_qualified_name)


def build_tail(model: nn.Module, layer: str) -> nn.Module | None:
    """The module mapping ``layer``'s output to the model's output; ``None`` when there is none."""
    try:
        graph = _LeafTracer(layer).trace(model)
    except Exception:  # any tracing failure means: no tail, callers use the fallback
        return None
    starts = [n for n in graph.nodes if n.op == "call_module" and n.target == layer]
    if len(starts) != 1:
        return None
    tail = fx.Graph()
    env: dict[fx.Node, fx.Node] = {starts[0]: tail.placeholder("activations")}
    seen_start = False
    for node in graph.nodes:
        if node is starts[0]:
            seen_start = True
            continue
        if not seen_start:
            continue
        if node.op == "output":
            result = node.args[0]
            if not isinstance(result, fx.Node) or result not in env:
                return None
            tail.output(env[result])
            break
        inputs = node.all_input_nodes
        if not any(n in env for n in inputs):
            continue  # not downstream of the layer: copied on demand if it is a constant
        for dependency in inputs:
            if dependency in env:
                continue
            if dependency.op != "get_attr":
                return None  # the tail reads another input-dependent value
            env[dependency] = tail.node_copy(dependency)
        env[node] = tail.node_copy(node, lambda n: env[n])
    else:
        return None
    module = fx.GraphModule(model, tail)
    module.eval()
    return module
