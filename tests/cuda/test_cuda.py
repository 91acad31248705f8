"""What only a CUDA device shows (``make gpu-check`` runs these; skipped without CUDA, the
suite's only skips): the maps on CUDA equal the CPU's for every method, out-of-memory splits
on the device and caps later batches, a real device-side assert is fatal, every GPU computes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from service.bench import sample_input
from service.cams import get_method, method_names
from service.cams.extractor import explain_batch
from service.engine.engine import Engine
from service.engine.jobs import ExplainSpec, WorkItem
from service.engine.pool import is_fatal_device_error
from service.engine.worker import Worker
from service.metrics import Metrics
from service.models.loader import LoadedModel, load_model
from service.models.spec import embedded_default
from tests.engine.fakes import settings

pytestmark = pytest.mark.cuda
ROOT = Path(__file__).resolve().parents[2]

# Costly methods trimmed so the CPU side finishes in seconds; the maths is the same.
PARAMS: dict[str, dict[str, object]] = {
    "scorecam": {"top_k_channels": 64}, "sscam": {"top_k_channels": 16, "num_samples": 4},
    "iscam": {"top_k_channels": 16, "num_samples": 4},
}
# In bf16, Score-CAM keeps more channels: the top 64 by mean activation on these noise images
# include channels whose means differ by less than bf16's rounding, so the two precisions pick
# a few different channels and the maps part for a reason other than precision (on the CPU's
# bf16 autocast: r 0.987 for one image at 64 channels, >= 0.9994 for all four at 256).
BF16_PARAMS: dict[str, dict[str, object]] = {**PARAMS, "scorecam": {"top_k_channels": 256}}


@pytest.fixture(scope="module")
def exact_fp32() -> Iterator[None]:
    """No TF32 anywhere: fp32 on the GPU then agrees with the CPU to rounding."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def models() -> dict[str, LoadedModel]:
    spec = embedded_default()
    return {"cpu": load_model(spec, torch.device("cpu")), "cuda": load_model(spec, torch.device("cuda", 0))}


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    if a.std() < 1e-12 and b.std() < 1e-12:  # two constant maps: equal or not
        return 1.0 if np.allclose(a, b) else 0.0
    return float(np.corrcoef(a, b)[0, 1])


def _maps(loaded: LoadedModel, name: str) -> np.ndarray:
    method = get_method(name, PARAMS.get(name, {}))
    inputs = sample_input(loaded, loaded.device).expand(2, -1, -1, -1).contiguous()
    output = explain_batch(loaded.runner(), inputs, [loaded.default_layer], [method],
                           [None, [281]])
    return np.stack([m.grid.float().cpu().numpy() for sample in output.maps for m in sample])


@pytest.mark.parametrize("name", method_names())
def test_cuda_maps_equal_the_cpu_maps(name: str, models: dict[str, LoadedModel], exact_fp32: None) -> None:
    reason = type(get_method(name)).describe().unsuitable(models["cpu"].info())
    if reason:  # not a skip: such a method is refused on this model on every device alike
        with pytest.raises(Exception):  # noqa: B017
            _maps(models["cuda"], name)
        return
    cpu, cuda = _maps(models["cpu"], name), _maps(models["cuda"], name)
    assert cpu.shape == cuda.shape
    assert np.isfinite(cuda).all()
    if name == "sscam":  # its noise is drawn on the device, by that device's generator
        assert np.array_equal(cuda, _maps(models["cuda"], name)), "the same seed, the same map"
        return
    for a, b in zip(cpu, cuda, strict=True):
        assert _pearson(a, b) >= 0.9999, name


def _items(count: int, loop: asyncio.AbstractEventLoop, seed: int = 0) -> list[WorkItem]:
    rng = np.random.default_rng(seed)
    spec = ExplainSpec(("gradcam",), ("features.18",), None, (224, 224), None)
    return [WorkItem("mobilenet_v2", rng.integers(0, 256, (224, 224, 3), dtype=np.uint8), 1, spec,
                     time.monotonic() + 600, loop.create_future()) for _ in range(count)]


def test_out_of_memory_on_the_gpu_splits_and_caps_later_batches() -> None:
    device = torch.device("cuda", 0)

    async def test() -> None:
        engine = Engine(settings(device="cuda", max_batch_size=512, max_queue=4096, max_batch_delay_ms=200,
                                 warmup=False, max_request_passes=100_000, request_timeout_s=600),
                        [embedded_default()], metrics=Metrics(), devices=[device])
        await engine.start()
        assert engine.state == "ready", engine.failure
        try:
            loop = asyncio.get_running_loop()
            reference = [r.predictions[0][0] for r in await engine.submit(_items(8, loop))]
            torch.cuda.synchronize(device)
            # Room for the model and a few GiB of activations: a batch of 512 does not fit.
            total = torch.cuda.get_device_properties(device).total_memory
            allowed = torch.cuda.memory_reserved(device) + 3 * 2**30
            torch.cuda.set_per_process_memory_fraction(min(1.0, allowed / total), device)
            try:
                big = await engine.submit(_items(512, loop))
                assert len(big) == 512
                assert [r.predictions[0][0] for r in big[:8]] == reference  # the same seed's images
                assert engine._too_big, "no batch ran out of memory: the test proves nothing"
                cap = min(engine._fitted.values())
                assert 1 <= cap < 512
                again = await engine.submit(_items(512, loop, seed=1))
                assert {r.batch_size for r in again} <= set(range(1, cap + 1))
            finally:
                torch.cuda.set_per_process_memory_fraction(1.0, device)
        finally:
            await engine.stop(drain_timeout_s=60)
            torch.cuda.empty_cache()

    asyncio.run(test())


def test_a_real_device_side_assert_is_fatal() -> None:
    """In a process of its own: the assert poisons that process's CUDA context."""
    import subprocess
    import sys

    code = ("import torch\nfrom service.engine.pool import is_fatal_device_error\n"
            "x = torch.zeros(4, device='cuda')\ntry:\n"
            "    y = x[torch.tensor([1 << 20], device='cuda')]\n    torch.cuda.synchronize()\n"
            "    print('no error')\nexcept Exception as exc:\n"
            "    kind = 'fatal' if is_fatal_device_error(exc) else 'ordinary'\n"
            "    print(kind, type(exc).__name__, str(exc)[:200])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert done.stdout.startswith("fatal"), done.stdout + done.stderr
    assert not is_fatal_device_error(torch.OutOfMemoryError("CUDA out of memory"))


class _Counting(Worker):
    computed: ClassVar[dict[str, int]] = {}

    def compute(self, items):  # type: ignore[no-untyped-def]
        _Counting.computed[str(self.device)] = _Counting.computed.get(str(self.device), 0) + len(items)
        return super().compute(items)


def test_every_visible_gpu_computes() -> None:
    devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    _Counting.computed = {}

    async def test() -> None:
        engine = Engine(settings(device="cuda", max_batch_size=4, max_queue=1024, warmup=False),
                        [embedded_default()], lambda d: _Counting(d), Metrics(), devices)
        await engine.start()
        assert engine.state == "ready", engine.failure
        try:
            loop = asyncio.get_running_loop()
            answers = await asyncio.gather(*(engine.submit(_items(4, loop, seed=s)) for s in range(16)))
            assert sum(len(a) for a in answers) == 64
        finally:
            await engine.stop(drain_timeout_s=60)

    asyncio.run(test())
    assert set(_Counting.computed) == {str(d) for d in devices}, _Counting.computed


@pytest.fixture(scope="module")
def bf16_workers() -> dict[str, Worker]:
    """A CPU worker (float32) and a CUDA one with CAMSERVE_PRECISION=bf16, as they serve."""
    spec = embedded_default()
    workers = {"cpu": Worker(torch.device("cpu")), "cuda": Worker(torch.device("cuda", 0), precision="bf16")}
    for worker in workers.values():
        worker.load([spec])
    return workers


@pytest.mark.parametrize("name", method_names())
def test_bf16_maps_are_close_to_the_cpu_fp32_maps(name: str, bf16_workers: dict[str, Worker]) -> None:
    """CAMSERVE_PRECISION=bf16 through the worker as it serves (folded, channels-last), every
    method: r >= 0.999 against the CPU's float32 maps. The methods that keep full precision
    (CAMMethod.full_precision) run in float32 there, so they must match as closely."""
    method = get_method(name, BF16_PARAMS.get(name, {}))
    if type(method).describe().unsuitable(bf16_workers["cpu"].models["mobilenet_v2"].info()):
        return  # refused on this model in every precision alike (the fp32 test checks the refusal)

    async def masks(worker: Worker) -> list[np.ndarray]:
        params = tuple(sorted(BF16_PARAMS.get(name, {}).items()))
        explain = ExplainSpec((name,), ("features.18",), None, (224, 224), None,
                              method_params=((name, params),) if params else ())
        rng = np.random.default_rng(3)
        loop = asyncio.get_running_loop()
        items = [WorkItem("mobilenet_v2", rng.integers(0, 256, (224, 224, 3), dtype=np.uint8), 1, explain,
                          time.monotonic() + 600, loop.create_future()) for _ in range(4)]
        return [r.explanations[0].mask for r in worker.compute(items)]

    cuda = asyncio.run(masks(bf16_workers["cuda"]))
    assert all(np.isfinite(b).all() for b in cuda), name
    if name == "sscam":  # its noise is drawn on the device, by that device's generator
        again = asyncio.run(masks(bf16_workers["cuda"]))
        assert all(np.array_equal(a, b) for a, b in zip(cuda, again, strict=True)), "same seed, same map"
        return
    cpu = asyncio.run(masks(bf16_workers["cpu"]))
    for a, b in zip(cpu, cuda, strict=True):
        assert _pearson(a, b) >= (0.9999 if method.full_precision else 0.999), name


def _overlay_items(loop: asyncio.AbstractEventLoop, display_wanted: bool) -> list[WorkItem]:
    """Three photos-to-be at 451x300 whose overlays the worker is asked for."""
    from PIL import Image

    rng = np.random.default_rng(5)
    spec = ExplainSpec(("gradcam",), ("features.18",), None, (224, 224), (300, 451),
                       overlay=("jet", 0.5, True), display_wanted=display_wanted)
    return [WorkItem("mobilenet_v2", rng.integers(0, 256, (224, 224, 3), dtype=np.uint8), 1, spec,
                     time.monotonic() + 600, loop.create_future(),
                     overlay_base=Image.fromarray(rng.integers(0, 256, (300, 451, 3), dtype=np.uint8)))
            for _ in range(3)]


def test_cuda_overlays_are_drawn_on_the_device_and_match_the_cpus(exact_fp32: None) -> None:
    """The CUDA worker resizes, colours and blends on the device (one pinned copy back); its
    masks and overlays match what the CPU worker's maps give through the API's own blend."""
    from service.imaging import encode

    spec = embedded_default()
    cpu, cuda = Worker(torch.device("cpu")), Worker(torch.device("cuda", 0))
    for worker in (cpu, cuda):
        worker.load([spec])

    async def run(worker: Worker, display_wanted: bool) -> list[tuple[np.ndarray, np.ndarray | None,
                                                                       np.ndarray | None, object]]:
        items = _overlay_items(asyncio.get_running_loop(), display_wanted)
        return [(r.explanations[0].mask, r.explanations[0].display, r.explanations[0].overlay, i.overlay_base)
                for r, i in zip(worker.compute(items), items, strict=True)]

    on_cpu = asyncio.run(run(cpu, True))
    for display_wanted in (True, False):
        on_cuda = asyncio.run(run(cuda, display_wanted))
        for (mask, display, drawn, base), (cuda_mask, cuda_display, cuda_drawn, _) in zip(
                on_cpu, on_cuda, strict=True):
            assert drawn is None and display is not None  # the CPU leaves drawing to the API
            assert _pearson(mask, cuda_mask) >= 0.9999
            assert (cuda_display is not None) is display_wanted
            assert cuda_drawn is not None and cuda_drawn.dtype == np.uint8
            assert cuda_drawn.shape == (300, 451, 3)
            expected = encode.overlay(base, display, "jet", 0.5, fade=True)  # type: ignore[arg-type]
            difference = np.abs(cuda_drawn.astype(np.int16) - expected.astype(np.int16))
            # The maps differ by float rounding only: an index one step off, here and there.
            assert (difference == 0).mean() >= 0.99 and difference.max() <= 8


def test_one_pinned_copy_brings_every_array_back() -> None:
    from service.engine import device_render

    device = torch.device("cuda", 0)
    tensors = [torch.rand(5, 7, device=device), None,
               torch.randint(0, 256, (3, 4, 3), dtype=torch.uint8, device=device)]
    arrays = device_render.to_host(tensors)
    assert arrays[1] is None
    for tensor, array in zip([tensors[0], tensors[2]], [arrays[0], arrays[2]], strict=True):
        assert tensor is not None and array is not None
        assert np.array_equal(array, tensor.cpu().numpy())
