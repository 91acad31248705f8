"""The part of a network after a target layer, as its own module, so perturbations are cheap.

Ablation-CAM, Shapley-CAM and Finer-CAM change or differentiate a layer's activations and need
the class scores that follow. Running the whole network for each change repeats everything
before the layer, which is most of the cost; running only the tail (on mobilenet_v2's
``features.18``: pooling and the classifier) costs almost nothing.

The tail is cut from a ``torch.fx`` trace: every node that depends on the layer's output is
copied, with that output as the tail's only input. When the trace fails (data-dependent
control flow) or the tail reads another value computed from the input (a skip connection
around the layer), there is no tail and the runner
(:meth:`service.models.runner.Runner.from_layer`) runs the whole model with the layer's output
replaced instead.

The service reads every layer's tail from ONE trace per network, made at load
(:class:`Tails`; the owner, :class:`service.models.loader.LoadedModel`, keeps one per network
and publishes which layers have a tail in its capability map): tracing patches
``nn.Module.__call__`` process-wide, so it must not run while another device slot serves, and
tracing each layer separately (as a leaf) would cost seconds at load; the tests compare
:class:`Tails` with exactly that. Nothing is cached at module level.
"""

from __future__ import annotations

from torch import fx, nn


class Tails:
    """One network's tails by layer, all read from one ``torch.fx`` trace made here, at load.

    Tracing patches ``nn.Module.__call__`` process-wide while it runs, so a trace during a
    request would break another device thread's forward at that moment; building a
    ``GraphModule`` from a graph patches nothing (it only generates and compiles the graph's
    code). So the network is traced once, with fx's default leaves, when the owner is made, and
    every later question is answered from that graph:

    - a layer's region is the nodes whose ``nn_module_stack`` holds it; its output is the one
      node of the region used outside it (none or several: no tail, as for a module called
      twice);
    - its tail copies every node downstream of that output, the output replaced by the tail's
      input, and is refused when it reads another value computed from the input (what a trace
      with the layer as a leaf gives too: tests/models/test_tail.py).

    A layer inside a module fx keeps as a leaf (a ``torch.nn`` module such as
    ``nn.MultiheadAttention``) has no region, hence no tail here. ``Tails(network, trace=False)``
    has none at all (tests, a fallback forced).
    """

    def __init__(self, network: nn.Module, trace: bool = True) -> None:
        self._network = network
        self._graph: fx.Graph | None = None
        if trace:
            try:
                self._graph = fx.Tracer().trace(network)
            except Exception:  # any tracing failure means: no tails, callers use the fallback
                self._graph = None
        self._regions: dict[str, set[fx.Node]] = {}
        self._order: list[fx.Node] = [] if self._graph is None else list(self._graph.nodes)
        self._position = {node: index for index, node in enumerate(self._order)}
        if self._graph is not None:
            for node in self._order:
                for name, _ in node.meta.get("nn_module_stack", {}).values():
                    self._regions.setdefault(name, set()).add(node)
        self._plans: dict[str, list[fx.Node] | None] = {}
        self._built: dict[str, nn.Module | None] = {}

    def has(self, layer: str) -> bool:
        """Whether the network after ``layer`` can run on its own."""
        return self._plan(layer) is not None

    def get(self, layer: str) -> nn.Module | None:
        """The tail after ``layer`` (built once, from the load-time graph); None without one."""
        if layer not in self._built:
            plan = self._plan(layer)
            self._built[layer] = None if plan is None else self._build(plan)
        return self._built[layer]

    def _plan(self, layer: str) -> list[fx.Node] | None:
        """The layer's output node, then the nodes its tail copies, in graph order."""
        if layer not in self._plans:
            self._plans[layer] = self._cut(layer)
        return self._plans[layer]

    def _cut(self, layer: str) -> list[fx.Node] | None:
        region = self._regions.get(layer, set())
        leaving = [n for n in region if any(user not in region for user in n.users)]
        if len(leaving) != 1:
            return None
        start = leaving[0]
        plan, reached = [start], {start}
        for node in self._order[self._position[start] + 1:]:
            if node in region:
                continue
            if node.op == "output":
                result = node.args[0]
                if not isinstance(result, fx.Node) or result not in reached:
                    return None
                plan.append(node)
                return plan
            inputs = node.all_input_nodes
            if not any(n in reached for n in inputs):
                continue  # not downstream of the layer: copied on demand if it is a constant
            if any(n not in reached and n.op != "get_attr" for n in inputs):
                return None  # the tail reads another input-dependent value
            reached.update(inputs)  # constants read count as the tail's own
            reached.add(node)
            plan.append(node)
        return None

    def _build(self, plan: list[fx.Node]) -> nn.Module:
        tail = fx.Graph()
        env: dict[fx.Node, fx.Node] = {plan[0]: tail.placeholder("activations")}
        for node in plan[1:]:
            if node.op == "output":
                result = node.args[0]
                assert isinstance(result, fx.Node)
                tail.output(env[result])
                break
            for dependency in node.all_input_nodes:
                if dependency not in env:  # a get_attr constant (checked by _cut)
                    env[dependency] = tail.node_copy(dependency)
            env[node] = tail.node_copy(node, lambda n: env[n])
        module = fx.GraphModule(self._network, tail)
        module.eval()
        return module
