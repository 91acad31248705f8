"""CAMSERVE_PRECISION and the noise of SS-CAM: a half-precision forward still gives the methods
float32 activations, gradients and logits (their epsilons stay meaningful, no NaN maps), the
CPU ignores the setting, and SS-CAM's noise on the CPU is the seeded CPU sequence it always was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from service.bench import sample_input
from service.cams import get_method
from service.cams.extractor import explain_batch
from service.cams.score import SSCAM
from service.config import Settings
from service.engine.worker import Worker
from service.models.loader import load_model
from service.models.spec import embedded_default


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
