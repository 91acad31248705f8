"""Device-side rendering (service.engine.device_render) checked on the CPU: its blend is the
API's blend byte for byte, its one-copy transfer gives back every array as it was, and a CPU
worker leaves overlays to the API exactly as before. tests/cuda runs the same on a GPU."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from service.api.options import ExplainForm, ExplainPlan, plan_explain
from service.api.render import Upload, explain_results
from service.cams import method_catalog
from service.engine import device_render
from service.engine.jobs import ExplainSpec, ItemResult, MapResult, WorkItem
from service.engine.worker import Worker
from service.imaging import encode
from service.imaging.decode import DecodeLimits, decode_image
from service.models.spec import embedded_default


def random_image(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def random_map(height: int, width: int, seed: int) -> np.ndarray:
    values = np.random.default_rng(seed).random((height, width), dtype=np.float32)
    values[0, :4] = [0.0, 1.0, 0.5 / 255, 1.5 / 255]  # the ends, and indices that round to even
    return values


@pytest.mark.parametrize("colormap", ["jet", "viridis", "gray"])
@pytest.mark.parametrize("fade", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.35, 1.0])
def test_device_blend_gives_the_apis_bytes(colormap: str, fade: bool, alpha: float) -> None:
    image, values = random_image(37, 53, 1), random_map(37, 53, 2)
    expected = encode.overlay(Image.fromarray(image), values, colormap, alpha, fade=fade)
    drawn = device_render.overlay(torch.from_numpy(values), torch.from_numpy(image), colormap, alpha, fade)
    assert drawn.dtype == torch.uint8 and tuple(drawn.shape) == (37, 53, 3)
    assert np.array_equal(drawn.numpy(), expected)


def test_one_copy_gives_back_every_array_as_it_was() -> None:
    tensors: list[torch.Tensor | None] = [
        torch.rand(5, 7), None, torch.randint(0, 256, (3, 4, 3), dtype=torch.uint8),
        torch.rand(2, 3)[:, 1],  # a strided view
        torch.rand(0, 4),
    ]
    for pack in (True, False):
        arrays = device_render.to_host(tensors, pack=pack)
        assert len(arrays) == len(tensors)
        for tensor, array in zip(tensors, arrays, strict=True):
            if tensor is None:
                assert array is None
                continue
            assert array is not None
            assert array.dtype == tensor.numpy().dtype and array.shape == tuple(tensor.shape)
            assert np.array_equal(array, tensor.numpy())


def test_images_that_are_not_rgb_uint8_are_not_sent() -> None:
    device = torch.device("cpu")
    grey = Image.fromarray(random_image(4, 5, 3)[:, :, 0])
    converted = device_render.image_to_device(grey, device)
    assert converted is not None and tuple(converted.shape) == (4, 5, 3)
    assert device_render.image_to_device(np.zeros((4, 5), np.float32), device) is None


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    cpu = Worker(torch.device("cpu"), 1)
    cpu.load([embedded_default()])
    yield cpu


def test_a_cpu_worker_leaves_overlays_to_the_api(worker: Worker) -> None:
    """Even asked to (overlay set, no display map wanted), the CPU worker draws nothing and
    returns the display map the API draws from, so the CPU path is what it always was."""
    spec = ExplainSpec(("gradcam",), ("features.18",), None, (224, 224), (30, 40),
                       overlay=("jet", 0.5, False), display_wanted=False)
    loop = asyncio.new_event_loop()
    try:
        item = WorkItem("mobilenet_v2", random_image(224, 224, 4), 5, spec, float("inf"),
                        loop.create_future(), overlay_base=Image.fromarray(random_image(30, 40, 5)))
        (result,) = worker.compute([item])
    finally:
        loop.close()
    (explanation,) = result.explanations
    assert explanation.overlay is None
    assert explanation.display is not None and explanation.display.shape == (30, 40)
    assert explanation.mask.shape == (224, 224)


def _explain_plan(worker: Worker, outputs: str) -> ExplainPlan:
    form = ExplainForm(file=[], outputs=outputs, colormap="jet", alpha=0.5)
    catalog = {name: loaded.info() for name, loaded in worker.models.items()}
    return plan_explain(form, catalog, method_catalog(), "mobilenet_v2")


def _png(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


def test_the_api_sends_a_worker_drawn_overlay_as_it_is(worker: Worker, cat_png: bytes) -> None:
    """A drawn overlay of the display size goes out as its PNG (no second blend); one of
    another size is ignored and the overlay drawn from the display map, as on the CPU."""
    frame = decode_image(cat_png, DecodeLimits(50_000_000, 64), "chelsea.png")[0]
    upload = Upload(0, "chelsea.png", frame, random_image(224, 224, 6))
    plan = _explain_plan(worker, "mask,overlay")
    display = random_map(frame.height, frame.width, 7)
    drawn = random_image(frame.height, frame.width, 8)
    expected = encode.overlay(frame.image, display, "jet", 0.5)

    def render(overlay: np.ndarray | None) -> np.ndarray:
        item = MapResult("gradcam", ("features.18",), 285, 0.9, random_map(224, 224, 9), display,
                         overlay=overlay)
        (body,) = explain_results(plan, [upload], [ItemResult([(285, 0.9)], [item], 0.0, 0.0)], 3)
        return _png(body["explanations"][0]["overlay_png"])

    assert np.array_equal(render(drawn), drawn)
    assert np.array_equal(render(None), expected)
    assert np.array_equal(render(drawn[:10]), expected)


def test_sending_an_image_leaves_other_threads_warning_filters_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA worker sends overlay bases from its own thread while the API's threads decode
    inside ``warnings.catch_warnings``: it must not swap the process's filter list (which
    catch_warnings does), or a thread's temporary "ignore everything" outlives it."""
    import threading
    import warnings

    inside, resume = threading.Event(), threading.Event()
    from_numpy = torch.from_numpy

    def held(array: np.ndarray) -> torch.Tensor:
        inside.set()
        assert resume.wait(10)
        return from_numpy(array)

    monkeypatch.setattr(torch, "from_numpy", held)
    before = list(warnings.filters)
    sent: list[torch.Tensor | None] = []
    thread = threading.Thread(target=lambda: sent.append(
        device_render.image_to_device(Image.fromarray(random_image(4, 5, 1)), torch.device("cpu"))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # another thread's temporary filter, here the test's
        thread.start()
        assert inside.wait(10)
    resume.set()
    thread.join(10)
    assert sent and sent[0] is not None and tuple(sent[0].shape) == (4, 5, 3)
    assert ("ignore", None, Warning, None, 0) not in warnings.filters
    assert [f for f in warnings.filters if f in before] == before
