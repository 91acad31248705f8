"""Every registered method through POST /explain, its parameters, and the checks before queueing."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api.options import ExplainForm, plan_explain
from service.cams import CAMMethod, method_names
from service.errors import InvalidOption
from tests.cams.conftest import CHEAP

EGYPTIAN_CAT = 285


def explain(client: TestClient, image: bytes, status: int = 200, **form: str) -> dict:
    # A generous deadline: CI machines are shared, and this tests results, not latency.
    response = client.post("/explain", files={"file": ("cat.png", image, "image/png")}, data=form,
                           headers={"X-Request-Timeout": "600"})
    assert response.status_code == status, response.text
    return response.json()


def feature_mask(body: dict, index: int = 0) -> np.ndarray:
    return np.array(body["results"][0]["explanations"][index]["mask"]["data"], dtype=np.float32)


# Transformer-only methods (LeGrad) cannot explain mobilenet_v2; tests/cams/test_transformers.py
# serves them on a ViT.
@pytest.mark.parametrize(
    "name", [n for n in method_names() if not CAMMethod.registry[n].needs_transformer]
)
def test_every_method_is_served(client: TestClient, cat_png: bytes, name: str) -> None:
    form = {"methods": name, "mask_size": "feature", "outputs": "mask"}
    if name in CHEAP:
        form["method_params"] = json.dumps({name: CHEAP[name]})
    body = explain(client, cat_png, **form)
    explanation = body["results"][0]["explanations"][0]
    assert explanation["method"] == name
    assert explanation["class_idx"] == EGYPTIAN_CAT
    mask = feature_mask(body)
    # FullGrad and the saliency family map the input's grid, not the layer's.
    assert mask.shape == ((224, 224) if CAMMethod.registry[name].grid == "input" else (7, 7))
    assert np.isfinite(mask).all() and mask.min() == 0.0 and mask.max() == pytest.approx(1.0)


def test_methods_lists_every_method_with_its_parameters(client: TestClient) -> None:
    listed = {m["name"]: m for m in client.get("/methods").json()["methods"]}
    assert set(listed) == set(CAMMethod.registry)
    score = {p["name"]: p["default"] for p in listed["scorecam"]["parameters"]}
    assert score == {"batch_size": 32, "top_k_channels": 0}
    assert {p["name"] for p in listed["sscam"]["parameters"]} >= {"num_samples", "std", "top_k_channels"}
    assert listed["ablationcam"]["family"] == "perturbation"


def test_cam_gradcam_and_hirescam_coincide_on_mobilenet(client: TestClient, cat_png: bytes) -> None:
    body = explain(client, cat_png, methods="cam,gradcam,hirescam", mask_size="feature", outputs="mask")
    cam, grad, hires = (feature_mask(body, i) for i in range(3))
    np.testing.assert_allclose(cam, grad, atol=1e-5)
    np.testing.assert_allclose(hires, grad, atol=1e-5)


def test_cam_on_a_layer_its_head_does_not_pool_is_refused(client: TestClient, cat_png: bytes) -> None:
    body = explain(client, cat_png, 422, methods="cam", target_layer="features.17")
    assert "features.17" in body["error"]["message"] and "linear head" in body["error"]["message"]


def test_cam_without_a_linear_head_is_refused_before_queueing(app) -> None:
    info = app.state.engine.catalog["mobilenet_v2"]
    headless = replace(info, linear_head=None, linear_head_layers=(),
                       linear_head_problem="the model has no linear layer")
    form = ExplainForm.model_construct(methods="cam", model=None, target_layer=None, class_idx=None,
                                       outputs="mask", colormap="jet", aug_smooth=False,
                                       eigen_smooth=False, method_params=None)
    with pytest.raises(InvalidOption, match=r"needs global average pooling.*no linear layer"):
        plan_explain(form, {"mobilenet_v2": headless}, app.state.engine.methods, "mobilenet_v2")


def test_method_params_change_the_map(client: TestClient, cat_png: bytes) -> None:
    def random_map(seed: int) -> np.ndarray:
        return feature_mask(explain(client, cat_png, methods="random", mask_size="feature",
                                    method_params=json.dumps({"random": {"seed": seed}})))

    np.testing.assert_array_equal(random_map(1), random_map(1))
    assert not np.allclose(random_map(1), random_map(2))


@pytest.mark.parametrize(
    ("params", "status", "fragment"),
    [
        ('{"scorecam": {"top_k": 3}}', 422, "no parameter 'top_k'"),
        ('{"scorecam": {"batch_size": 0}}', 422, "at least 1"),
        ('{"gradcampp": {}}', 422, "not among the requested methods"),
        ('{"scorecam": 3}', 422, "must be an object"),
        ("[1, 2]", 400, "JSON object"),
        ("{not json", 400, "JSON object"),
    ],
)
def test_bad_method_params_are_refused_with_a_reason(
    client: TestClient, cat_png: bytes, params: str, status: int, fragment: str
) -> None:
    body = explain(client, cat_png, status, methods="scorecam", method_params=params)
    assert fragment in body["error"]["message"]


def test_eigen_and_aug_smooth_are_served_and_change_the_map(client: TestClient, cat_png: bytes) -> None:
    form = {"methods": "gradcampp", "mask_size": "feature", "outputs": "mask"}
    plain = feature_mask(explain(client, cat_png, **form))
    eigen = feature_mask(explain(client, cat_png, eigen_smooth="true", **form))
    augmented = feature_mask(explain(client, cat_png, aug_smooth="true", **form))
    for smoothed in (eigen, augmented):
        assert smoothed.shape == (7, 7) and smoothed.max() == pytest.approx(1.0)
        assert not np.allclose(smoothed, plain, atol=1e-3)
    # Flips and rescalings of the same photo must not move the explanation elsewhere (r 0.94 here);
    # the principal component is a different map by design (r 0.54), signed to agree with the plain one.
    assert np.corrcoef(augmented.ravel(), plain.ravel())[0, 1] > 0.85
    assert np.corrcoef(eigen.ravel(), plain.ravel())[0, 1] > 0.3


def test_legrad_on_a_convolutional_network_is_refused_naming_the_reason(client: TestClient,
                                                                        cat_png: bytes) -> None:
    body = explain(client, cat_png, 422, methods="gradcam,legrad")
    message = body["error"]["message"]
    assert "legrad" in message and "vision transformer" in message
    assert client.get("/healthz").status_code == 200
