"""Every method against a hand computation of its formula on a tiny network.

The tiny network ends in global average pooling and one linear layer, so ``dY_c/dA_k(i,j)`` is
``W[c, k] / HW`` everywhere: the formulas below can be written out without autograd.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.cams import CAMMethod, get_method, method_names, normalize
from service.cams.extractor import explain_batch
from service.models.runner import Runner
from tests.cams.conftest import runner_of

LAYER = "features"


def run(model: nn.Module, inputs: Tensor, name: str, classes: list[int] | None = None,
        layers: tuple[str, ...] = (LAYER,), **options: object) -> Tensor:
    targets = [[c] for c in classes] if classes else [None] * inputs.shape[0]
    out = explain_batch(runner_of(model), inputs, layers,
                        [get_method(name, options)], targets)
    return torch.stack([maps[0].grid for maps in out.maps])


def parts(model: nn.Module, inputs: Tensor, classes: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Activations A (B, K, H, W), gradients g, and logits, written out for the tiny net."""
    acts = model.features(inputs.clone())
    logits = model.fc(acts.mean(dim=(2, 3)))
    rows = model.fc.weight[classes]  # (B, K)
    grads = (rows / (acts.shape[2] * acts.shape[3]))[:, :, None, None].expand_as(acts)
    return acts, grads, logits


def combine(weights: Tensor, acts: Tensor) -> Tensor:
    return normalize(torch.relu((weights[:, :, None, None] * acts).sum(1)))


CLASSES = [1, 3, 4]


def test_gradcam_cam_and_hirescam_are_the_textbook_map_and_coincide(tiny, tiny_inputs):
    acts, grads, _ = parts(tiny, tiny_inputs, CLASSES)
    expected = combine(grads.mean(dim=(2, 3)), acts)
    for name in ("gradcam", "cam", "hirescam", "shapleycam"):
        torch.testing.assert_close(run(tiny, tiny_inputs, name, CLASSES), expected, atol=1e-5, rtol=0)


def test_gradcampp_follows_equation_19(tiny, tiny_inputs):
    acts, g, _ = parts(tiny, tiny_inputs, CLASSES)
    total = acts.sum(dim=(2, 3), keepdim=True)
    alpha = g**2 / (2 * g**2 + total * g**3)
    alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
    weights = (alpha * torch.relu(g)).sum(dim=(2, 3))
    torch.testing.assert_close(run(tiny, tiny_inputs, "gradcampp", CLASSES), combine(weights, acts),
                               atol=1e-5, rtol=0)


def test_xgradcam_layercam_elementwise_and_fem(tiny, tiny_inputs):
    acts, g, _ = parts(tiny, tiny_inputs, CLASSES)
    xgrad = (g * acts).sum(dim=(2, 3)) / (acts.sum(dim=(2, 3)) + 1e-7)
    torch.testing.assert_close(run(tiny, tiny_inputs, "xgradcam", CLASSES), combine(xgrad, acts),
                               atol=1e-5, rtol=0)
    layer = normalize(torch.relu((torch.relu(g) * acts).sum(1)))
    torch.testing.assert_close(run(tiny, tiny_inputs, "layercam", CLASSES), layer, atol=1e-5, rtol=0)
    elementwise = normalize(torch.relu(g * acts).sum(1))
    torch.testing.assert_close(run(tiny, tiny_inputs, "gradcam_elementwise", CLASSES), elementwise,
                               atol=1e-5, rtol=0)
    mean, std = acts.mean(dim=(2, 3), keepdim=True), acts.std(dim=(2, 3), keepdim=True, unbiased=False)
    fem = (acts > mean + 2 * std).float().mean(dim=(2, 3))
    torch.testing.assert_close(run(tiny, tiny_inputs, "fem", CLASSES), combine(fem, acts), atol=1e-5, rtol=0)


def test_eigencam_is_the_first_principal_component_signed_like_the_mean(tiny, tiny_inputs):
    acts, _, _ = parts(tiny, tiny_inputs, CLASSES)
    expected = []
    for sample in acts:
        matrix = sample.flatten(1).T.double()
        matrix = matrix - matrix.mean(dim=0)
        _, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        projection = (matrix @ vh[0]).view(sample.shape[1:])
        mean_map = sample.mean(0).double()
        if ((projection - projection.mean()) * (mean_map - mean_map.mean())).sum() < 0:
            projection = -projection
        expected.append(projection.float())
    torch.testing.assert_close(run(tiny, tiny_inputs, "eigencam", CLASSES),
                               normalize(torch.relu(torch.stack(expected))), atol=1e-5, rtol=0)


def test_ablationcam_is_the_relative_score_drop(tiny, tiny_inputs):
    acts, _, logits = parts(tiny, tiny_inputs, CLASSES)
    weights = torch.zeros(acts.shape[:2])
    for b, c in enumerate(CLASSES):
        for k in range(acts.shape[1]):
            ablated = acts[b:b + 1].clone()
            ablated[0, k] = 0
            score = tiny.fc(ablated.mean(dim=(2, 3)))[0, c]
            weights[b, k] = (logits[b, c] - score) / logits[b, c]
    torch.testing.assert_close(run(tiny, tiny_inputs, "ablationcam", CLASSES), combine(weights, acts),
                               atol=1e-5, rtol=0)


def score_weights(model: nn.Module, inputs: Tensor, acts: Tensor, steps: int = 1) -> Tensor:
    """Score-CAM's weights, one masked forward pass at a time (IS-CAM with ``steps`` > 1)."""
    weights = torch.zeros(acts.shape[:2])
    for b, c in enumerate(CLASSES):
        for k in range(acts.shape[1]):
            channel = acts[b, k]
            mask = (channel - channel.min()) / (channel.max() - channel.min() + 1e-8)
            mask = F.interpolate(mask[None, None], size=inputs.shape[-2:], mode="bilinear",
                                 align_corners=False)[0]
            scores = [model(inputs[b:b + 1] * mask * (i / steps))[0, c] for i in range(1, steps + 1)]
            weights[b, k] = torch.stack(scores).mean()
    return torch.softmax(weights, dim=1)


def test_scorecam_and_iscam_weight_channels_by_masked_scores(tiny, tiny_inputs):
    acts, _, _ = parts(tiny, tiny_inputs, CLASSES)
    torch.testing.assert_close(run(tiny, tiny_inputs, "scorecam", CLASSES, batch_size=4),
                               combine(score_weights(tiny, tiny_inputs, acts), acts), atol=1e-5, rtol=0)
    torch.testing.assert_close(run(tiny, tiny_inputs, "iscam", CLASSES, num_samples=3),
                               combine(score_weights(tiny, tiny_inputs, acts, steps=3), acts),
                               atol=1e-5, rtol=0)


def test_noise_free_smoothing_reduces_to_the_plain_method(tiny, tiny_inputs):
    torch.testing.assert_close(run(tiny, tiny_inputs, "sscam", CLASSES, std=0.0, num_samples=2),
                               run(tiny, tiny_inputs, "scorecam", CLASSES), atol=1e-5, rtol=0)
    torch.testing.assert_close(run(tiny, tiny_inputs, "smoothgradcampp", CLASSES, std=0.0, num_samples=2),
                               run(tiny, tiny_inputs, "gradcampp", CLASSES), atol=1e-5, rtol=0)
    noisy = run(tiny, tiny_inputs, "sscam", CLASSES, num_samples=2)
    assert not torch.allclose(noisy, run(tiny, tiny_inputs, "scorecam", CLASSES), atol=1e-3)


def test_finercam_is_gradcam_of_the_margin_over_the_nearest_classes(tiny, tiny_inputs):
    acts, _, logits = parts(tiny, tiny_inputs, CLASSES)
    hw = acts.shape[2] * acts.shape[3]
    probs = logits.softmax(1)
    weights = []
    for b, c in enumerate(CLASSES):
        distance = (logits[b] - logits[b, c]).abs()
        distance[c] = float("inf")
        others = distance.topk(2, largest=False).indices
        p = probs[b, others]
        # d/dA of sum p_j (y_c - y_j) / sum p_j, by autograd on the logits only.
        z = logits[b].clone().requires_grad_(True)
        with torch.enable_grad():
            q = z.softmax(0)[others]
            margin = (q * (z[c] - z[others])).sum() / q.sum()
            (dz,) = torch.autograd.grad(margin, [z])
        assert torch.allclose(p, q.detach())
        weights.append(dz @ tiny.fc.weight / hw)
    expected = combine(torch.stack(weights), acts)
    torch.testing.assert_close(run(tiny, tiny_inputs, "finercam", CLASSES, comparisons=2), expected,
                               atol=1e-5, rtol=0)


def test_fullgrad_sums_input_and_bias_gradients_on_the_input_grid(tiny, tiny_inputs):
    inputs = tiny_inputs.clone().requires_grad_(True)
    bn = tiny.features[1]
    with torch.enable_grad():
        first = tiny.features[0](inputs)
        normed = bn(first)
        second = tiny.features[3](torch.relu(normed))
        logits = tiny.fc(torch.relu(second).mean(dim=(2, 3)))
        score = logits[torch.arange(3), torch.tensor(CLASSES)].sum()
        gx, g1, g2, g3 = torch.autograd.grad(score, [inputs, first, normed, second])

    def psi(t: Tensor) -> Tensor:
        t = t.abs()
        t = t - t.amin(dim=(2, 3), keepdim=True)
        t = t / (t.amax(dim=(2, 3), keepdim=True) + 1e-7)
        return F.interpolate(t, size=(16, 16), mode="bilinear", align_corners=False).sum(1)

    bn_bias = bn.bias - bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps)
    total = psi(gx * tiny_inputs)
    total = total + psi(tiny.features[0].bias[None, :, None, None] * g1)
    total = total + psi(bn_bias[None, :, None, None] * g2)
    total = total + psi(tiny.features[3].bias[None, :, None, None] * g3)
    result = run(tiny, tiny_inputs, "fullgrad", CLASSES)
    assert result.shape == (3, 16, 16)
    torch.testing.assert_close(result, normalize(total), atol=1e-5, rtol=0)


def test_random_is_seeded_and_the_seed_matters(tiny, tiny_inputs):
    first = run(tiny, tiny_inputs, "random", CLASSES, seed=3)
    torch.testing.assert_close(first, run(tiny, tiny_inputs, "random", CLASSES, seed=3))
    assert not torch.allclose(first, run(tiny, tiny_inputs, "random", CLASSES, seed=4))


# Transformer-only methods (LeGrad) refuse this CNN; tests/cams/test_transformers.py runs them.
@pytest.mark.parametrize(
    "name", [n for n in method_names() if not CAMMethod.registry[n].needs_transformer]
)
def test_every_method_batched_equals_single_and_leaves_the_model_clean(tiny, tiny_inputs, name):
    options = {"num_samples": 2} if name in ("sscam", "iscam", "smoothgradcampp") else {}
    batched = run(tiny, tiny_inputs, name, **options)
    assert batched.shape[0] == 3 and torch.isfinite(batched).all()
    assert batched.min() >= 0 and batched.max() <= 1
    for b in range(3):
        single = run(tiny, tiny_inputs[b:b + 1], name, **options)
        torch.testing.assert_close(single[0], batched[b], atol=1e-5, rtol=0)
    assert_clean(tiny)


def assert_clean(model: nn.Module) -> None:
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert not module._backward_hooks
        assert not module.training
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_two_layers_fuse_and_layercam_scales_each_by_tanh(tiny, tiny_inputs):
    layers = ("features.2", LAYER)
    fused = run(tiny, tiny_inputs, "layercam", CLASSES, layers=layers)
    assert fused.shape == (3, 16, 16)
    shallow = run(tiny, tiny_inputs, "layercam", CLASSES, layers=("features.2",))
    deep = run(tiny, tiny_inputs, "layercam", CLASSES, layers=(LAYER,))
    up = F.interpolate(torch.tanh(2 * deep)[:, None], size=(16, 16), mode="bilinear", align_corners=False)
    expected = normalize(torch.maximum(torch.tanh(2 * shallow), up[:, 0]))
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=0)


class _Broken(get_method("gradcam").__class__.__mro__[1]):  # an unregistered CAMMethod
    uses_gradients = False

    def weights(self, context):  # type: ignore[no-untyped-def]
        def objective(logits: Tensor) -> Tensor:
            raise RuntimeError("boom")

        context.probe.layer_gradients(context.inputs, context.layer, objective)
        raise AssertionError("unreachable")


def test_no_hook_survives_an_exception(tiny, tiny_inputs):
    with pytest.raises(RuntimeError, match="boom"):
        explain_batch(runner_of(tiny), tiny_inputs, (LAYER,), [_Broken()], [None] * 3)
    assert_clean(tiny)


def test_unknown_parameters_and_out_of_range_values_are_refused():
    with pytest.raises(ValueError, match="no parameter"):
        get_method("gradcam", {"num_samples": 3})
    with pytest.raises(ValueError, match="at least 1"):
        get_method("scorecam", {"batch_size": 0})
    with pytest.raises(ValueError, match="integer"):
        get_method("sscam", {"num_samples": 2.5})
    assert get_method("sscam", {"num_samples": 3.0}).options["num_samples"] == 3


def test_eigen_smooth_takes_the_first_component_of_the_weighted_activations(tiny, tiny_inputs):
    acts, g, _ = parts(tiny, tiny_inputs, CLASSES)
    terms = g.mean(dim=(2, 3))[:, :, None, None] * acts
    expected = []
    for sample in terms:
        matrix = sample.flatten(1).T.double()
        matrix = matrix - matrix.mean(dim=0)
        _, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        projection = (matrix @ vh[0]).view(sample.shape[1:])
        if (projection * (sample.sum(0) - sample.sum(0).mean())).sum() < 0:
            projection = -projection
        expected.append(projection.float())
    out = explain_batch(runner_of(tiny), tiny_inputs, (LAYER,), [get_method("gradcam")],
                        [[c] for c in CLASSES], eigen_smooth=True)
    smoothed = torch.stack([maps[0].grid for maps in out.maps])
    torch.testing.assert_close(smoothed, normalize(torch.relu(torch.stack(expected))), atol=1e-5, rtol=0)


def test_aug_smooth_averages_six_flipped_and_rescaled_variants(tiny, tiny_inputs):
    def plain(images: Tensor) -> Tensor:
        return run(tiny, images, "gradcam", CLASSES)

    total = torch.zeros(3, 8, 8)
    for flip in (False, True):
        for scale in (1.0, 1.1, 0.9):
            images = tiny_inputs
            if scale != 1.0:
                side = round(16 * scale)
                images = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)
            grid = plain(images.flip(-1) if flip else images)
            grid = grid.flip(-1) if flip else grid
            if grid.shape[-1] != 8:
                grid = F.interpolate(grid[:, None], size=(8, 8), mode="bilinear", align_corners=False)[:, 0]
            total += grid
    out = explain_batch(runner_of(tiny), tiny_inputs, (LAYER,), [get_method("gradcam")],
                        [[c] for c in CLASSES], aug_smooth=True)
    smoothed = torch.stack([maps[0].grid for maps in out.maps])
    torch.testing.assert_close(smoothed, normalize(total / 6), atol=1e-5, rtol=0)
    assert not torch.allclose(smoothed, plain(tiny_inputs), atol=1e-3)
    assert_clean(tiny)


def test_skipping_dead_channels_keeps_scorecam_and_ablationcam_exact(tiny, tiny_inputs):
    dead = copy.deepcopy(tiny)
    with torch.no_grad():
        dead.features[3].bias[0] = -100.0  # channel 0 is zero everywhere after the ReLU
    acts, _, logits = parts(dead, tiny_inputs, CLASSES)
    assert acts[:, 0].eq(0).all()
    # The hand computation runs every channel, the dead one included.
    torch.testing.assert_close(run(dead, tiny_inputs, "scorecam", CLASSES),
                               combine(score_weights(dead, tiny_inputs, acts), acts), atol=1e-5, rtol=0)
    # Zeroing a dead channel changes nothing: its Ablation-CAM weight is 0, and the map is exact.
    weights = torch.zeros(acts.shape[:2])
    for b, c in enumerate(CLASSES):
        for k in range(acts.shape[1]):
            ablated = acts[b:b + 1].clone()
            ablated[0, k] = 0
            weights[b, k] = (logits[b, c] - dead.fc(ablated.mean(dim=(2, 3)))[0, c]) / logits[b, c]
    torch.testing.assert_close(run(dead, tiny_inputs, "ablationcam", CLASSES), combine(weights, acts),
                               atol=1e-5, rtol=0)


def test_top_k_channels_keeps_only_the_strongest_channels(tiny, tiny_inputs):
    acts, _, _ = parts(tiny, tiny_inputs, CLASSES)
    exact = run(tiny, tiny_inputs, "scorecam", CLASSES)
    torch.testing.assert_close(run(tiny, tiny_inputs, "scorecam", CLASSES, top_k_channels=6), exact)
    top2 = run(tiny, tiny_inputs, "scorecam", CLASSES, top_k_channels=2)
    full = score_weights(tiny, tiny_inputs, acts)
    for b in range(3):
        keep = acts[b].mean(dim=(1, 2)).topk(2).indices
        weights = torch.zeros(acts.shape[1])
        weights[keep] = full[b, keep] / full[b, keep].sum()  # softmax over the kept channels only
        torch.testing.assert_close(top2[b], combine(weights[None], acts[b:b + 1])[0], atol=1e-5, rtol=0)


def test_a_layer_without_a_tail_runs_the_whole_model(tiny, tiny_inputs):
    # A module called twice has no single place in the graph to cut at.
    assert Runner(tiny).tail(LAYER) is not None
    shared = nn.Sequential(tiny.features[:3], tiny.features[3], tiny.features[4])
    loop = _Reused(shared).eval().requires_grad_(False)
    assert Runner(loop).tail("block.1") is None
    inputs = tiny_inputs[:, :, :8, :8]
    fallback = run(loop, inputs, "ablationcam", [0, 1, 2], layers=("block.1",))
    assert torch.isfinite(fallback).all() and fallback.max() == 1.0
    assert_clean(loop)


class _Reused(nn.Module):
    """Runs the same block twice: the layer fires twice, so no single tail exists."""

    def __init__(self, block: nn.Sequential) -> None:
        super().__init__()
        self.block = block
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        first = self.block(x)
        second = self.block(x.flip(-1))
        return self.head((first + second).mean(dim=(2, 3)))
