"""Faithfulness scores for ``/explain?evaluate=true``, computed on the worker after the maps.

Every map an item asked to score is stacked with its image and class, grouped by the steps the
item asked for, and scored by :func:`service.quality.faithfulness.faithfulness` in one batched
call per group: ``2 * steps + 1`` extra forward passes per map and one per image, in chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from service.cams.maps import SampleMap
from service.engine.jobs import ItemResult, WorkItem
from service.quality.faithfulness import faithfulness, to_input_size


def add_faithfulness(
    model: Callable[[Tensor], Tensor],
    inputs: Tensor,
    items: Sequence[WorkItem],
    maps: Sequence[Sequence[SampleMap]],
    results: Sequence[ItemResult],
) -> None:
    """Set ``faithfulness`` on every explanation of the items whose spec has ``evaluate_steps``.

    ``maps[row]`` are the sample maps of ``items[row]`` in the order of
    ``results[row].explanations``.
    """
    groups: dict[int, list[tuple[int, int]]] = {}
    for row, item in enumerate(items):
        steps = item.explain.evaluate_steps if item.explain is not None else None
        if steps:
            groups.setdefault(steps, []).extend((row, i) for i in range(len(maps[row])))
    for steps, entries in groups.items():
        rows = torch.tensor([row for row, _ in entries], device=inputs.device)
        chosen = [maps[row][i] for row, i in entries]
        batch = inputs[rows].float()
        grids = torch.cat([to_input_size(m.grid[None], batch[:1]) for m in chosen])
        classes = torch.tensor([m.class_idx for m in chosen], device=inputs.device)
        scores = faithfulness(model, batch, grids, classes, steps=steps)
        for n, (row, i) in enumerate(entries):
            results[row].explanations[i].faithfulness = {
                "deletion_auc": round(float(scores.deletion_auc[n]), 6),
                "insertion_auc": round(float(scores.insertion_auc[n]), 6),
                "average_drop": round(float(scores.average_drop[n]), 6),
                "increase_in_confidence": bool(scores.increase_in_confidence[n]),
                "steps": steps,
            }
