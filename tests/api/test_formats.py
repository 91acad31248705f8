"""Every supported format through ``POST /explain`` and ``POST /predict``: results, frames,
and overlays drawn on the displayed (windowed, oriented) image."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.imaging import dicom_samples, samples


def explain(client: TestClient, *files: tuple[str, bytes], **form: str):  # type: ignore[no-untyped-def]
    parts = [("file", (name, data, "application/octet-stream")) for name, data in files]
    return client.post("/explain", files=parts, data={"outputs": "overlay", **form})


def overlay_pixels(result: dict) -> np.ndarray:  # type: ignore[type-arg]
    png = base64.b64decode(result["explanations"][0]["overlay_png"])
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


@pytest.mark.parametrize("kind", samples.STILL_KINDS)
def test_every_still_format_gives_one_result(client: TestClient, kind: str) -> None:
    response = client.post("/predict", files={"file": (f"{kind}.bin", samples.still(kind))})
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    image = dict(result["image"])
    # High bit depths say which window brought them to 8 bits; nothing else is added.
    window = image.pop("window", None)
    assert (window is not None) == (kind in ("png-grey16", "tiff-grey16", "tiff-float")), kind
    assert image == {"index": 0, "frame": 0, "filename": f"{kind}.bin",
                     "width": samples.WIDTH, "height": samples.HEIGHT}
    assert len(result["predictions"]) == 5


def test_overlay_is_drawn_on_the_windowed_16_bit_image(client: TestClient) -> None:
    response = explain(client, ("ramp.png", samples.png16_grey()), alpha="0")
    assert response.status_code == 200, response.text
    shown = overlay_pixels(response.json()["results"][0])
    expected = np.linspace(0, 255, samples.WIDTH)
    assert np.abs(shown[0, :, 0].astype(float) - expected).max() <= 1.0
    assert np.array_equal(shown[..., 0], shown[..., 1])


def test_overlay_is_drawn_on_the_upright_jpeg(client: TestClient) -> None:
    response = explain(client, ("phone.jpg", samples.jpeg_with_orientation(6)), alpha="0")
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert (result["image"]["width"], result["image"]["height"]) == (samples.WIDTH, samples.HEIGHT)
    shown = overlay_pixels(result).astype(int)
    assert np.abs(shown[3, 3] - samples.QUADRANTS[0]).max() <= 8  # red stays top-left
    assert np.abs(shown[-4, -4] - samples.QUADRANTS[3]).max() <= 8


def test_type_is_sniffed_whatever_the_name_and_content_type(client: TestClient) -> None:
    parts = [("file", ("scan.dcm", samples.still("gif"), "application/dicom"))]
    response = client.post("/predict", files=parts)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animations_give_one_result_per_frame_in_order(client: TestClient, fmt: str) -> None:
    response = explain(client, ("loop", samples.animated(fmt, 3, 16, 16)), alpha="0")
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [(r["image"]["index"], r["image"]["frame"]) for r in results] == [(0, 0), (0, 1), (0, 2)]
    colours = [overlay_pixels(r)[5, 5].tolist() for r in results]
    assert colours == [list(img.getpixel((5, 5))) for img in samples.frames_rgb(3, 16, 16)]


def test_files_and_frames_keep_upload_order(client: TestClient) -> None:
    tiff = samples.multipage_tiff([samples.rgb(), Image.fromarray(samples.ramp16())])
    files = [("a.png", samples.still("png-rgb")), ("b.tif", tiff), ("c.gif", samples.animated("GIF", 2))]
    response = client.post("/predict", files=[("file", f) for f in files])
    assert response.status_code == 200, response.text
    images = [r["image"] for r in response.json()["results"]]
    assert [(i["index"], i["frame"], i["filename"]) for i in images] == [
        (0, 0, "a.png"), (1, 0, "b.tif"), (1, 1, "b.tif"), (2, 0, "c.gif"), (2, 1, "c.gif")]


def test_dicom_ct_gives_one_result(client: TestClient) -> None:
    response = explain(client, ("ct.dcm", dicom_samples.bundled("CT_small.dcm")), outputs="mask")
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert (result["image"]["width"], result["image"]["height"]) == (128, 128)


def test_dicom_overlay_is_drawn_on_the_windowed_image(client: TestClient) -> None:
    ramp = np.tile(np.linspace(0, 1000, 40).round().astype(np.uint16), (10, 1))
    data = dicom_samples.grey(ramp, "MONOCHROME1", WindowCenter=500.5, WindowWidth=1001)
    response = explain(client, ("mono1.dcm", data), alpha="0")
    assert response.status_code == 200, response.text
    shown = overlay_pixels(response.json()["results"][0])
    assert shown[0, 0].tolist() == [255, 255, 255] and shown[0, -1].tolist() == [0, 0, 0]


def test_multi_frame_dicom_gives_one_result_per_frame(client: TestClient) -> None:
    data = dicom_samples.bundled("SC_rgb_rle_2frame.dcm")
    response = client.post("/predict", files={"file": ("cine.dcm", data)})
    assert response.status_code == 200, response.text
    assert [r["image"]["frame"] for r in response.json()["results"]] == [0, 1]


def test_undecodable_dicom_syntax_is_415_naming_it(client: TestClient) -> None:
    data = dicom_samples.encapsulated("1.2.840.10008.1.2.4.100")
    response = client.post("/explain", files={"file": ("video.dcm", data)})
    assert response.status_code == 415, response.text
    assert "MPEG2" in response.json()["error"]["message"]
