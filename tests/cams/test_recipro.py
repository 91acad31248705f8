"""Recipro-CAM and ViT-ReciproCAM against direct implementations of the papers' formulas.

The direct versions loop over positions, build each masked copy by hand and run the network
after the layer themselves (the tiny CNN's pooling and classifier written out; for the ViT, the
whole torchvision model with hooks that replace the block's input and its first norm's
output), so they share nothing with the service's batched tail passes.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from torch import Tensor, nn
from torchvision.models import VisionTransformer

from service.bench import main as bench_main
from service.cams import CAMMethod, get_method, normalize
from service.cams.base import LayerContext
from service.cams.extractor import explain_batch
from service.cams.passes import PassesCancelled, PassRun, active
from service.engine.cost import is_heavy, item_passes
from service.engine.jobs import ExplainSpec
from service.evaluate import evaluate, read_folder
from service.evaluate import main as evaluate_main
from service.models.loader import LoadedModel
from service.models.runner import Runner
from service.models.tail import Tails

LAYER = "features"
CLASSES = [1, 3, 4]
GAUSSIAN = torch.tensor([[1 / 16, 1 / 8, 1 / 16], [1 / 8, 1 / 4, 1 / 8], [1 / 16, 1 / 8, 1 / 16]])
EVAL = Path(__file__).resolve().parent.parent / "data" / "eval"


def run(model: nn.Module | Runner, inputs: Tensor, name: str, classes: list[int] | None = None,
        layers: tuple[str, ...] = (LAYER,), **options: object) -> Tensor:
    """The served maps, min-max normalised."""
    return scores_and_maps(model, inputs, name, classes, layers, **options)[1]


def scores_and_maps(model: nn.Module | Runner, inputs: Tensor, name: str, classes: list[int] | None = None,
                    layers: tuple[str, ...] = (LAYER,), **options: object) -> tuple[Tensor, Tensor]:
    """The method's raw map (the softmax scores themselves) and the served, normalised one.

    The raw scores are compared with the formula: min-max normalisation of scores that span a
    narrow range would magnify float rounding into the comparison.
    """
    targets = [[c] for c in classes] if classes else [None] * inputs.shape[0]
    method = get_method(name, options)
    raw: list[Tensor] = []
    saliency = method.saliency

    def recorded(context: LayerContext) -> Tensor:
        raw.append(saliency(context))
        return raw[-1]

    method.saliency = recorded  # type: ignore[method-assign]
    runner = model if isinstance(model, Runner) else Runner(model)
    out = explain_batch(runner, inputs, layers, [method], targets)
    return raw[0], torch.stack([maps[0].grid for maps in out.maps])


def hand_mask(height: int, width: int, i: int, j: int, gaussian: bool) -> Tensor:
    """The paper's spatial mask for position (i, j), written out cell by cell."""
    mask = torch.zeros(height, width)
    if not gaussian:
        mask[i, j] = 1.0
        return mask
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            if 0 <= i + di < height and 0 <= j + dj < width:
                mask[i + di, j + dj] = GAUSSIAN[di + 1, dj + 1]
    return mask


def direct_reciprocam(model: nn.Module, inputs: Tensor, classes: list[int], gaussian: bool) -> Tensor:
    """S(i, j) = softmax(fc(avgpool(A * M^(i,j))))_c, one position at a time."""
    acts = model.features(inputs)
    _, _, height, width = acts.shape
    maps = torch.zeros(len(classes), height, width)
    for b, c in enumerate(classes):
        for i in range(height):
            for j in range(width):
                masked = acts[b] * hand_mask(height, width, i, j, gaussian)
                logits = model.fc(masked.mean(dim=(1, 2)))
                maps[b, i, j] = logits.softmax(dim=0)[c]
    return maps


@pytest.mark.parametrize("gaussian", [False, True])
def test_reciprocam_is_each_positions_softmax_score_through_the_tail(tiny, tiny_inputs, gaussian):
    expected = direct_reciprocam(tiny, tiny_inputs, CLASSES, gaussian)
    # batch_size 5 splits the 64 positions unevenly across chunks.
    raw, served = scores_and_maps(tiny, tiny_inputs, "reciprocam", CLASSES, gaussian=gaussian,
                                  batch_size=5)
    assert raw.shape == served.shape == (3, 8, 8)
    torch.testing.assert_close(raw, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(served, normalize(raw))


def test_the_gaussian_neighbourhood_changes_the_map(tiny, tiny_inputs):
    plain = run(tiny, tiny_inputs, "reciprocam", CLASSES)
    smooth = run(tiny, tiny_inputs, "reciprocam", CLASSES, gaussian=True)
    assert not torch.allclose(plain, smooth, atol=1e-3)


def test_without_a_tail_the_whole_model_gives_the_same_map(tiny, tiny_inputs):
    assert Runner(tiny).tail(LAYER) is not None
    # The owner's tails say none, as for a layer no tail can be cut at.
    fallback = Runner(copy.deepcopy(tiny), tails=Tails(tiny, trace=False))
    torch.testing.assert_close(run(fallback, tiny_inputs, "reciprocam", CLASSES, gaussian=True),
                               run(tiny, tiny_inputs, "reciprocam", CLASSES, gaussian=True),
                               atol=1e-5, rtol=0)


def test_its_passes_are_chunked_counted_and_cancellable(tiny, tiny_inputs):
    scheduled = PassRun(deadline=float("inf"), total=1)
    with active(scheduled):
        run(tiny, tiny_inputs, "reciprocam", CLASSES, batch_size=16)
    # one tail pass per position and image, each counted as the method declares its cost
    assert scheduled.done == pytest.approx(3 * 64 * get_method("reciprocam").extra_pass_cost)
    assert scheduled.rate_of("tail") is not None
    stopped = PassRun(deadline=float("inf"), total=1)
    stopped.cancelled.set()
    with active(stopped), pytest.raises(PassesCancelled):
        run(tiny, tiny_inputs, "reciprocam", CLASSES)
    assert stopped.done == 0


def test_without_a_tail_each_pass_counts_a_whole_forward(tiny, tiny_inputs):
    # As the estimate counts them (service.engine.cost): the whole model runs per copy.
    scheduled = PassRun(deadline=float("inf"), total=1)
    with active(scheduled):
        run(Runner(copy.deepcopy(tiny), tails=Tails(tiny, trace=False)), tiny_inputs,
            "reciprocam", CLASSES, batch_size=16)
    assert scheduled.done == pytest.approx(3 * 64 * 1.0)


def spec(methods: tuple[str, ...], layer: str) -> ExplainSpec:
    return ExplainSpec(methods=methods, layers=(layer,), classes=None, mask_size=None,
                       display_size=None)


def test_declared_cost_is_one_tail_pass_per_position(mobilenet: LoadedModel):
    info = mobilenet.info()
    method = get_method("reciprocam")
    assert method.extra_passes(1280, (7, 7)) == 49 * ABLATION_TAIL_WEIGHT
    assert method.extra_passes(1280, (14, 14)) == 4 * method.extra_passes(1280, (7, 7))
    # The shared forward, the backward slot of the class round, and 49 quarter passes.
    assert item_passes(spec(("reciprocam",), "features.18"), info) == round(2 + 49 * 0.25)
    assert not is_heavy(spec(("reciprocam",), "features.18"), info)
    # The same 49 positions through Score-CAM cost a forward per channel.
    assert item_passes(spec(("scorecam",), "features.18"), info) > 10 * item_passes(
        spec(("reciprocam",), "features.18"), info)


ABLATION_TAIL_WEIGHT = CAMMethod.registry["ablationcam"].extra_pass_cost


# A ViT small enough to run every position by hand: 32x32 inputs, 8x8 patches (a 4x4 grid).
@pytest.fixture(scope="module")
def small_vit() -> nn.Module:
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=2,
                              hidden_dim=16, mlp_dim=32, num_classes=5)
    with torch.no_grad():  # torchvision starts the head at zero: every score would be equal
        model.heads.head.weight.normal_(0.0, 1.0)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def vit_inputs() -> Tensor:
    return torch.randn((2, 3, 32, 32), generator=torch.Generator().manual_seed(2))


def direct_vit_reciprocam(model: VisionTransformer, inputs: Tensor, classes: list[int], block: int,
                          gaussian: bool) -> Tensor:
    """Each patch position p: the whole model run with block ``block``'s input replaced by
    [z_cls, m^p * z_patches] and its ln_1 output by [LN(z)_cls, m^p * LN(z)_patches]."""
    target = model.encoder.layers[block]
    seen: list[Tensor] = []
    handle = target.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        model(inputs)
    finally:
        handle.remove()
    stream = seen[0]
    side = 4
    maps = torch.zeros(len(classes), side, side)
    for b, c in enumerate(classes):
        normed = target.ln_1(stream[b:b + 1])
        for i in range(side):
            for j in range(side):
                weights = torch.cat([torch.ones(1), hand_mask(side, side, i, j, gaussian).flatten()])
                new_input = stream[b:b + 1] * weights[None, :, None]
                new_normed = normed * weights[None, :, None]
                handles = [
                    target.register_forward_pre_hook(lambda _m, _a, z=new_input: (z,)),
                    target.ln_1.register_forward_hook(lambda _m, _a, _o, u=new_normed: u),
                ]
                try:
                    logits = model(inputs[b:b + 1])
                finally:
                    for h in handles:
                        h.remove()
                maps[b, i, j] = logits.softmax(dim=1)[0, c]
    return maps


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("gaussian", [True, False])
def test_vit_reciprocam_masks_the_tokens_entering_the_block(small_vit, vit_inputs, gaussian):
    classes = [2, 4]
    expected = direct_vit_reciprocam(small_vit, vit_inputs, classes, 2, gaussian)
    raw, served = scores_and_maps(small_vit, vit_inputs, "vit_reciprocam", classes,
                                  layers=("encoder.layers.encoder_layer_2.ln_1",),
                                  gaussian=gaussian, batch_size=3)
    assert raw.shape == (2, 4, 4) and served.std() > 0.05
    torch.testing.assert_close(raw, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(served, normalize(raw))
    # A block's output is the next block's input: the same tokens are masked.
    after, _ = scores_and_maps(small_vit, vit_inputs, "vit_reciprocam", classes,
                               layers=("encoder.layers.encoder_layer_1",), gaussian=gaussian)
    torch.testing.assert_close(after, expected, atol=1e-6, rtol=1e-5)
    earlier = direct_vit_reciprocam(small_vit, vit_inputs, classes, 1, gaussian)
    inside, _ = scores_and_maps(small_vit, vit_inputs, "vit_reciprocam", classes,
                                layers=("encoder.layers.encoder_layer_1.mlp",), gaussian=gaussian)
    torch.testing.assert_close(inside, earlier, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(earlier, expected, atol=1e-4)
    assert hook_count(small_vit) == 0


def test_vit_reciprocam_batch_equals_single_images(small_vit, vit_inputs):
    layers = ("encoder.layers.encoder_layer_2.ln_1",)
    batch = run(small_vit, vit_inputs, "vit_reciprocam", [1, 3], layers=layers)
    for b, c in enumerate([1, 3]):
        single = run(small_vit, vit_inputs[b:b + 1], "vit_reciprocam", [c], layers=layers)
        torch.testing.assert_close(single[0], batch[b], atol=1e-5, rtol=0)


def test_reciprocam_runs_on_patch_tokens_with_their_class_token(small_vit, vit_inputs):
    found = run(small_vit, vit_inputs, "reciprocam", [1, 3], layers=("encoder.layers.encoder_layer_1",))
    assert found.shape == (2, 4, 4) and torch.isfinite(found).all() and found.max() == 1.0


def test_vit_reciprocam_needs_a_vision_transformer(tiny, tiny_inputs, mobilenet: LoadedModel):
    reason = CAMMethod.registry["vit_reciprocam"].describe().unsuitable(mobilenet.info())
    assert reason is not None and "attention" in reason  # the API's refusal reads this declaration
    assert CAMMethod.registry["reciprocam"].describe().unsuitable(mobilenet.info()) is None
    with pytest.raises(ValueError, match="vision transformer"):
        run(tiny, tiny_inputs, "vit_reciprocam", CLASSES)
    assert hook_count(tiny) == 0


def test_pointing_and_energy_at_least_those_of_top_k_score_cam(mobilenet: LoadedModel):
    """On tests/data/eval, Recipro-CAM localises at least as well as Score-CAM with its 128
    strongest channels, and better than a random map, all measured here on the same images."""
    samples = read_folder(EVAL, mobilenet.spec.num_classes)
    rows = {row.method.split()[0]: row for row in evaluate(
        mobilenet, samples, ["reciprocam", "scorecam", "random"], [mobilenet.default_layer],
        steps=2, params={"scorecam": {"top_k_channels": 128}},
    )}
    assert all(row.error is None for row in rows.values()), rows
    recipro, score, random = rows["reciprocam"], rows["scorecam"], rows["random"]
    assert score.pointing_game is not None and score.energy is not None
    assert recipro.pointing_game is not None and recipro.energy is not None
    assert random.pointing_game is not None and random.energy is not None
    assert recipro.pointing_game >= score.pointing_game
    assert recipro.pointing_game > random.pointing_game
    assert recipro.energy >= score.energy
    assert recipro.energy > random.energy


def test_served_listed_and_refused_over_http(client: TestClient, cat_png: bytes):
    listed = {m["name"]: m for m in client.get("/methods").json()["methods"]}
    for name in ("reciprocam", "vit_reciprocam"):
        assert listed[name]["family"] == "perturbation" and not listed[name]["uses_gradients"]
        assert {p["name"] for p in listed[name]["parameters"]} == {"gaussian", "batch_size"}
    response = client.post(
        "/explain", files={"file": ("cat.png", cat_png, "image/png")},
        data={"methods": "reciprocam", "mask_size": "feature", "outputs": "mask",
              "method_params": json.dumps({"reciprocam": {"gaussian": True}})},
        headers={"X-Request-Timeout": "600"},
    )
    assert response.status_code == 200, response.text
    explanation = response.json()["results"][0]["explanations"][0]
    assert explanation["method"] == "reciprocam" and explanation["mask"]["shape"] == [7, 7]
    refused = client.post("/explain", files={"file": ("cat.png", cat_png, "image/png")},
                          data={"methods": "vit_reciprocam"})
    assert refused.status_code == 422, refused.text
    message = refused.json()["error"]["message"]
    assert "vision transformer" in message and "reciprocam for a gradient-free map" in message


def test_the_benchmark_lists_reciprocam_against_a_forward_pass(capsys: pytest.CaptureFixture[str]):
    bench_main(["--methods", "reciprocam,vit_reciprocam", "--no-references", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "vit_reciprocam: skipped" in out and "vision transformer" in out
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1]
            for line in out.splitlines() if line.startswith("| ")}
    assert "vit_reciprocam" not in rows
    passes, ms1, ratio1, ms8, ratio8 = (cell.strip() for cell in rows["reciprocam"])
    assert "per grid position" in passes
    assert float(ms1) > 0 and float(ratio1) > 0 and float(ms8) > 0 and float(ratio8) > 0


def test_evaluate_params_are_checked_before_any_work():
    with pytest.raises(SystemExit, match="not among the methods"):
        evaluate_main([str(EVAL), "--methods", "gradcam", "--params", '{"scorecam": {"top_k_channels": 8}}'])
    with pytest.raises(SystemExit, match="JSON object"):
        evaluate_main([str(EVAL), "--methods", "scorecam", "--params", "top_k=8"])
    with pytest.raises(SystemExit, match="no parameter"):
        evaluate_main([str(EVAL), "--methods", "reciprocam", "--params", '{"reciprocam": {"k": 1}}'])
