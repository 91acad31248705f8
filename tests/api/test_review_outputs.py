"""What the review page needs from /explain: the displayed frame, the window, input warnings,
the fade blend and the colour map tables."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import pydicom
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.data import get_testdata_file

from service.imaging.colormaps import COLORMAPS, lookup_table
from service.imaging.decode import window_bounds, window_to_uint8

CT = get_testdata_file("CT_small.dcm")


def _ct_bytes() -> bytes:
    with open(str(CT), "rb") as handle:
        return handle.read()


def _png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(int)


def _explain(client: TestClient, data: bytes, name: str, **form: Any) -> dict[str, Any]:
    response = client.post("/explain", files={"file": (name, data)}, data=form)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()["results"][0]
    return result


def _hounsfield() -> np.ndarray:
    ds = pydicom.dcmread(str(CT))
    return np.asarray(ds.pixel_array, dtype=np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def test_image_output_is_the_windowed_frame_and_reports_its_window(client: TestClient) -> None:
    hu = _hounsfield()
    result = _explain(client, _ct_bytes(), "ct.dcm", outputs="image")
    frame = _png(result["image_png"])
    assert frame.shape == (*hu.shape, 3)
    # CT_small has no window of its own: its full range, reported as centre and width.
    window = result["image"]["window"]
    assert window["centre"] == (hu.min() + hu.max()) / 2 + 0.5
    assert window["width"] == hu.max() - hu.min() + 1
    assert window["source"] == "range"
    assert np.array_equal(frame[..., 0], window_to_uint8(hu))
    assert result["image"]["modality"] == "CT"

    lung = _explain(client, _ct_bytes(), "ct.dcm", outputs="image", window="-600,1500")
    assert lung["image"]["window"] == {"centre": -600.0, "width": 1500.0, "source": "request"}
    expected = window_to_uint8(hu, *window_bounds((-600.0, 1500.0)))
    assert np.array_equal(_png(lung["image_png"])[..., 0], expected)
    assert not np.array_equal(expected, frame[..., 0])


def test_window_applies_to_16_bit_png_and_is_refused_when_malformed(
    client: TestClient, cat_png: bytes
) -> None:
    grey = (np.asarray(Image.open(io.BytesIO(cat_png)).convert("L"), dtype=np.uint16) * 200)
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="PNG")
    result = _explain(client, buffer.getvalue(), "scan16.png", outputs="image", window="25000,10000")
    assert result["image"]["window"] == {"centre": 25000.0, "width": 10000.0, "source": "request"}
    expected = window_to_uint8(grey, *window_bounds((25000.0, 10000.0)))
    assert np.array_equal(_png(result["image_png"])[..., 0], expected)
    # An 8-bit photo has no window, and is shown as it is.
    photo = _explain(client, cat_png, "cat.png", outputs="image", window="40,400")
    assert "window" not in photo["image"] and "modality" not in photo["image"]
    original = np.asarray(Image.open(io.BytesIO(cat_png)).convert("RGB"))
    assert np.array_equal(_png(photo["image_png"]), original)
    for bad, status in (("40", 400), ("a,b", 400), ("40,0", 422)):
        answer = client.post("/explain", files={"file": ("cat.png", cat_png)}, data={"window": bad})
        assert answer.status_code == status, (bad, answer.text)
        assert "window" in answer.json()["error"]["message"]


def test_a_ct_on_the_photo_model_is_warned_about(client: TestClient, cat_png: bytes) -> None:
    result = _explain(client, _ct_bytes(), "ct.dcm", outputs="mask")
    assert len(result["warnings"]) == 1
    warning = result["warnings"][0]
    assert warning.startswith("CT input") and "mobilenet_v2" in warning
    assert "natural photographs (ImageNet)" in warning
    assert _explain(client, cat_png, "cat.png", outputs="mask")["warnings"] == []
    predicted = client.post("/predict", files={"file": ("ct.dcm", _ct_bytes())}).json()
    assert predicted["results"][0]["warnings"] == [warning]
    model = client.get("/models").json()["models"][0]
    assert model["modalities"] == [] and model["domain"] == "natural photographs (ImageNet)"


def test_fade_overlay_follows_the_documented_formula(client: TestClient, cat_png: bytes) -> None:
    form = {"outputs": "mask,overlay,image", "mask_size": "original", "mask_encoding": "base64",
            "colormap": "viridis", "alpha": "0.7"}
    uniform = _explain(client, cat_png, "cat.png", **form)
    fade = _explain(client, cat_png, "cat.png", **form, overlay_mode="fade")
    image = _png(uniform["image_png"]).astype(np.float64)
    mask = uniform["explanations"][0]["mask"]
    values = np.frombuffer(base64.b64decode(mask["data"]), "<f4").reshape(mask["shape"])
    index = np.clip(np.rint(values * 255), 0, 255).astype(int)
    colour = lookup_table("viridis")[index].astype(np.float64)
    for body, weight in ((uniform, np.full(index.shape, 0.7)), (fade, 0.7 * index / 255)):
        a = weight[..., None]
        expected = np.clip(np.rint((1 - a) * image + a * colour), 0, 255)
        got = _png(body["explanations"][0]["overlay_png"])
        assert np.abs(got - expected).max() <= 1
    # Fade leaves the coldest pixels as the image is; uniform tints them.
    cold = index == 0
    assert cold.any()
    assert np.array_equal(_png(fade["explanations"][0]["overlay_png"])[cold], image[cold])
    assert not np.array_equal(_png(uniform["explanations"][0]["overlay_png"])[cold], image[cold])


def test_colour_map_tables_are_served_from_the_service(client: TestClient) -> None:
    answer = client.get("/ui/static/colormaps.json")
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    tables = answer.json()["colormaps"]
    assert list(tables) == list(COLORMAPS)
    for name in COLORMAPS:
        assert np.array_equal(np.asarray(tables[name]), lookup_table(name))


def test_a_dicom_window_of_its_own_is_reported_as_the_file_s(client: TestClient) -> None:
    with open(str(get_testdata_file("MR_small.dcm")), "rb") as handle:
        data = handle.read()
    result = _explain(client, data, "mr.dcm", outputs="mask")
    assert result["image"]["window"] == {"centre": 600.0, "width": 1600.0, "source": "file"}
    assert result["image"]["modality"] == "MR"
    assert result["warnings"] and result["warnings"][0].startswith("MR input")
