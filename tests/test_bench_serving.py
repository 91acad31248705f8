"""The serving benchmark's baselines and report (the benchmark itself runs by hand)."""

from __future__ import annotations

import base64
import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from loadtests import bench_serving


@pytest.fixture(scope="module")
def bodies() -> dict[bool, bytes]:
    image = bench_serving.IMAGE.read_bytes()
    out = {}
    for typed in (False, True):
        with TestClient(bench_serving.baseline_app(typed=typed)) as client:
            response = client.post("/explain", files={"file": ("chelsea.png", image, "image/png")})
            assert response.status_code == 200
            out[typed] = response.content
    return out


def test_baseline_answers_what_camserve_answers(bodies: dict[bool, bytes]) -> None:
    import orjson

    body = orjson.loads(bodies[False])
    assert body["predictions"][0]["label"] == "Egyptian cat"
    assert len(body["predictions"]) == 5
    (explanation,) = body["explanations"]
    mask = explanation["mask"]
    assert len(mask) == 224 and {len(row) for row in mask} == {224}
    assert min(map(min, mask)) >= 0.0 and max(map(max, mask)) <= 1.0
    overlay = Image.open(io.BytesIO(base64.b64decode(explanation["overlay_png"])))
    assert overlay.format == "PNG" and overlay.size == (451, 300)


@pytest.mark.parametrize("typed", [False, True])
def test_only_the_typed_baseline_declares_a_response_model(typed: bool) -> None:
    """The plain one is serialised by jsonable_encoder, the typed one by pydantic-core."""
    from fastapi.routing import APIRoute

    (route,) = [r for r in bench_serving.baseline_app(typed=typed).routes
                if isinstance(r, APIRoute) and r.path == "/explain"]
    assert (route.response_field is not None) is typed


def test_typed_baseline_sends_the_same_bytes(bodies: dict[bool, bytes]) -> None:
    """Only how FastAPI serialises differs, never what the client receives."""
    assert bodies[True] == bodies[False]


def test_report_gives_ratios_against_both_baselines(capsys: pytest.CaptureFixture[str]) -> None:
    def outcome(name: str, requests: int) -> bench_serving.Outcome:
        return bench_serving.Outcome(name, latencies=[0.5] * requests, elapsed=10.0,
                                     server_cpu_s=requests * 0.02, client_cpu_s=requests * 0.005)

    bench_serving.report([outcome("batched", 300), outcome("unbatched", 200),
                          outcome("baseline", 50), outcome("baseline-typed", 100)], 16)
    printed = capsys.readouterr().out
    assert "batched / unbatched: 1.50x" in printed
    assert "batched / baseline: 6.00x" in printed
    assert "batched / baseline-typed: 3.00x" in printed
    assert "unbatched / baseline-typed: 2.00x" in printed
    row = next(line for line in printed.splitlines() if line.startswith("batched "))
    assert row.split()[-2:] == ["20.0", "5.0"]  # CPU ms per request: server, client


def test_process_cpu_time_is_read_from_proc() -> None:
    import os
    import time

    before = bench_serving.process_cpu_s(os.getpid())
    assert before is not None
    spin_until = time.process_time() + 0.2
    while time.process_time() < spin_until:
        pass
    after = bench_serving.process_cpu_s(os.getpid())
    assert after is not None and after - before >= 0.15
    assert bench_serving.process_cpu_s(2**22 + 12345) is None  # no such process


def test_model_costs_time_one_image_and_a_batch_of_eight_per_image() -> None:
    import time

    import torch
    from torch import nn

    class Sleepy(nn.Module):
        """2 ms per image, and records the batch sizes and layouts it is given."""

        def __init__(self) -> None:
            super().__init__()
            self.seen: list[tuple[int, bool]] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.seen.append((x.shape[0], x.is_contiguous(memory_format=torch.channels_last)))
            time.sleep(0.002 * x.shape[0])
            return x.mean(dim=(1, 2, 3))

    model = Sleepy()
    costs = bench_serving.model_costs(model, "sleepy", repeats=3)
    assert list(costs) == ["sleepy, 1 image", "sleepy, per image in a batch of 8"]
    alone, per_image = costs.values()
    assert alone >= 2.0
    assert 2.0 <= per_image < 16.0  # the batch's time divided by its 8 images
    assert {size for size, _ in model.seen} == {1, 8}
    assert all(channels_last for size, channels_last in model.seen if size == 8)
    assert len(model.seen) == 2 * (3 + 2)  # two unmeasured passes per batch size
