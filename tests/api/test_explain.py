"""/explain and /predict through HTTP with the real pretrained mobilenet_v2."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.imaging.encode import mask_from_base64

EGYPTIAN_CAT = 285
ESPRESSO = 967
# The cat's face in chelsea.png (451x300): eyes at about (170, 115) and (318, 137), nose (262, 242).
CAT_FACE = (110, 20, 380, 295)  # x0, y0, x1, y1


def explain(client: TestClient, image: bytes, name: str = "image.png", **form: str) -> dict:
    response = client.post("/explain", files={"file": (name, image, "image/png")}, data=form)
    assert response.status_code == 200, response.text
    return response.json()


def decode_png(data: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image


def peak(mask: np.ndarray) -> tuple[int, int]:
    y, x = np.unravel_index(int(np.argmax(mask)), mask.shape)
    return int(x), int(y)


def test_cat_is_an_egyptian_cat_and_gradcam_peaks_on_its_face(client: TestClient, cat_png: bytes) -> None:
    body = explain(client, cat_png, "cat.png", mask_size="original")
    result = body["results"][0]
    assert result["image"] == {"index": 0, "frame": 0, "filename": "cat.png", "width": 451, "height": 300}
    top = result["predictions"][0]
    assert (top["class_idx"], top["label"]) == (EGYPTIAN_CAT, "Egyptian cat")
    assert 0.5 < top["score"] <= 1.0
    assert len(result["predictions"]) == 5
    explanation = result["explanations"][0]
    assert explanation["method"] == "gradcam"
    assert explanation["target_layer"] == "features.18"
    assert explanation["class_idx"] == EGYPTIAN_CAT
    mask = np.array(explanation["mask"]["data"], dtype=np.float32)
    assert mask.shape == (300, 451)
    x, y = peak(mask)
    x0, y0, x1, y1 = CAT_FACE
    assert x0 <= x <= x1 and y0 <= y <= y1, (x, y)


def test_espresso(client: TestClient, coffee_png: bytes) -> None:
    body = explain(client, coffee_png)
    top = body["results"][0]["predictions"][0]
    assert (top["class_idx"], top["label"]) == (ESPRESSO, "espresso")
    assert body["model"] == {"name": "mobilenet_v2", "version": "imagenet1k-v1", "input_size": [224, 224]}
    assert set(body["timing_ms"]) == {"queue", "compute", "encode", "total"}
    assert body["timing_ms"]["total"] >= body["timing_ms"]["compute"] > 0


def test_the_map_follows_the_requested_class(client: TestClient, coffee_png: bytes) -> None:
    # One map for the photo's class and one for a class absent from it (goldfish): they differ.
    body = explain(client, coffee_png, class_idx=f"{ESPRESSO},1", mask_size="input")
    explanations = body["results"][0]["explanations"]
    assert [e["class_idx"] for e in explanations] == [ESPRESSO, 1]
    assert explanations[1]["label"] == "goldfish"
    espresso = np.array(explanations[0]["mask"]["data"])
    goldfish = np.array(explanations[1]["mask"]["data"])
    assert not np.allclose(espresso, goldfish)
    # The cup's crema sits at about (290, 140) of 600x400, i.e. (108, 78) at 224x224.
    x, y = peak(espresso)
    assert 50 <= x <= 170 and 20 <= y <= 140, (x, y)


def test_overlay_and_heatmap_are_pngs_of_the_original_size(client: TestClient, cat_png: bytes) -> None:
    body = explain(client, cat_png, outputs="mask,overlay,heatmap")
    explanation = body["results"][0]["explanations"][0]
    overlay = decode_png(explanation["overlay_png"])
    heatmap = decode_png(explanation["heatmap_png"])
    assert (overlay.format, overlay.mode, overlay.size) == ("PNG", "RGB", (451, 300))
    assert (heatmap.format, heatmap.mode, heatmap.size) == ("PNG", "RGBA", (451, 300))
    alpha = np.asarray(heatmap)[..., 3]
    assert alpha.min() == 0 and alpha.max() == 255


def test_overlay_is_the_photo_blended_with_the_colour_map(client: TestClient, cat_png: bytes) -> None:
    original = np.asarray(Image.open(io.BytesIO(cat_png)).convert("RGB"), dtype=np.float32)
    plain = explain(client, cat_png, outputs="overlay", alpha="0")["results"][0]["explanations"][0]
    strong = explain(client, cat_png, outputs="overlay", alpha="1")["results"][0]["explanations"][0]
    assert np.abs(np.asarray(decode_png(plain["overlay_png"]), np.float32) - original).max() <= 1
    assert np.abs(np.asarray(decode_png(strong["overlay_png"]), np.float32) - original).mean() > 20


def test_large_images_have_their_overlays_and_original_masks_capped(
    client: TestClient, coffee_png: bytes
) -> None:
    big = Image.open(io.BytesIO(coffee_png)).resize((2400, 1600))
    buffer = io.BytesIO()
    big.save(buffer, format="PNG")
    body = explain(client, buffer.getvalue(), outputs="overlay,mask", mask_size="original")
    image = body["results"][0]["image"]
    assert (image["width"], image["height"]) == (2400, 1600)  # the file's size, as it was sent
    explanation = body["results"][0]["explanations"][0]
    assert decode_png(explanation["overlay_png"]).size == (1024, 683)
    # The mask is capped like the overlay (CAMSERVE_MASK_MAX_SIDE defaults to the overlay cap).
    assert explanation["mask"]["shape"] == [683, 1024]
    assert explanation["mask"]["scale"] == pytest.approx(1024 / 2400, abs=1e-6)


@pytest.mark.parametrize("mask_size, shape", [("input", [224, 224]), ("feature", [7, 7]),
                                              ("original", [300, 451])])
def test_base64_and_list_masks_carry_the_same_numbers(
    client: TestClient, cat_png: bytes, mask_size: str, shape: list[int]
) -> None:
    as_list = explain(client, cat_png, mask_size=mask_size, outputs="mask")
    as_b64 = explain(client, cat_png, mask_size=mask_size, outputs="mask", mask_encoding="base64")
    listed = as_list["results"][0]["explanations"][0]["mask"]
    encoded = as_b64["results"][0]["explanations"][0]["mask"]
    assert listed["shape"] == encoded["shape"] == shape
    assert (listed["encoding"], encoded["encoding"]) == ("list", "base64")
    values = mask_from_base64(encoded["data"], tuple(shape))
    np.testing.assert_allclose(values, np.array(listed["data"], dtype=np.float32), atol=1e-6)
    assert values.min() == 0.0 and values.max() == pytest.approx(1.0)
    assert np.isfinite(values).all() and (values >= 0).all() and (values <= 1).all()


def test_outputs_selects_what_is_returned(client: TestClient, cat_png: bytes) -> None:
    explanation = explain(client, cat_png, outputs="heatmap")["results"][0]["explanations"][0]
    assert explanation["mask"] is None and explanation["overlay_png"] is None
    assert decode_png(explanation["heatmap_png"]).mode == "RGBA"


def test_colour_maps_change_the_overlay(client: TestClient, cat_png: bytes) -> None:
    def overlay(colormap: str) -> np.ndarray:
        body = explain(client, cat_png, outputs="overlay", colormap=colormap, alpha="1")
        return np.asarray(decode_png(body["results"][0]["explanations"][0]["overlay_png"]))

    gray = overlay("gray")
    assert np.array_equal(gray[..., 0], gray[..., 1])  # a grey map is grey at alpha 1
    assert not np.array_equal(overlay("jet"), overlay("viridis"))


def test_several_files_give_results_in_upload_order(
    client: TestClient, cat_png: bytes, coffee_png: bytes
) -> None:
    files = [("file", ("a.png", coffee_png, "image/png")), ("file", ("b.png", cat_png, "image/png"))]
    response = client.post("/explain", files=files, data={"outputs": "mask"})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["image"]["index"] for r in results] == [0, 1]
    assert [r["image"]["filename"] for r in results] == ["a.png", "b.png"]
    assert [r["predictions"][0]["class_idx"] for r in results] == [ESPRESSO, EGYPTIAN_CAT]


def test_predict_classifies_without_explaining(client: TestClient, cat_png: bytes) -> None:
    response = client.post("/predict", files={"file": ("cat.png", cat_png, "image/png")}, data={"topk": "3"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"request_id", "model", "results", "timing_ms"}
    result = body["results"][0]
    assert set(result) == {"image", "predictions"}
    assert result["predictions"][0]["class_idx"] == EGYPTIAN_CAT
    scores = [p["score"] for p in result["predictions"]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)


def test_request_id_is_echoed(client: TestClient, cat_png: bytes) -> None:
    response = client.post(
        "/predict", files={"file": ("cat.png", cat_png, "image/png")}, headers={"X-Request-ID": "abc-123"}
    )
    assert response.headers["X-Request-ID"] == "abc-123"
    assert response.json()["request_id"] == "abc-123"
    generated = client.get("/healthz").headers["X-Request-ID"]
    assert len(generated) == 32


def test_healthz_answers_while_an_overlay_png_is_being_encoded(
    client: TestClient, cat_png: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PNG encoding runs on a thread: while it is held, the event loop still answers /healthz.
    Were it on the loop, /healthz would wait, the hold would time out and the explain fail."""
    from concurrent.futures import ThreadPoolExecutor

    from service.imaging import encode
    from tests.holding import held

    with ThreadPoolExecutor(1) as pool:
        with held(monkeypatch, encode, "png_base64") as entered:
            pending = pool.submit(
                client.post, "/explain", files={"file": ("cat.png", cat_png, "image/png")},
                data={"methods": "gradcam", "outputs": "overlay"},
            )
            assert entered.wait(60), "the explain never reached PNG encoding"
            assert client.get("/healthz").status_code == 200
        response = pending.result(60)
    assert response.status_code == 200
    assert response.json()["results"][0]["explanations"][0]["overlay_png"]
