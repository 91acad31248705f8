"""JPEGs decoded on the GPU (nvjpeg, CAMSERVE_GPU_DECODE=auto) against the same JPEGs decoded
on the host (CAMSERVE_GPU_DECODE=off), both computed on the same GPU: the maps, the overlays
drawn on the device and the shown image agree (r >= 0.999), and a corrupt JPEG falls back to
the host decode and gets its 415. Skipped without CUDA (make gpu-check runs it)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from service.engine.jobs import ItemResult, WorkItem
from service.engine.worker import Worker
from service.main import create_app
from service.models.spec import embedded_default
from tests.engine.fakes import ready_clients, settings
from tests.engine.test_device_decode import DATA, corrupt_jpeg, jpeg

pytestmark = pytest.mark.cuda


class Recording(Worker):
    """The torch worker on the GPU, noting what each item arrived as and whether the device's
    decoder was in use."""

    arrived: ClassVar[list[tuple[str, bool]]] = []

    def compute(self, items: Sequence[WorkItem]) -> list[ItemResult]:
        Recording.arrived.extend(("bytes" if item.encoded is not None else "pixels", self.device_jpeg)
                                 for item in items)
        return super().compute(items)


@pytest.fixture(scope="module")
def clients() -> Iterator[dict[str, TestClient]]:
    device = torch.device("cuda", 0)
    specs = [embedded_default()]
    apps = {
        mode: create_app(settings(device="cuda", gpu_decode=mode, max_batch_size=16, max_batch_delay_ms=50),
                         worker_factory=lambda d: Recording(d), specs=specs, devices=[device])
        for mode in ("off", "auto")
    }
    with ready_clients(apps) as clients:
        assert apps["auto"].state.engine.jpeg_on_device and not apps["off"].state.engine.jpeg_on_device
        yield clients


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


def _png(encoded: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGB"))


def _explain(client: TestClient, files: Sequence[bytes], **form: str) -> Any:
    response = client.post("/explain", files=[("file", (f"{i}.jpg", data, "image/jpeg"))
                                              for i, data in enumerate(files)], data=form)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def photos() -> list[bytes]:
    """The cat as it is, large (decoded reduced on the host), and small and wide."""
    cat = Image.open(DATA / "chelsea.png").convert("RGB")
    return [jpeg(cat), jpeg(cat.resize((2400, 1600))), jpeg(cat.resize((160, 90)))]


def test_gpu_decoded_maps_overlays_and_images_equal_the_host_decoded_ones(
    clients: dict[str, TestClient],
) -> None:
    form = {"outputs": "mask,overlay,image", "mask_size": "original", "methods": "gradcam,layercam"}
    Recording.arrived.clear()
    host = _explain(clients["off"], photos(), **form)
    assert {kind for kind, _ in Recording.arrived} == {"pixels"}
    Recording.arrived.clear()
    device = _explain(clients["auto"], photos(), **form)
    assert Recording.arrived == [("bytes", True)] * len(photos()), "decoded by nvjpeg, in one batch"
    for a, b in zip(host, device, strict=True):
        assert a["image"] == b["image"]
        assert a["predictions"][0]["class_idx"] == b["predictions"][0]["class_idx"]
        shown_a, shown_b = _png(a["image_png"]), _png(b["image_png"])
        assert shown_a.shape == shown_b.shape
        assert _pearson(shown_a, shown_b) >= 0.999
        for ea, eb in zip(a["explanations"], b["explanations"], strict=True):
            assert ea["mask"]["shape"] == eb["mask"]["shape"]
            assert _pearson(np.array(ea["mask"]["data"]), np.array(eb["mask"]["data"])) >= 0.999
            overlay_a, overlay_b = _png(ea["overlay_png"]), _png(eb["overlay_png"])
            assert overlay_a.shape == overlay_b.shape == shown_a.shape
            assert _pearson(overlay_a, overlay_b) >= 0.999


def test_a_corrupt_jpeg_falls_back_to_the_host_and_gets_its_415(clients: dict[str, TestClient]) -> None:
    answers = {}
    for mode, client in clients.items():
        response = client.post("/explain", files={"file": ("x.jpg", corrupt_jpeg(), "image/jpeg")})
        assert response.status_code == 415, response.text
        answers[mode] = response.json()["error"]
    assert answers["auto"]["code"] == answers["off"]["code"]
    assert answers["auto"]["message"] == answers["off"]["message"]
    engine = clients["auto"].app.state.engine  # type: ignore[attr-defined]
    assert engine.state == "ready", "a bad file is no device fault"
    # The same device keeps decoding the next JPEGs, a corrupt one beside good ones included.
    Recording.arrived.clear()
    assert len(_explain(clients["auto"], [jpeg()], outputs="mask")) == 1
    assert Recording.arrived == [("bytes", True)]
    mixed = clients["auto"].post("/explain", files=[("file", ("a.jpg", jpeg())),
                                                    ("file", ("b.jpg", corrupt_jpeg()))])
    assert mixed.status_code == 415
    assert engine.state == "ready"
