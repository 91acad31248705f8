"""KServe V1: the same answers as the multipart routes, in KServe's envelope."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from tests.imaging import dicom_samples, samples

PREDICT = "/v1/models/mobilenet_v2:predict"
EXPLAIN = "/v1/models/mobilenet_v2:explain"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def instances(*files: bytes) -> list[dict[str, Any]]:
    return [{"image": {"b64": b64(data)}} for data in files]


def error(response: Any, status: int, code: str, *fragments: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["code"] == code
    for fragment in fragments:
        assert fragment in body["message"], body["message"]


def test_predict_matches_the_multipart_route(client: TestClient, cat_png: bytes) -> None:
    response = client.post(PREDICT, json={"instances": instances(cat_png), "parameters": {"topk": 3}})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"]["name"] == "mobilenet_v2"
    (prediction,) = body["predictions"]
    assert prediction["image"] == {
        "index": 0, "frame": 0, "filename": "instances[0]", "width": 451, "height": 300}
    reference = client.post("/predict", files={"file": ("c.png", cat_png)}, data={"topk": "3"}).json()
    assert prediction["predictions"] == reference["results"][0]["predictions"]
    assert prediction["predictions"][0]["label"] == "Egyptian cat"


def test_explain_gives_aligned_predictions_and_explanations(client: TestClient, cat_png: bytes) -> None:
    parameters = {"outputs": "mask", "mask_encoding": "base64", "class_idx": 281, "topk": 1}
    response = client.post(EXPLAIN, json={"instances": instances(cat_png), "parameters": parameters})
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["predictions"]) == len(body["explanations"]) == 1
    (explanation,) = body["explanations"][0]
    assert explanation["class_idx"] == 281 and explanation["method"] == "gradcam"
    mask = explanation["mask"]
    values = np.frombuffer(base64.b64decode(mask["data"]), dtype="<f4").reshape(mask["shape"])
    assert values.shape == (224, 224) and values.min() >= 0.0 and values.max() <= 1.0

    form = {"outputs": "mask", "mask_encoding": "base64", "class_idx": "281"}
    multipart = client.post("/explain", files={"file": ("c.png", cat_png)}, data=form).json()
    same = multipart["results"][0]["explanations"][0]["mask"]
    assert np.allclose(values, np.frombuffer(base64.b64decode(same["data"]), dtype="<f4").reshape(224, 224),
                       atol=1e-4)


def test_frames_and_instances_keep_their_order(client: TestClient) -> None:
    files = (samples.still("png-rgb"), dicom_samples.bundled("SC_rgb_rle_2frame.dcm"), samples.still("jpeg"))
    response = client.post(PREDICT, json={"instances": instances(*files)})
    assert response.status_code == 200, response.text
    images = [p["image"] for p in response.json()["predictions"]]
    assert [(i["index"], i["frame"]) for i in images] == [(0, 0), (1, 0), (1, 1), (2, 0)]


def test_explain_has_one_explanation_list_per_frame(client: TestClient) -> None:
    body = {"instances": instances(samples.animated("GIF", 2, 16, 16)),
            "parameters": {"outputs": "overlay", "methods": "gradcam"}}
    response = client.post(EXPLAIN, json=body)
    assert response.status_code == 200, response.text
    explanations = response.json()["explanations"]
    assert len(explanations) == 2
    assert all(e[0]["overlay_png"] and e[0]["mask"] is None for e in explanations)


def test_a_data_url_and_missing_padding_are_accepted(client: TestClient) -> None:
    text = b64(samples.still("png-grey")).rstrip("=")
    response = client.post(PREDICT, json={"instances": [{"image": {"b64": f"data:image/png;base64,{text}"}}]})
    assert response.status_code == 200, response.text


def test_numbers_are_accepted_where_the_form_takes_text(client: TestClient, cat_png: bytes) -> None:
    body = {"instances": instances(cat_png), "parameters": {"class_idx": 285, "outputs": "mask"}}
    response = client.post(EXPLAIN, json=body)
    assert response.status_code == 200, response.text
    assert response.json()["explanations"][0][0]["class_idx"] == 285


def test_unknown_model_is_404(client: TestClient) -> None:
    body = {"instances": instances(samples.still("gif"))}
    response = client.post("/v1/models/resnet9000:predict", json=body)
    error(response, 404, "not_found", "resnet9000", "mobilenet_v2")


@pytest.mark.parametrize("parameters, status, fragment", [
    ({"methods": "gradcan"}, 422, "valid methods"),
    ({"target_layer": "features.99"}, 422, "valid layers"),
    ({"class_idx": 1000}, 422, "0..999"),
    ({"topk": 0}, 422, "topk"),
    ({"colour": "jet"}, 422, "colour"),  # a misspelt option is refused, not ignored
    ({"model": "mobilenet_v2"}, 422, "model"),  # the model is named by the path alone
])
def test_parameters_are_validated_like_the_form(
    client: TestClient, parameters: dict[str, Any], status: int, fragment: str
) -> None:
    body = {"instances": instances(samples.still("gif")), "parameters": parameters}
    response = client.post(EXPLAIN, json=body)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]["message"]


def test_malformed_bodies_are_4xx(client: TestClient) -> None:
    error(client.post(PREDICT, json={"instances": [{"image": {"b64": "@@not base64@@"}}]}),
          400, "bad_request", "instances[0]")
    error(client.post(PREDICT, json={"inputs": []}), 400, "bad_request", "instances")
    error(client.post(PREDICT, content=b"{not json", headers={"Content-Type": "application/json"}),
          400, "bad_request")
    assert client.post(PREDICT, json={"instances": []}).status_code == 422
    # No file paths or URLs: an instance is bytes, nothing else.
    url = {"instances": [{"image": {"url": "http://127.0.0.1/x.png"}}]}
    assert client.post(PREDICT, json=url).status_code in (400, 422)


def test_images_are_checked_like_uploads(client: TestClient) -> None:
    error(client.post(PREDICT, json={"instances": instances(b"plain text")}), 415, "unsupported_media",
          "instances[0]")
    error(client.post(PREDICT, json={"instances": [{"image": {"b64": ""}}]}), 400, "bad_request", "empty")
    bomb = samples.png_header_only(100_000, 100_000)
    error(client.post(PREDICT, json={"instances": instances(bomb)}), 413, "payload_too_large", "pixels")
    many = instances(samples.still("png-grey")) * (Settings().max_images_per_request + 1)
    error(client.post(PREDICT, json={"instances": many}), 413, "payload_too_large")


def test_model_readiness_and_list(client: TestClient) -> None:
    assert client.get("/v1/models/mobilenet_v2").json() == {"name": "mobilenet_v2", "ready": True}
    assert client.get("/v1/models").json() == {"models": ["mobilenet_v2"]}
    assert client.get("/v1/models/resnet9000").status_code == 404
