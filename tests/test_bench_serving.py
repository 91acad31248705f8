"""The serving benchmark's baselines and report (the benchmark itself runs by hand)."""

from __future__ import annotations

import base64
import io
from typing import Any

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
    assert row.split()[-3:] == ["20.0", "-", "5.0"]  # CPU ms per request: server, host (unknown), client


def test_report_gives_host_cpu_against_the_old_commit(capsys: pytest.CaptureFixture[str]) -> None:
    """--baseline-rev's server is the same config at another commit: host CPU and throughput
    are printed as ratios against it."""
    new = bench_serving.Outcome("batched", latencies=[0.5] * 200, elapsed=10.0,
                                server_cpu_s=200 * 0.03, torch_cpu_s=200 * 0.025, client_cpu_s=1.0)
    old = bench_serving.Outcome("batched@abc123", latencies=[0.5] * 100, elapsed=10.0,
                                server_cpu_s=100 * 0.03, torch_cpu_s=100 * 0.02, client_cpu_s=1.0)
    bench_serving.report([new, old], 16)
    printed = capsys.readouterr().out
    assert "host CPU per request batched / batched@abc123: 5.00 / 10.00 ms = 0.50x" in printed
    assert "throughput batched / batched@abc123: 2.00x" in printed
    row = next(line for line in printed.splitlines() if line.startswith("batched "))
    assert row.split()[-3:-1] == ["30.0", "5.0"]


PROBE = """
import sys, threading, time

def spin():
    until = time.process_time() + 0.3
    while time.process_time() < until:
        pass
    with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
        print(f.read().strip(), flush=True)
    sys.stdin.readline()

thread = threading.Thread(target=spin, name="camserve-worker-0-cpu")
thread.start()
thread.join()
"""


def test_servers_threads_are_named_for_the_kernel_and_their_cpu_read(tmp_path: Any) -> None:
    """A module run through loadtests/named_threads.py: its threads carry their Python names
    (15 bytes) in /proc, and the worker's CPU time is read from there."""
    import subprocess
    import sys

    (tmp_path / "probe_threads.py").write_text(PROBE)
    script = bench_serving.REPO / "loadtests" / "named_threads.py"
    process = subprocess.Popen([sys.executable, str(script), "-m", "probe_threads"], cwd=tmp_path,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdin is not None
        assert process.stdout.readline().strip() == "camserve-worker"
        worker_s = bench_serving.torch_threads_cpu_s(process.pid)
        total_s = bench_serving.process_cpu_s(process.pid)
        assert worker_s is not None and total_s is not None
        assert 0.25 <= worker_s <= total_s
        process.stdin.write("\n")
        process.stdin.flush()
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
    import os

    assert bench_serving.torch_threads_cpu_s(os.getpid()) is None  # no worker thread here


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
