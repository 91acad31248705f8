"""JPEGs decoded by the worker (CAMSERVE_GPU_DECODE), checked on the CPU.

With every slot on CUDA (a fake "cuda" slot here: constructing the device needs no GPU), the
API reads a baseline RGB JPEG's header, checks its limits and hands the worker the bytes;
every other file, and every file on a CPU engine or with the setting off, is decoded on the
host as before. A real worker on the CPU behind such a slot runs the device path itself
(torchvision's decoder on the CPU, the same resize) and must answer as the host path does,
a corrupt JPEG included (the same 415). tests/cuda runs the same on a GPU with nvjpeg.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from service.engine.jobs import ExplainSpec, ItemResult, WorkItem
from service.engine.worker import Worker
from service.errors import UnsupportedMedia
from service.imaging.decode import DecodeLimits, decode_image
from service.imaging.encoded import routed_frame
from service.imaging.limits import ByteBudget
from service.imaging.preprocess import resize_for_model
from service.main import create_app
from service.models.spec import embedded_default
from tests.engine.fakes import Script, ready_clients, settings
from tests.imaging import dicom_samples, samples

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
DATA = __import__("pathlib").Path(__file__).resolve().parents[1] / "data"


def jpeg(image: Image.Image | None = None, **options: Any) -> bytes:
    buffer = io.BytesIO()
    (image or cat()).save(buffer, format="JPEG", quality=90, **options)
    return buffer.getvalue()


def cat() -> Image.Image:
    return Image.open(DATA / "chelsea.png").convert("RGB")


def corrupt_jpeg() -> bytes:
    """A baseline JPEG whose header reads fine and whose Huffman table neither libjpeg nor
    nvjpeg accepts: only a decode finds it out."""
    data = bytearray(jpeg())
    table = data.index(b"\xff\xc4")
    data[table + 5:table + 21] = bytes([255] * 16)  # more codes than any table can hold
    return bytes(data)


@contextmanager
def fake_serving(
    script: Script, devices: Sequence[torch.device], **overrides: object
) -> Iterator[TestClient]:
    app = create_app(settings(**overrides), worker_factory=script.factory, devices=devices)
    with TestClient(app) as client:
        client.portal.call(app.state.engine.wait_ready)
        assert app.state.engine.state == "ready", app.state.engine.failure
        yield client


def post(client: TestClient, route: str, data: bytes, name: str = "x.jpg", **form: str) -> Any:
    return client.post(route, files={"file": (name, data, "application/octet-stream")}, data=form)


def sent(script: Script) -> WorkItem:
    return script.items[-1]


def test_a_cuda_engine_is_sent_a_baseline_jpeg_as_bytes_and_other_files_as_pixels() -> None:
    script = Script()
    with fake_serving(script, [CUDA]) as client:
        assert post(client, "/explain", jpeg()).status_code == 200
        item = sent(script)
        assert item.pixels is None and item.encoded is not None
        assert (item.encoded.width, item.encoded.height) == cat().size
        assert item.encoded.base_size == (cat().height, cat().width)  # the overlay is drawn on it
        assert item.encoded.data == jpeg()
        # Only a mask: nothing shown, so nothing to send back.
        assert post(client, "/explain", jpeg(), outputs="mask").status_code == 200
        assert sent(script).encoded is not None and sent(script).encoded.base_size is None
        assert post(client, "/predict", jpeg()).status_code == 200
        assert sent(script).encoded is not None and sent(script).encoded.base_size is None
        others = {
            "png": samples.save(cat(), "PNG"),
            "dicom": dicom_samples.grey(samples.ramp16()),
            "progressive jpeg": jpeg(progressive=True),
            "greyscale jpeg": jpeg(cat().convert("L")),
            "rotated jpeg": samples.jpeg_with_orientation(6),
        }
        for kind, data in others.items():
            response = post(client, "/explain", data, name="x")
            assert response.status_code == 200, (kind, response.text)
            assert sent(script).encoded is None and sent(script).pixels is not None, kind
            assert sent(script).pixels.shape == (224, 224, 3), kind  # type: ignore[union-attr]


def test_kserve_jpegs_are_sent_as_bytes_too() -> None:
    script = Script()
    instance = {"image": {"b64": base64.b64encode(jpeg()).decode()}}
    with fake_serving(script, [CUDA]) as client:
        for verb in ("predict", "explain"):
            response = client.post(f"/v1/models/mobilenet_v2:{verb}", json={"instances": [instance]})
            assert response.status_code == 200, response.text
            assert sent(script).pixels is None and sent(script).encoded is not None, verb


def test_a_cpu_engine_and_the_setting_off_get_pixels_as_before() -> None:
    for devices, overrides in (([CPU], {}), ([CUDA], {"gpu_decode": "off"}), ([CUDA, CPU], {})):
        script = Script()
        with fake_serving(script, devices, **overrides) as client:
            assert post(client, "/explain", jpeg()).status_code == 200
            assert sent(script).encoded is None and sent(script).pixels is not None, (devices, overrides)


def test_two_gpus_get_pixels_since_torchvision_has_one_decoder_per_process() -> None:
    """torchvision rebuilds (and leaks) its one nvjpeg decoder at every change of device, so
    only a single CUDA device is handed JPEG bytes; with two GPUs the host decodes."""
    script = Script()
    with fake_serving(script, [CUDA, torch.device("cuda", 1)]) as client:
        assert not client.app.state.engine.jpeg_on_device  # type: ignore[attr-defined]
        assert post(client, "/explain", jpeg()).status_code == 200
        assert sent(script).encoded is None and sent(script).pixels is not None
        assert {kind for kind, _ in script.device_batches} == {"cuda"}


def test_a_corrupt_jpeg_is_checked_only_by_decoding() -> None:
    # Its header passes (so it is routed), which is why the worker must answer it 415 itself.
    limits = DecodeLimits(10**8, 4, reduce_to=(1024, 224))
    assert routed_frame(corrupt_jpeg(), limits, "x.jpg", 1024, True) is not None


def test_limits_are_charged_from_the_header_as_the_host_decode_charges_them() -> None:
    script = Script()
    with fake_serving(script, [CUDA], max_image_pixels=1000) as client:
        response = post(client, "/explain", jpeg())
        assert response.status_code == 413 and "pixels" in response.json()["error"]["message"]
        assert script.items == []
    large = jpeg(cat().resize((2400, 1600)))  # libjpeg decodes it at half size on the host
    for data in (jpeg(), large):
        charged = []
        for route in (True, False):
            budget = ByteBudget(10**9)
            limits = DecodeLimits(10**8, 4, max_frame_bytes=10**8, request_bytes=budget,
                                  reduce_to=(1024, 224))
            if route:
                assert routed_frame(data, limits, "x.jpg", 1024, True) is not None
            else:
                decode_image(data, limits)
            charged.append(budget.spent)
        assert charged[0] == charged[1] > 0


# --- a real worker (CPU) behind a CUDA slot runs the device path ----------------------------


class Recording(Worker):
    """The torch worker on the CPU, noting what each computed item arrived as."""

    arrived: ClassVar[list[str]] = []

    def compute(self, items: Sequence[WorkItem]) -> list[ItemResult]:
        Recording.arrived.extend("bytes" if item.encoded is not None else "pixels" for item in items)
        return super().compute(items)


@pytest.fixture(scope="module")
def clients() -> Iterator[dict[str, TestClient]]:
    specs = [embedded_default()]
    real = settings(warmup=False, max_batch_size=8)
    apps = {
        "host": create_app(real, worker_factory=lambda _d: Worker(CPU, 1), specs=specs, devices=[CPU]),
        "device": create_app(real, worker_factory=lambda _d: Recording(CPU, 1), specs=specs, devices=[CUDA]),
    }
    with ready_clients(apps) as clients:
        yield clients


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


def _png(encoded: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGB"))


def test_the_device_path_answers_as_the_host_path(clients: dict[str, TestClient]) -> None:
    form = {"outputs": "mask,overlay,heatmap,image", "mask_size": "original"}
    Recording.arrived.clear()
    host = post(clients["host"], "/explain", jpeg(), **form)
    device = post(clients["device"], "/explain", jpeg(), **form)
    assert host.status_code == device.status_code == 200, device.text
    assert Recording.arrived == ["bytes"]
    (a,), (b,) = host.json()["results"], device.json()["results"]
    assert a["image"] == b["image"]
    assert a["predictions"][0]["class_idx"] == b["predictions"][0]["class_idx"]
    assert abs(a["predictions"][0]["score"] - b["predictions"][0]["score"]) < 0.02
    shown_a, shown_b = _png(a["image_png"]), _png(b["image_png"])
    assert shown_a.shape == shown_b.shape == (cat().height, cat().width, 3)
    assert np.abs(shown_a.astype(int) - shown_b.astype(int)).mean() < 2.0
    ea, eb = a["explanations"][0], b["explanations"][0]
    assert ea["mask"]["shape"] == eb["mask"]["shape"]
    assert _pearson(np.array(ea["mask"]["data"]), np.array(eb["mask"]["data"])) >= 0.999
    assert _pearson(_png(ea["overlay_png"]), _png(eb["overlay_png"])) >= 0.999


def test_predictions_from_bytes_equal_those_from_pixels(clients: dict[str, TestClient]) -> None:
    host = post(clients["host"], "/predict", jpeg(), topk="3").json()["results"][0]["predictions"]
    device = post(clients["device"], "/predict", jpeg(), topk="3").json()["results"][0]["predictions"]
    assert [p["class_idx"] for p in host] == [p["class_idx"] for p in device]


def test_a_corrupt_jpeg_is_the_same_415_and_the_service_keeps_serving(clients: dict[str, TestClient]) -> None:
    Recording.arrived.clear()
    host = post(clients["host"], "/explain", corrupt_jpeg())
    device = post(clients["device"], "/explain", corrupt_jpeg())
    assert Recording.arrived == ["bytes"], "the device path was taken"
    assert host.status_code == device.status_code == 415
    for key in ("code", "message"):
        assert device.json()["error"][key] == host.json()["error"][key]
    assert "could not be decoded" in device.json()["error"]["message"]
    assert post(clients["device"], "/explain", jpeg()).status_code == 200


@pytest.fixture(scope="module")
def worker() -> Worker:
    loaded = Worker(CPU, 1)
    loaded.load([embedded_default()])
    return loaded


def _compute(worker: Worker, *inputs: bytes | np.ndarray) -> list[ItemResult]:
    """One batch: JPEG bytes as encoded items (as the API routes them), arrays as pixels."""
    loop = asyncio.new_event_loop()
    try:
        limits = DecodeLimits(10**8, 4, reduce_to=(1024, 224))
        spec = ExplainSpec(("gradcam",), ("features.18",), None, (224, 224), None)
        items = []
        for one in inputs:
            if isinstance(one, bytes):
                routed = routed_frame(one, limits, "x.jpg", 1024, False)
                assert routed is not None
                items.append(WorkItem("mobilenet_v2", None, 1, spec, time.monotonic() + 60,
                                      loop.create_future(), encoded=routed[1]))
            else:
                items.append(WorkItem("mobilenet_v2", one, 1, spec, time.monotonic() + 60,
                                      loop.create_future()))
        return worker.compute(items)
    finally:
        loop.close()


def test_in_one_batch_only_the_corrupt_jpeg_fails(worker: Worker) -> None:
    pixels = np.asarray(cat().resize((224, 224), Image.Resampling.BILINEAR))
    results = _compute(worker, jpeg(), corrupt_jpeg(), pixels)
    assert [type(r.error) for r in results] == [type(None), UnsupportedMedia, type(None)]
    assert "could not be decoded" in str(results[1].error)
    good, _, plain = results
    assert good.predictions[0][0] == plain.predictions[0][0]
    assert _pearson(good.explanations[0].mask, plain.explanations[0].mask) >= 0.99


def test_a_device_decoder_that_fails_its_warm_up_is_not_used(worker: Worker) -> None:
    worker._warm_decoder()
    assert worker.device_jpeg  # torchvision's decoder reads JPEGs on the CPU
    worker.device_jpeg = False
    try:
        on_host = _compute(worker, jpeg())[0]
    finally:
        worker.device_jpeg = True
    # Exactly the API's host decode: Pillow's pixels, resized as resize_for_model does.
    decoded = Image.open(io.BytesIO(jpeg())).convert("RGB")
    plain = _compute(worker, resize_for_model(decoded, (224, 224)))[0]
    assert on_host.error is None
    np.testing.assert_allclose(on_host.explanations[0].mask, plain.explanations[0].mask, atol=1e-6)
