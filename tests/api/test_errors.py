"""Bad requests get the contract's JSON error with an actionable message; the service goes on."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient


def post(client: TestClient, image: bytes, **form: str):  # type: ignore[no-untyped-def]
    return client.post("/explain", files={"file": ("image.png", image, "image/png")}, data=form)


def assert_error(response, status: int, code: str, *fragments: str) -> str:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert error["code"] == code
    assert error["request_id"] == response.headers["X-Request-ID"]
    for fragment in fragments:
        assert fragment in error["message"], error["message"]
    assert "Traceback" not in error["message"]
    return str(error["message"])


def test_unknown_method_lists_valid_methods(client: TestClient, cat_png: bytes) -> None:
    assert_error(post(client, cat_png, methods="gradcam,gradcan"), 422, "invalid_option",
                 "gradcan", "valid methods", "gradcam")


def test_unknown_layer_lists_valid_layers(client: TestClient, cat_png: bytes) -> None:
    assert_error(post(client, cat_png, target_layer="features.99"), 422, "invalid_option",
                 "features.99", "valid layers", "features.18", "features.17")


def test_unknown_model_is_404_with_registered_models(client: TestClient, cat_png: bytes) -> None:
    assert_error(post(client, cat_png, model="resnet9000"), 404, "not_found", "resnet9000", "mobilenet_v2")


@pytest.mark.parametrize("class_idx", ["1000", "-1", "5,1000"])
def test_class_out_of_range(client: TestClient, cat_png: bytes, class_idx: str) -> None:
    assert_error(post(client, cat_png, class_idx=class_idx), 422, "invalid_option", "0..999")


@pytest.mark.parametrize("form, status", [
    ({"class_idx": "cat"}, 400), ({"topk": "five"}, 400), ({"alpha": "lots"}, 400),
    ({"topk": "0"}, 422), ({"topk": "21"}, 422), ({"alpha": "1.5"}, 422),
    ({"mask_size": "huge"}, 422), ({"mask_encoding": "hex"}, 422), ({"colormap": "rainbow-ish"}, 422),
    ({"outputs": "mask,video"}, 422), ({"method": "scorecam"}, 422),
])
def test_malformed_is_400_and_out_of_range_is_422(
    client: TestClient, cat_png: bytes, form: dict[str, str], status: int
) -> None:
    response = post(client, cat_png, **form)
    assert_error(response, status, "bad_request" if status == 400 else "invalid_option", next(iter(form)))


def test_bytes_that_are_not_an_image_are_415(client: TestClient) -> None:
    response = client.post("/explain", files={"file": ("notes.png", b"%PDF-1.4 not an image", "image/png")})
    assert_error(response, 415, "unsupported_media", "notes.png")


def test_missing_file_is_400(client: TestClient) -> None:
    assert_error(client.post("/explain", data={"methods": "gradcam"}), 400, "bad_request", "file")


def test_empty_file_is_400(client: TestClient) -> None:
    response = client.post("/explain", files={"file": ("empty.png", b"", "image/png")})
    assert_error(response, 400, "bad_request", "empty")


def test_unknown_path_is_a_json_404(client: TestClient) -> None:
    assert_error(client.get("/nowhere"), 404, "not_found", "/nowhere")


def test_bad_deadline_header(client: TestClient, cat_png: bytes) -> None:
    response = client.post("/predict", files={"file": ("a.png", cat_png, "image/png")},
                           headers={"X-Request-Timeout": "soon"})
    assert_error(response, 400, "bad_request", "X-Request-Timeout")


def test_service_keeps_serving_after_errors(client: TestClient, cat_png: bytes) -> None:
    for _ in range(3):
        post(client, b"garbage")
        post(client, cat_png, methods="nope")
    assert post(client, cat_png).status_code == 200
