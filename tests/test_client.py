"""The Python client against the real app (sync through the TestClient, async through
httpx.ASGITransport) and against canned answers (httpx.MockTransport)."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.client import Answer, AsyncClient, CamserveError, Client, decode_mask, parse_answer
from tests.imaging import samples


@pytest.fixture(scope="module")
def camserve(client: TestClient) -> Client:
    return Client(http_client=client)  # the TestClient is an httpx.Client


def test_explain_returns_typed_results_with_numpy_masks(camserve: Client, cat_png: bytes) -> None:
    answer = camserve.explain(("cat.png", cat_png), outputs=["mask", "overlay", "heatmap"], topk=3)
    assert answer.model.name == "mobilenet_v2" and answer.model.input_size == (224, 224)
    (result,) = answer.results
    assert (result.image.filename, result.image.width, result.image.height) == ("cat.png", 451, 300)
    assert len(result.predictions) == 3 and result.predictions[0].label == "Egyptian cat"
    (explanation,) = result.explanations
    assert explanation.method == "gradcam" and explanation.class_idx == result.predictions[0].class_idx
    assert isinstance(explanation.mask, np.ndarray) and explanation.mask.dtype == np.float32
    assert explanation.mask.shape == (224, 224)
    assert explanation.overlay_png is not None and explanation.overlay_png.startswith(b"\x89PNG")
    assert explanation.heatmap_png is not None and explanation.heatmap_png.startswith(b"\x89PNG")


def test_list_and_base64_masks_decode_to_the_same_array(camserve: Client, cat_png: bytes) -> None:
    as_list = camserve.explain(cat_png, outputs="mask", mask_encoding="list", class_idx=285)
    as_b64 = camserve.explain(cat_png, outputs="mask", mask_encoding="base64", class_idx=285)
    a = as_list.results[0].explanations[0].mask
    b = as_b64.results[0].explanations[0].mask
    assert a is not None and b is not None
    assert np.allclose(a, b, atol=1e-5)  # the list encoding is rounded to 6 decimals


def test_several_images_methods_and_classes(camserve: Client, cat_png: bytes, tmp_path: Path) -> None:
    path = tmp_path / "anim.gif"
    path.write_bytes(samples.animated("GIF", 2, 16, 16))
    answer = camserve.explain([cat_png, path], class_idx=[285, 281], outputs="mask")
    assert [(r.image.index, r.image.frame) for r in answer.results] == [(0, 0), (1, 0), (1, 1)]
    assert answer.results[1].image.filename == "anim.gif"
    assert all([e.class_idx for e in r.explanations] == [285, 281] for r in answer.results)


def test_predict(camserve: Client, coffee_png: bytes) -> None:
    answer = camserve.predict(coffee_png, topk=2)
    assert len(answer.results[0].predictions) == 2
    assert answer.results[0].explanations == []


def test_errors_are_raised_with_the_contracts_fields(camserve: Client, cat_png: bytes) -> None:
    with pytest.raises(CamserveError) as caught:
        camserve.explain(cat_png, methods="gradcan", request_id="my-request-1")
    error = caught.value
    assert (error.status, error.code, error.request_id) == (422, "invalid_option", "my-request-1")
    assert "valid methods" in error.message
    with pytest.raises(CamserveError) as caught:
        camserve.predict(b"not an image")
    assert caught.value.status == 415


def test_models_and_ready(camserve: Client) -> None:
    assert [m["name"] for m in camserve.models()] == ["mobilenet_v2"]
    assert camserve.ready()


def test_async_client_through_the_asgi_transport(app: FastAPI, client: TestClient, cat_png: bytes) -> None:
    async def run() -> tuple[Answer, Answer]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            camserve = AsyncClient(http_client=http)
            explained = await camserve.explain(cat_png, outputs="mask", mask_encoding="list")
            predicted = await camserve.predict(cat_png, topk=1)
            assert await camserve.ready()
            with pytest.raises(CamserveError) as caught:
                await camserve.predict(cat_png, model="resnet9000")
            assert caught.value.status == 404
            return explained, predicted

    # The engine lives on the session client's event loop: run there.
    explained, predicted = client.portal.call(run)
    mask = explained.results[0].explanations[0].mask
    assert mask is not None and mask.shape == (224, 224)
    assert predicted.results[0].predictions[0].label == "Egyptian cat"


# Canned answers: parsing without a server ------------------------------------------------

def canned(mask: dict[str, object]) -> dict[str, object]:
    return {
        "request_id": "r1", "model": {"name": "m", "version": "v", "input_size": [2, 3]},
        "results": [{
            "image": {"index": 0, "frame": 0, "filename": None, "width": 3, "height": 2},
            "predictions": [{"class_idx": 1, "label": "one", "score": 0.9}],
            "explanations": [{"method": "gradcam", "target_layer": "l", "class_idx": 1, "label": "one",
                              "score": 0.9, "mask": mask, "overlay_png": None, "heatmap_png": None}],
        }],
        "timing_ms": {"queue": 0.1, "compute": 1.0, "encode": 0.2, "total": 1.5},
    }


VALUES = np.array([[0.0, 0.25, 0.5], [0.75, 1.0, 0.125]], dtype=np.float32)


def test_masks_decode_from_either_encoding() -> None:
    as_list = {"shape": [2, 3], "dtype": "float32", "encoding": "list", "data": VALUES.tolist()}
    raw = base64.b64encode(VALUES.astype("<f4").tobytes()).decode()
    as_b64 = {"shape": [2, 3], "dtype": "float32", "encoding": "base64", "data": raw}
    for mask in (as_list, as_b64):
        decoded = decode_mask(mask)
        assert decoded is not None and decoded.dtype == np.float32
        assert np.array_equal(decoded, VALUES)
    assert decode_mask(None) is None


def test_a_kserve_body_parses_like_a_results_body() -> None:
    body = canned({"shape": [2, 3], "dtype": "float32", "encoding": "list", "data": VALUES.tolist()})
    (result,) = body.pop("results")  # type: ignore[misc]
    kserve = {**body, "predictions": [{"image": result["image"], "predictions": result["predictions"]}],
              "explanations": [result["explanations"]]}
    answer = parse_answer(kserve)
    assert answer.results[0].predictions[0].label == "one"
    mask = answer.results[0].explanations[0].mask
    assert mask is not None and np.array_equal(mask, VALUES)


def test_the_mock_transport_sees_the_form_key_and_headers() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        mask = {"shape": [2, 3], "dtype": "float32", "encoding": "list", "data": VALUES.tolist()}
        return httpx.Response(200, json=canned(mask))

    http = httpx.Client(transport=httpx.MockTransport(handler), base_url="http://camserve")
    with Client(http_client=http, api_key="secret") as camserve:
        answer = camserve.explain(b"\x89PNG...", methods=["gradcam", "layercam"], class_idx=[1, 2],
                                  request_timeout=5, aug_smooth=True)
    assert answer.timing_ms["total"] == 1.5
    request = seen[0]
    assert request.url.path == "/explain"
    assert request.headers["Authorization"] == "Bearer secret"
    assert request.headers["X-Request-Timeout"] == "5"
    body = request.read()
    for field, value in (("methods", b"gradcam,layercam"), ("class_idx", b"1,2"), ("aug_smooth", b"true")):
        assert b'name="' + field.encode() + b'"\r\n\r\n' + value in body


def test_a_non_json_error_still_raises_camserve_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, text="upstream unavailable", headers={"Retry-After": "2"})

    http = httpx.Client(transport=httpx.MockTransport(handler), base_url="http://camserve")
    with pytest.raises(CamserveError) as caught:
        Client(http_client=http).predict(b"x")
    assert (caught.value.status, caught.value.retry_after) == (503, 2.0)
    assert "upstream" in caught.value.message



SCORECAM_TOP_K = '{"scorecam": {"top_k_channels": 96}}'


def test_jobs_through_the_client_report_progress_and_answer(camserve: Client, cat_png: bytes) -> None:
    job = camserve.submit_job(cat_png, methods="scorecam", outputs="mask", method_params=SCORECAM_TOP_K)
    assert job.status in ("queued", "running") and job.total >= 96
    seen: list[tuple[str, int, int]] = []
    answer = camserve.wait_job(job.job_id, progress=lambda j: seen.append((j.status, j.done, j.total)))
    assert answer.results[0].explanations[0].method == "scorecam"
    assert answer.results[0].explanations[0].mask is not None
    assert seen[-1][0] == "succeeded" and seen[-1][1] == seen[-1][2]
    done = [d for _, d, _ in seen]
    assert done == sorted(done) and len(seen) > 2
    assert camserve.job(job.job_id).status == "succeeded"


def test_a_cancelled_job_raises_from_wait(camserve: Client, cat_png: bytes) -> None:
    job = camserve.submit_job(cat_png, methods="scorecam", outputs="mask")
    cancelled = camserve.cancel_job(job.job_id)
    assert cancelled.status == "cancelled" and cancelled.finished
    with pytest.raises(CamserveError) as caught:
        camserve.wait_job(job.job_id)
    assert caught.value.code == "cancelled"


def test_explain_with_progress_draws_a_bar_and_answers_as_explain(
    camserve: Client, cat_png: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    answer = camserve.explain(cat_png, methods="scorecam", outputs="mask", progress=True,
                              method_params=SCORECAM_TOP_K)
    assert answer.results[0].explanations[0].mask is not None
    drawn = capsys.readouterr().err
    assert "scorecam job" in drawn and "pass" in drawn  # tqdm writes its bar to stderr


def test_async_client_jobs(app: FastAPI, client: TestClient, cat_png: bytes) -> None:
    async def run() -> tuple[list[int], Answer]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            camserve = AsyncClient(http_client=http)
            job = await camserve.submit_job(cat_png, methods="scorecam", outputs="mask",
                                            method_params=SCORECAM_TOP_K)
            done: list[int] = []
            answer = await camserve.wait_job(job.job_id, progress=lambda j: done.append(j.done))
            assert (await camserve.job(job.job_id)).status == "succeeded"
            return done, answer

    done, answer = client.portal.call(run)
    assert done and done == sorted(done) and done[-1] >= 96
    assert answer.results[0].explanations[0].method == "scorecam"
