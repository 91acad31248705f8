"""What /explain and /predict send: the schema's JSON, exact float32 mask lists, lossless PNGs,
and a Server-Timing header with each stage of the request."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.api.pipeline import parse_server_timing, server_timing
from service.api.schemas import ExplainResponse, PredictResponse
from service.imaging.encode import mask_from_base64


def post(client: TestClient, path: str, image: bytes, **form: str):  # type: ignore[no-untyped-def]
    response = client.post(path, files={"file": ("cat.png", image, "image/png")}, data=form)
    assert response.status_code == 200, response.text
    return response


def test_explain_body_is_the_schema_and_nothing_else(client: TestClient, cat_png: bytes) -> None:
    response = post(client, "/explain", cat_png, outputs="mask,overlay,heatmap", mask_size="input")
    assert response.headers["content-type"] == "application/json"
    parsed = ExplainResponse.model_validate_json(response.content)  # extra keys are refused
    assert parsed.model_dump(mode="json", exclude_unset=True) == response.json()
    explanation = parsed.results[0].explanations[0]
    assert explanation.mask is not None and tuple(explanation.mask.shape) == (224, 224)


def test_predict_body_is_the_schema(client: TestClient, cat_png: bytes) -> None:
    response = post(client, "/predict", cat_png, topk="3")
    parsed = PredictResponse.model_validate_json(response.content)
    assert len(parsed.results[0].predictions) == 3


def test_mask_lists_carry_the_float32_values_exactly(client: TestClient, cat_png: bytes) -> None:
    listed = post(client, "/explain", cat_png, outputs="mask").json()
    encoded = post(client, "/explain", cat_png, outputs="mask", mask_encoding="base64").json()
    values = np.asarray(listed["results"][0]["explanations"][0]["mask"]["data"], dtype=np.float32)
    exact = mask_from_base64(encoded["results"][0]["explanations"][0]["mask"]["data"], (224, 224))
    assert np.array_equal(values, exact)


def test_overlay_png_is_the_blend_of_the_photo_and_the_returned_map(
    client: TestClient, cat_png: bytes
) -> None:
    """With the mask asked at the original size, the overlay is that mask through the colour map."""
    from service.imaging.encode import overlay

    body = post(client, "/explain", cat_png, outputs="mask,overlay", mask_size="original",
                mask_encoding="base64", colormap="viridis", alpha="0.4").json()
    explanation = body["results"][0]["explanations"][0]
    mask = mask_from_base64(explanation["mask"]["data"], (300, 451))
    with Image.open(io.BytesIO(base64.b64decode(explanation["overlay_png"]))) as png:
        assert (png.format, png.mode, png.size) == ("PNG", "RGB", (451, 300))
        shown = np.asarray(png)
    photo = Image.open(io.BytesIO(cat_png)).convert("RGB")
    assert np.array_equal(shown, overlay(photo, mask, "viridis", 0.4))


@pytest.mark.parametrize("path", ["/explain", "/predict"])
def test_server_timing_names_every_stage(client: TestClient, cat_png: bytes, path: str) -> None:
    response = post(client, path, cat_png)
    stages = parse_server_timing(response.headers["server-timing"])
    assert list(stages) == ["decode", "queue", "compute", "render", "json", "total"]
    assert all(ms >= 0 for ms in stages.values())
    timing = response.json()["timing_ms"]
    assert (stages["queue"], stages["compute"], stages["render"]) == (
        timing["queue"], timing["compute"], timing["encode"])
    assert stages["total"] >= timing["total"]
    assert stages["total"] >= stages["decode"] + stages["compute"]


def test_server_timing_round_trips() -> None:
    stages = {"decode": 1.25, "queue": 0.0, "json": 12.5}
    assert server_timing(stages) == "decode;dur=1.25, queue;dur=0, json;dur=12.5"
    assert parse_server_timing(server_timing(stages)) == stages
    assert parse_server_timing('db;desc="x";dur=3, cache') == {"db": 3.0}
