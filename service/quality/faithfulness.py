"""Faithfulness of saliency maps: does the model's confidence follow what the map points at?

All functions are pure torch: they take the model (any callable from an input batch to logits),
the normalised input batch ``X`` (B, C, H, W), one map per sample ``M`` (B, h, w) with values in
[0, 1] (resized bilinearly to the input when its grid differs), each sample's class (B,), and a
``baseline`` that stands for "no information" (a tensor broadcastable to ``X`` or a number; the
default 0 is the dataset mean once inputs are normalised). Scores are per sample; average them
over a data set to get the papers' numbers.

Deletion and insertion (Petsiuk et al., "RISE", BMVC 2018, arXiv 1806.07421): pixels are
ranked by the map, highest first. Deletion replaces the top ``k/steps`` of them by the baseline,
for ``k = 0..steps``; insertion starts from the baseline and reveals them in the same order.
Each curve is the class's softmax probability against the fraction of pixels changed, and its
score the area under it (trapezoids on [0, 1]). A faithful map makes the probability fall fast
under deletion (low AUC) and rise fast under insertion (high AUC). Ties in the map are broken
in raster order, so the scores are deterministic.

Average drop and increase in confidence (Chattopadhay et al., "Grad-CAM++", WACV 2018,
arXiv 1710.11063, section 5.1): the model sees the "explanation map" ``E = M * X`` (here
``baseline + M * (X - baseline)``, which is ``M * X`` for the zero baseline). With ``Y`` the class
probability on ``X`` and ``O`` on ``E``: average drop is ``max(0, Y - O) / Y`` (the paper reports
its mean over images, in percent) and increase in confidence is whether ``O > Y`` (the paper
reports the share of images, in percent).

Cost: one forward pass of the clean input per sample, one of ``E``, and ``2 * steps`` perturbed
copies per map (the deletion curve's first point and the insertion curve's last are the clean
input), all batched through the model ``chunk_size`` at a time, without gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from service.cams.passes import chunked

Model = Callable[[Tensor], Tensor]
Baseline = Tensor | float

DEFAULT_STEPS = 32
DEFAULT_CHUNK = 32


@dataclass(frozen=True)
class Faithfulness:
    """Per-sample scores, each (B,); curves are (B, steps + 1)."""

    deletion_auc: Tensor
    insertion_auc: Tensor
    average_drop: Tensor
    increase_in_confidence: Tensor  # bool
    deletion_curve: Tensor
    insertion_curve: Tensor


def faithfulness(
    model: Model,
    inputs: Tensor,
    maps: Tensor,
    classes: Tensor,
    steps: int = DEFAULT_STEPS,
    baseline: Baseline = 0.0,
    chunk_size: int = DEFAULT_CHUNK,
) -> Faithfulness:
    """Every score for every sample, sharing the clean forward pass; ``2 * steps + 1`` extra
    forward passes per map, batched."""
    _check(inputs, maps, classes, steps)
    clean = class_probability(model, inputs, classes, chunk_size)
    deletion, insertion = _curves(
        model, inputs, maps, classes, steps, baseline, chunk_size, clean, (False, True)
    )
    masked = class_probability(model, explanation_map(inputs, maps, baseline), classes, chunk_size)
    return Faithfulness(
        deletion_auc=auc(deletion),
        insertion_auc=auc(insertion),
        average_drop=_drop(clean, masked),
        increase_in_confidence=masked > clean,
        deletion_curve=deletion,
        insertion_curve=insertion,
    )


def deletion_auc(
    model: Model, inputs: Tensor, maps: Tensor, classes: Tensor,
    steps: int = DEFAULT_STEPS, baseline: Baseline = 0.0, chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """Area under the probability as the map's top pixels are replaced by the baseline (B,);
    lower is more faithful."""
    return auc(deletion_curve(model, inputs, maps, classes, steps, baseline, chunk_size))


def insertion_auc(
    model: Model, inputs: Tensor, maps: Tensor, classes: Tensor,
    steps: int = DEFAULT_STEPS, baseline: Baseline = 0.0, chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """Area under the probability as the map's top pixels are revealed on the baseline (B,);
    higher is more faithful."""
    return auc(insertion_curve(model, inputs, maps, classes, steps, baseline, chunk_size))


def average_drop(
    model: Model, inputs: Tensor, maps: Tensor, classes: Tensor, baseline: Baseline = 0.0,
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """``max(0, Y - O) / Y`` per sample (B,), in [0, 1]; lower is more faithful."""
    _check(inputs, maps, classes, 1)
    clean = class_probability(model, inputs, classes, chunk_size)
    masked = class_probability(model, explanation_map(inputs, maps, baseline), classes, chunk_size)
    return _drop(clean, masked)


def increase_in_confidence(
    model: Model, inputs: Tensor, maps: Tensor, classes: Tensor, baseline: Baseline = 0.0,
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """Whether the class probability on ``M * X`` exceeds that on ``X``, per sample (B,) bool."""
    _check(inputs, maps, classes, 1)
    clean = class_probability(model, inputs, classes, chunk_size)
    masked = class_probability(model, explanation_map(inputs, maps, baseline), classes, chunk_size)
    return masked > clean


def deletion_curve(
    model: Model, inputs: Tensor, maps: Tensor, classes: Tensor,
    steps: int = DEFAULT_STEPS, baseline: Baseline = 0.0, chunk_size: int = DEFAULT_CHUNK,
    clean: Tensor | None = None,
) -> Tensor:
    """Class probability with the top ``k / steps`` of the pixels deleted, ``k = 0..steps``."""
    return _curves(model, inputs, maps, classes, steps, baseline, chunk_size, clean, (False,))[0]


def insertion_curve(
    model: Model, inputs: Tensor, maps: Tensor, classes: Tensor,
    steps: int = DEFAULT_STEPS, baseline: Baseline = 0.0, chunk_size: int = DEFAULT_CHUNK,
    clean: Tensor | None = None,
) -> Tensor:
    """Class probability with only the top ``k / steps`` of the pixels shown, ``k = 0..steps``."""
    return _curves(model, inputs, maps, classes, steps, baseline, chunk_size, clean, (True,))[0]


def auc(curve: Tensor) -> Tensor:
    """Trapezoidal area under curves (B, n + 1) sampled evenly on [0, 1]."""
    steps = curve.shape[1] - 1
    return (curve.sum(dim=1) - 0.5 * (curve[:, 0] + curve[:, -1])) / steps


def explanation_map(inputs: Tensor, maps: Tensor, baseline: Baseline = 0.0) -> Tensor:
    """The Grad-CAM++ paper's ``E = M * X``, measured from the baseline."""
    weights = to_input_size(maps, inputs)[:, None]
    base = _baseline(baseline, inputs)
    return base + weights * (inputs - base)


def to_input_size(maps: Tensor, inputs: Tensor) -> Tensor:
    """Maps (B, h, w) brought to the input's (H, W) bilinearly, as float on its device."""
    maps = maps.to(inputs.device, torch.float32)
    size = tuple(inputs.shape[-2:])
    if tuple(maps.shape[-2:]) == size:
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


@torch.no_grad()
def class_probability(
    model: Model, inputs: Tensor, classes: Tensor, chunk_size: int = DEFAULT_CHUNK
) -> Tensor:
    """Softmax probability of each sample's class (B,), ``chunk_size`` samples per pass."""
    classes = classes.to(inputs.device)
    return torch.cat([
        _probability(model, inputs[start:stop], classes[start:stop])
        for start, stop in chunked(inputs.shape[0], chunk_size, key="faithfulness")
    ])


def _probability(model: Model, inputs: Tensor, classes: Tensor) -> Tensor:
    """One pass: the softmax probability of each row's class."""
    return model(inputs).float().softmax(dim=1).gather(1, classes[:, None])[:, 0]


@torch.no_grad()
def _curves(
    model: Model, inputs: Tensor, maps: Tensor, classes: Tensor, steps: int, baseline: Baseline,
    chunk_size: int, clean: Tensor | None, kinds: tuple[bool, ...],
) -> list[Tensor]:
    """One curve per kind (``True``: insertion, ``False``: deletion), all perturbed copies of
    every sample and kind sharing the same chunks."""
    _check(inputs, maps, classes, steps)
    batch = inputs.shape[0]
    pixels = inputs.shape[-2] * inputs.shape[-1]
    ranks = _ranks(to_input_size(maps, inputs))  # (B, H*W): 0 for the map's strongest pixel
    counts = torch.round(torch.arange(steps + 1, device=inputs.device) * pixels / steps).long()
    base = _baseline(baseline, inputs)
    if clean is None:
        clean = class_probability(model, inputs, classes, chunk_size)
    classes = classes.to(inputs.device)
    curves = torch.empty(len(kinds), batch, steps + 1, device=inputs.device)
    jobs = []
    for c, insert in enumerate(kinds):
        # The clean input is one end of each curve; it is measured once, not once per curve.
        clean_k = steps if insert else 0
        curves[c, :, clean_k] = clean.to(inputs.device)
        jobs += [(c, b, k) for b in range(batch) for k in range(steps + 1) if k != clean_k]
    inserts = torch.tensor(kinds, device=inputs.device)
    # Copied to the device once; each chunk is a slice (no host-to-device copy per chunk).
    all_jobs = torch.tensor(jobs, device=inputs.device).view(-1, 3)
    for start, stop in chunked(len(jobs), chunk_size, key="faithfulness"):
        chunk = all_jobs[start:stop]
        which, rows, ks = chunk.unbind(dim=1)
        chosen = (ranks[rows] < counts[ks][:, None]).view(len(chunk), 1, *inputs.shape[-2:])
        sample = inputs[rows]
        filler = base if base.shape[0] == 1 else base[rows]
        # Deletion: the chosen pixels become the baseline; insertion: only they are shown.
        shown = torch.where(inserts[which].view(-1, 1, 1, 1), chosen, ~chosen)
        perturbed = torch.where(shown, sample, filler)
        curves[which, rows, ks] = _probability(model, perturbed, classes[rows])
    return list(curves.unbind(0))


def _ranks(maps: Tensor) -> Tensor:
    """Each pixel's position when the map is sorted from strongest to weakest (B, H*W)."""
    flat = maps.flatten(1)
    order = torch.argsort(-flat, dim=1, stable=True)
    ranks = torch.empty_like(order)
    positions = torch.arange(flat.shape[1], device=flat.device).expand_as(order)
    return ranks.scatter_(1, order, positions)


def _baseline(baseline: Baseline, inputs: Tensor) -> Tensor:
    if isinstance(baseline, Tensor):
        base = baseline.to(inputs.device, inputs.dtype)
        while base.dim() < inputs.dim():
            base = base[None]
        return base.expand(base.shape[0], *inputs.shape[1:])
    return torch.full((1, *inputs.shape[1:]), float(baseline), device=inputs.device, dtype=inputs.dtype)


def _drop(clean: Tensor, masked: Tensor) -> Tensor:
    return torch.relu(clean - masked) / clean.clamp_min(1e-12)


def _check(inputs: Tensor, maps: Tensor, classes: Tensor, steps: int) -> None:
    if inputs.dim() != 4 or maps.dim() != 3:
        raise ValueError(f"inputs must be (B, C, H, W) and maps (B, h, w); got {tuple(inputs.shape)} "
                         f"and {tuple(maps.shape)}")
    if not inputs.shape[0] == maps.shape[0] == classes.shape[0]:
        raise ValueError("inputs, maps and classes need one entry per sample")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
