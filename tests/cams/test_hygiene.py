"""Hundreds of mixed requests leave the served models as they were: no hook, no gradient, eval mode.

Methods, layers, targets, smoothing and faithfulness are drawn at random (seeded) on a small
resnet18 served from a models file, with some requests that must fail (a class out of range);
afterwards every module of every worker's models is checked, and the same Grad-CAM request
gives the same map as the first time.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.cams import CAMMethod, method_names
from service.config import Settings
from service.main import create_app
from tests.cams.conftest import CHEAP
from tests.conftest import ready_client
from tests.custom_model import png, write_models_file

REQUESTS = 300
LAYERS = ["layer4", "layer3", "layer3,layer4", "layer4.1.conv2"]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    models_file = write_models_file(tmp_path_factory.mktemp("hygiene"))
    yield from ready_client(create_app(Settings(models_file=models_file)))


def post(client: TestClient, image: bytes, form: dict[str, str]) -> tuple[int, dict]:
    response = client.post("/explain", files={"file": ("x.png", image, "image/png")}, data=form,
                           headers={"X-Request-Timeout": "600"})
    return response.status_code, response.json()


def random_form(rng: random.Random, names: list[str]) -> dict[str, str]:
    methods = rng.sample(names, rng.randint(1, 3))
    form = {
        "model": "tiny_resnet",
        "methods": ",".join(methods),
        "target_layer": rng.choice(LAYERS),
        "outputs": rng.choice(["mask", "mask,overlay"]),
        "mask_size": rng.choice(["feature", "input"]),
    }
    params = {m: CHEAP[m] for m in methods if m in CHEAP}
    if params:
        form["method_params"] = json.dumps(params)
    draw = rng.random()
    if draw < 0.1:
        form["class_idx"] = "7"  # out of range: a 422, before any work
    elif draw < 0.4:
        form["class_idx"] = ",".join(str(c) for c in rng.sample(range(3), rng.randint(1, 2)))
    form["aug_smooth"] = str(rng.random() < 0.05).lower()
    form["eigen_smooth"] = str(rng.random() < 0.1).lower()
    if rng.random() < 0.05:
        form["evaluate"] = "true"
        form["eval_steps"] = "2"
    return form


def model_state(client: TestClient) -> list:  # type: ignore[type-arg]
    engine = client.app.state.engine  # type: ignore[attr-defined]
    return [worker.models["tiny_resnet"].module for worker in engine.workers]


def test_hundreds_of_mixed_requests_leave_no_trace(served: TestClient) -> None:
    rng = random.Random(0)
    names = method_names()
    images = [png(70 + 9 * i, 50 + 7 * i, seed=i) for i in range(4)]
    reference_form = {"model": "tiny_resnet", "methods": "gradcam", "target_layer": "layer4",
                      "mask_size": "feature", "outputs": "mask", "class_idx": "1"}
    status, first = post(served, images[0], reference_form)
    assert status == 200, first

    statuses: Counter[int] = Counter()
    drawn: set[str] = set()
    for _ in range(REQUESTS):
        form = random_form(rng, names)
        drawn.update(form["methods"].split(","))
        status, body = post(served, rng.choice(images), form)
        statuses[status] += 1
        if status != 200:
            # Only refusals that name their reason: a bad class, or a method the model cannot take.
            assert status == 422, (form, body)
            assert body["error"]["message"], body
        else:
            wanted = len(form["methods"].split(","))
            assert all(len(r["explanations"]) % wanted == 0 for r in body["results"])
    assert statuses[200] >= REQUESTS * 0.6, statuses
    assert drawn == set(CAMMethod.registry)

    for module in model_state(served):
        assert not module.training
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
        for name, sub in module.named_modules():
            assert not sub._forward_hooks and not sub._forward_pre_hooks, name
            assert not sub._backward_hooks and not sub._backward_pre_hooks, name
    status, again = post(served, images[0], reference_form)
    assert status == 200
    before = np.array(first["results"][0]["explanations"][0]["mask"]["data"])
    after = np.array(again["results"][0]["explanations"][0]["mask"]["data"])
    np.testing.assert_allclose(after, before, atol=1e-6)

