"""Clean refusals of hostile option values: deep JSON, non-finite numbers, NaN parameters.

Each answer is a JSON 422 naming the problem (never a 500 from ``RecursionError`` or
``OverflowError``), and a normal request is answered right after. Fake workers (the plan is
refused before anything is queued), so no model is loaded.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from service.api.jsonlimits import JsonRefused, loads_bounded, nesting_depth
from service.cams import CAMMethod
from tests.engine.fakes import fake_client, tiny_png

DEEP = 100_000


def png() -> bytes:
    return tiny_png(32, 7)


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    yield from fake_client()


def explain(client: TestClient, **data: str) -> object:
    return client.post("/explain", files={"file": ("x.png", png(), "image/png")},
                       data={"outputs": "mask", **data})


def kserve(client: TestClient, parameters: object) -> object:
    body = {"instances": [{"image": {"b64": base64.b64encode(png()).decode()}}], "parameters": parameters}
    return client.post("/v1/models/mobilenet_v2:explain", content=json.dumps(body),
                       headers={"Content-Type": "application/json"})


def assert_refused(response: object, *fragments: str) -> None:
    assert response.status_code == 422, response.text  # type: ignore[attr-defined]
    error = response.json()["error"]  # type: ignore[attr-defined]
    assert error["code"] == "invalid_option"
    for fragment in fragments:
        assert fragment in error["message"], error["message"]


def assert_still_serving(client: TestClient) -> None:
    response = client.post("/predict", files={"file": ("x.png", png(), "image/png")})
    assert response.status_code == 200, response.text


def deep(levels: int) -> str:
    return '{"scorecam": ' + "[" * levels + "]" * levels + "}"


def non_finite_cases() -> list[tuple[str, str]]:
    float_param = next(
        (name, p.name) for name, cls in CAMMethod.registry.items() for p in cls.params if p.type == "float"
    )
    method, param = float_param
    return [
        ("scorecam", '{"scorecam": {"top_k_channels": Infinity}}'),
        ("scorecam", '{"scorecam": {"top_k_channels": -Infinity}}'),
        ("scorecam", '{"scorecam": {"top_k_channels": NaN}}'),
        ("scorecam", '{"scorecam": {"top_k_channels": 1e999}}'),
        (method, json.dumps({method: {param: float("nan")}})),  # json.dumps writes NaN
        (method, json.dumps({method: {param: float("inf")}})),
    ]


@pytest.mark.parametrize(("method", "params"), non_finite_cases())
def test_non_finite_numbers_in_method_params_are_422(client: TestClient, method: str, params: str) -> None:
    assert_refused(explain(client, methods=method, method_params=params), "finite")
    assert_still_serving(client)


@pytest.mark.parametrize(("method", "params"), non_finite_cases())
def test_non_finite_numbers_in_kserve_parameters_are_422(
    client: TestClient, method: str, params: str
) -> None:
    assert_refused(kserve(client, {"methods": method, "outputs": "mask", "method_params": params}),
                   "finite")


def test_deeply_nested_method_params_are_422(client: TestClient) -> None:
    assert_refused(explain(client, methods="scorecam", method_params=deep(DEEP)), "nested", "deep")
    assert_refused(kserve(client, {"methods": "scorecam", "method_params": deep(DEEP)}), "nested")
    assert_still_serving(client)


def test_non_finite_float_parameter_is_refused_by_its_check() -> None:
    for cls in CAMMethod.registry.values():
        for param in cls.params:
            if param.type in ("int", "float"):
                for value in (float("nan"), float("inf"), float("-inf"), 10**400):
                    with pytest.raises(ValueError, match="finite"):
                        param.check(value)


def test_nan_and_infinite_alpha_are_422(client: TestClient) -> None:
    for value in ("nan", "inf", "-inf", "Infinity"):
        response = explain(client, alpha=value)
        assert response.status_code == 422, (value, response.text)  # type: ignore[attr-defined]
        assert "alpha" in response.json()["error"]["message"]  # type: ignore[attr-defined]


def test_nan_in_the_kserve_body_itself_is_a_clean_4xx(client: TestClient) -> None:
    for raw in ('{"alpha": NaN}', '{"alpha": Infinity}', '{"eval_steps": NaN}', '{"topk": Infinity}'):
        image = base64.b64encode(png()).decode()
        body = '{"instances": [{"image": {"b64": "' + image + '"}}], "parameters": ' + raw + "}"
        response = client.post("/v1/models/mobilenet_v2:explain", content=body,
                               headers={"Content-Type": "application/json"})
        assert response.status_code in (400, 422), (raw, response.text)
        assert "error" in response.json()


def test_deeply_nested_kserve_body_is_a_clean_4xx(client: TestClient) -> None:
    body = '{"instances": ' + "[" * DEEP + "]" * DEEP + "}"
    response = client.post("/v1/models/mobilenet_v2:predict", content=body,
                           headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
    assert "error" in response.json()
    assert_still_serving(client)


def test_depth_counts_brackets_outside_strings_only() -> None:
    assert nesting_depth('{"a": "[[[[{{{{", "b": [[1]]}') == 3
    assert nesting_depth('{"a": "\\"[[[["}') == 1
    assert loads_bounded('{"a": {"b": 1.5}}') == {"a": {"b": 1.5}}
    with pytest.raises(JsonRefused):
        loads_bounded("[" * 40 + "]" * 40)
    with pytest.raises(ValueError):
        loads_bounded("{not json")
