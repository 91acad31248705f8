"""``mask_dtype``: base64 masks as float32, float16 or uint8 (value x 255), decoded by the
client; lists stay float32; a mask nobody asked for is neither resized nor copied."""

from __future__ import annotations

import asyncio
import base64
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api.schemas import ExplainResponse
from service.client import decode_mask
from service.engine.jobs import ExplainSpec, WorkItem
from service.engine.worker import Worker
from service.imaging.encode import mask_from_base64, mask_to_base64
from service.models.spec import embedded_default

BYTES = {"float32": 4, "float16": 2, "uint8": 1}
# The most a value may move: float16 keeps 11 significant bits, uint8 rounds to 1/255.
TOLERANCE = {"float32": 0.0, "float16": 2.0 ** -12, "uint8": 0.5 / 255 + 1e-7}


def explain(client: TestClient, image: bytes, **form: str) -> dict:  # type: ignore[type-arg]
    response = client.post("/explain", files={"file": ("cat.png", image, "image/png")}, data=form)
    assert response.status_code == 200, response.text
    ExplainResponse.model_validate_json(response.content)
    return response.json()["results"][0]["explanations"][0]["mask"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("dtype", ["float32", "float16", "uint8"])
def test_base64_masks_travel_as_the_asked_dtype(client: TestClient, cat_png: bytes, dtype: str) -> None:
    exact = decode_mask(explain(client, cat_png, outputs="mask", mask_encoding="base64"))
    assert exact is not None
    mask = explain(client, cat_png, outputs="mask", mask_encoding="base64", mask_dtype=dtype)
    assert mask["dtype"] == dtype and mask["shape"] == [224, 224]
    assert len(base64.b64decode(mask["data"])) == 224 * 224 * BYTES[dtype]
    decoded = decode_mask(mask)
    assert decoded is not None and decoded.dtype == np.float32
    assert np.abs(decoded - exact).max() <= TOLERANCE[dtype]
    assert np.array_equal(decoded, mask_from_base64(mask["data"], (224, 224), dtype))
    assert decoded.min() == 0.0 and decoded.max() == 1.0  # the ends of [0, 1] survive


def test_lists_are_always_float32(client: TestClient, cat_png: bytes) -> None:
    plain = explain(client, cat_png, outputs="mask")
    asked = explain(client, cat_png, outputs="mask", mask_dtype="uint8")
    assert asked["dtype"] == "float32" and asked["data"] == plain["data"]


def test_an_unknown_mask_dtype_is_refused(client: TestClient, cat_png: bytes) -> None:
    response = client.post("/explain", files={"file": ("cat.png", cat_png, "image/png")},
                           data={"mask_encoding": "base64", "mask_dtype": "float64"})
    assert response.status_code == 422
    assert "mask_dtype" in response.text


def test_uint8_rounds_to_the_nearest_step() -> None:
    mask = np.array([[0.0, 0.5 / 255 - 1e-4, 0.5 / 255 + 1e-4, 1.0]], np.float32)
    raw = np.frombuffer(base64.b64decode(mask_to_base64(mask, "uint8")), np.uint8)
    assert raw.tolist() == [0, 0, 1, 255]


def test_the_client_refuses_a_dtype_it_does_not_know() -> None:
    with pytest.raises(ValueError, match="float64"):
        decode_mask({"shape": [1, 1], "dtype": "float64", "encoding": "base64", "data": "AAAAAAAAAAA="})


def test_a_mask_that_is_not_sent_stays_at_its_grid() -> None:
    worker = Worker(__import__("torch").device("cpu"), threads=1)
    worker.load([embedded_default()])

    async def compute(wanted: bool) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
        spec = ExplainSpec(("gradcam",), ("features.18",), None, (224, 224), (120, 160), mask_wanted=wanted)
        item = WorkItem("mobilenet_v2", np.zeros((224, 224, 3), np.uint8), 1, spec, time.monotonic() + 60,
                        asyncio.get_running_loop().create_future())
        (result,) = worker.compute([item])
        found = result.explanations[0]
        return found.mask.shape, None if found.display is None else found.display.shape

    assert asyncio.run(compute(True)) == ((224, 224), (120, 160))
    assert asyncio.run(compute(False)) == ((7, 7), (120, 160))  # the display is still made
