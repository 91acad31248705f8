"""CAMSERVE_PRECISION and the noise of SS-CAM: a half-precision forward still gives the methods
float32 activations, gradients and logits (their epsilons stay meaningful, no NaN maps), the
CPU ignores the setting, and SS-CAM's noise on the CPU is the seeded CPU sequence it always was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from service.bench import sample_input
from service.cams import get_method, method_names
from service.cams.extractor import explain_batch
from service.cams.score import SSCAM
from service.config import Settings
from service.engine.worker import Worker
from service.models.loader import load_model
from service.models.spec import ModelSpec, embedded_default


@pytest.fixture(scope="module")
def loaded():  # type: ignore[no-untyped-def]
    return load_model(embedded_default(), torch.device("cpu"))


def _grids(loaded, names: list[str], autocast: bool) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    methods = [get_method(n, {"top_k_channels": 8} if n == "scorecam" else {}) for n in names]
    inputs = sample_input(loaded, torch.device("cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        output = explain_batch(loaded.runner(), inputs, [loaded.default_layer], methods, [None])
    return [m.grid for m in output.maps[0]]


def test_a_bfloat16_forward_gives_the_methods_float32_and_finite_maps(loaded) -> None:  # type: ignore[no-untyped-def]
    names = ["gradcam", "gradcampp", "layercam", "scorecam"]
    exact, half = _grids(loaded, names, False), _grids(loaded, names, True)
    for name, a, b in zip(names, exact, half, strict=True):
        assert b.dtype == torch.float32, name
        assert torch.isfinite(b).all(), name
        r = np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1]
        assert r > 0.95, (name, r)  # bf16 keeps 8 bits: close, not equal


# Costly methods trimmed; what is checked is the dtypes their extra passes hand back.
TRIMMED: dict[str, dict[str, object]] = {
    "scorecam": {"top_k_channels": 8}, "sscam": {"top_k_channels": 4, "num_samples": 2},
    "iscam": {"top_k_channels": 4, "num_samples": 2},
}


@pytest.mark.parametrize("name", method_names())
def test_every_method_computes_under_a_half_precision_forward(loaded, name: str) -> None:  # type: ignore[no-untyped-def]
    """CAMSERVE_PRECISION=bf16|fp16 puts every method's passes under autocast (on CUDA; the
    CPU's bf16 autocast stands in for it here, at a small input): extra passes come back in
    half precision, and a method must bring them to float32 before mixing them into its
    float32 maths (an index_put of a bf16 score into float32 weights is an error)."""
    method = get_method(name, TRIMMED.get(name, {}))
    if type(method).describe().unsuitable(loaded.info()):
        return  # refused on this model in every precision alike (tests/cams covers the refusal)
    inputs = torch.nn.functional.interpolate(sample_input(loaded, torch.device("cpu")), size=(96, 96),
                                             mode="bilinear", align_corners=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = explain_batch(loaded.runner(), inputs, [loaded.default_layer], [method], [None])
    (grid,) = [m.grid for m in output.maps[0]]
    assert grid.dtype == torch.float32 and torch.isfinite(grid).all(), name


@pytest.mark.parametrize("name", ["legrad", "vit_reciprocam"])
def test_the_transformer_methods_give_float32_maps_under_a_half_precision_forward(name: str) -> None:
    """The two methods only a ViT serves, as above (LeGrad's own maths on the attention
    gradients handed back a bf16 map)."""
    vit = load_model(ModelSpec(name="vit", architecture="vit_b_16", weights="random", seed=0),
                     torch.device("cpu"))
    inputs = torch.randn((1, 3, 224, 224), generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = explain_batch(vit.runner(), inputs, [vit.default_layer], [get_method(name)], [None])
    (grid,) = [m.grid for m in output.maps[0]]
    assert grid.dtype == torch.float32 and torch.isfinite(grid).all(), name


def test_the_cpu_ignores_the_precision() -> None:
    worker = Worker(torch.device("cpu"), threads=1, precision="bf16")
    with worker.autocast():
        assert not torch.is_autocast_enabled("cpu")
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32


def test_an_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="precision"):
        Worker(torch.device("cpu"), precision="fp8")
    with pytest.raises(ValidationError):
        Settings(precision="fp64")  # type: ignore[arg-type]
    assert Settings().precision == "fp32"


def test_sscam_noise_on_the_cpu_is_the_seeded_cpu_sequence() -> None:
    method = SSCAM(num_samples=2, std=2.0, seed=7)
    masks = torch.rand((3, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    generator = torch.Generator(device="cpu").manual_seed(7)
    varied = method.vary(masks, 0, generator)
    expected = masks + 2.0 * torch.randn(masks.shape, generator=torch.Generator().manual_seed(7))
    assert torch.equal(varied, expected)


def _cat_and_noise(loaded) -> torch.Tensor:  # type: ignore[no-untyped-def]
    noise = torch.randn((1, 3, 224, 224), generator=torch.Generator().manual_seed(3))
    return torch.cat([sample_input(loaded, torch.device("cpu")), noise])


HALF_PRECISION_METHODS = [name for name in method_names() if not get_method(name).full_precision]


@pytest.mark.parametrize("name", HALF_PRECISION_METHODS)
def test_the_methods_that_run_in_half_precision_keep_r_0999_under_a_bf16_forward(
    loaded, name: str  # type: ignore[no-untyped-def]
) -> None:
    """CAMSERVE_PRECISION=bf16 runs a batch under autocast only when none of its methods keeps
    full precision; every method it does run so must stay within r >= 0.999 of its float32 map
    (the CPU's bf16 autocast standing in for CUDA's: the same 8-bit mantissa). A new method
    that cannot is to declare ``full_precision``."""
    method = get_method(name)
    if type(method).describe().unsuitable(loaded.info()):
        return  # refused on this model in every precision alike (tests/cams covers the refusal)
    inputs = _cat_and_noise(loaded)
    grids = {}
    for half in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
            output = explain_batch(loaded.runner(), inputs, [loaded.default_layer], [method], [None, None])
        grids[half] = [sample[0].grid.double().flatten().numpy() for sample in output.maps]
    for exact, half in zip(grids[False], grids[True], strict=True):
        assert np.corrcoef(exact, half)[0, 1] >= 0.999, name


def test_half_precision_stays_with_the_methods_that_keep_it() -> None:
    """The worker's choice, batch by batch: autocast on CUDA in bf16/fp16 for the target
    layer's gradient and activation maps, float32 for a batch with any full-precision method,
    and never on the CPU or in fp32."""
    from service.engine.worker import autocast_dtype

    names = ("gradcam", "eigencam", "scorecam", "saliency")
    gradcam, eigencam, scorecam, saliency = (get_method(n) for n in names)
    assert autocast_dtype("cuda", "bf16", [gradcam, eigencam]) is torch.bfloat16
    assert autocast_dtype("cuda", "fp16", [gradcam]) is torch.float16
    assert autocast_dtype("cuda", "bf16", []) is torch.bfloat16  # /predict: the forward alone
    assert autocast_dtype("cuda", "bf16", [gradcam, scorecam]) is None
    assert autocast_dtype("cuda", "fp16", [saliency]) is None
    assert autocast_dtype("cuda", "fp32", [gradcam]) is None
    assert autocast_dtype("cpu", "bf16", [gradcam]) is None
    assert {"gradcam", "gradcampp", "layercam", "eigencam", "legrad"} <= set(HALF_PRECISION_METHODS)
    kept_exact = {"scorecam", "sscam", "iscam", "ablationcam", "reciprocam", "saliency", "fullgrad"}
    assert not kept_exact & set(HALF_PRECISION_METHODS)


def test_warm_up_also_runs_float32_where_full_precision_batches_will() -> None:
    """Under bf16/fp16 on CUDA the full-precision methods' batches run in float32: warm-up
    runs that precision too (cuDNN's kernels chosen, and the slower pass time measured for
    the request budget); elsewhere one precision is all there is."""
    assert Worker(torch.device("cuda", 0), precision="bf16").warm_precisions() == [False, True]
    assert Worker(torch.device("cuda", 0), precision="fp16").warm_precisions() == [False, True]
    assert Worker(torch.device("cuda", 0), precision="fp32").warm_precisions() == [False]
    assert Worker(torch.device("cpu"), precision="bf16").warm_precisions() == [False]
