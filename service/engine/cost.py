"""What a work item will cost, in forward-pass equivalents, from what its methods declare.

Every method says what it adds beyond the shared pass per image and class
(:meth:`service.cams.base.CAMMethod.extra_passes`, from its parameters and the target layer's
channels and grid; a method whose passes run through the network's tail counts each as a whole
forward after a layer the model's ``tail_layers`` lack). An item costs the shared pass, a
backward per class round, its methods' extra passes for each class and layer, ``aug_smooth``'s
five more variants of all of that, and the faithfulness curves (``2 * steps + 2`` per map) when
it asked for them. The scheduler reads this to tell light work from heavy, and the engine to
refuse a request it could not finish in time.
"""

from __future__ import annotations

from service.cams import get_method
from service.cams.smoothing import AUGMENTATIONS
from service.engine.jobs import ExplainSpec
from service.models.catalog import ModelInfo

# Items whose methods add more passes than this per image run in the heavy lane.
HEAVY_EXTRA_PASSES = 16


def item_passes(spec: ExplainSpec | None, model: ModelInfo) -> int:
    """Forward-pass equivalents one image of this spec costs on ``model``."""
    if spec is None:
        return 1
    rounds = len(spec.classes) if spec.classes else 1
    params = dict(spec.method_params)
    shapes = {layer.name: layer.shape for layer in model.layers}
    extra = 0.0
    for name in spec.methods:
        method = get_method(name, dict(params.get(name, ())))
        for layer in spec.layers:
            channels, height, width = shapes.get(layer, (0, 0, 0))
            passes = method.extra_passes(channels, (height, width) if height else None)
            if method.tail_passes and method.extra_pass_cost:
                # Counted at a tail pass's cost; after a layer without a tail, a forward's.
                cost = method.pass_cost(layer in model.tail_layers)
                passes *= cost / method.extra_pass_cost
            extra += passes
    per_variant = 1 + rounds + rounds * extra
    variants = len(AUGMENTATIONS) if spec.aug_smooth else 1
    total = per_variant * variants
    if spec.evaluate_steps:
        total += rounds * len(spec.methods) * (2 * spec.evaluate_steps + 2)
    return max(1, round(total))


def is_heavy(spec: ExplainSpec | None, model: ModelInfo) -> bool:
    return item_passes(spec, model) - 2 > HEAVY_EXTRA_PASSES
