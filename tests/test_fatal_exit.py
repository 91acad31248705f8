"""A fatal device error as a client and an orchestrator see it: the request 503, /healthz and
/readyz 503, and ``python -m service`` exiting with status 70 (fake workers, no GPU)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.__main__ import EXIT_DEVICE_FAILED
from service.main import create_app
from tests.engine.fakes import Script, settings
from tests.server_process import ROOT, START_S, free_port, poll


def png(tag: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 48, 3), tag, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def predict(client: httpx.Client | TestClient, tag: int) -> httpx.Response:
    return client.post("/predict", files={"file": ("x.png", png(tag), "image/png")}, data={"topk": "1"})


def test_health_checks_turn_503_after_a_fatal_device_error() -> None:
    script, reasons = Script(fatal={66}), []
    app = create_app(settings(), worker_factory=script.factory, on_fatal=reasons.append)
    with TestClient(app) as client:
        client.portal.call(app.state.engine.wait_ready)
        assert client.get("/healthz").status_code == 200
        assert predict(client, 5).status_code == 200
        failed = predict(client, 66)
        assert failed.status_code == 503
        assert failed.json()["error"]["code"] == "unavailable"
        assert "restarting" in failed.json()["error"]["message"]
        for probe in ("/healthz", "/readyz"):
            answer = client.get(probe)
            assert answer.status_code == 503, probe
            assert answer.json()["state"] == "fatal"
            assert "device-side assert" in answer.json()["status"]
        assert predict(client, 5).status_code == 503  # nothing runs on a poisoned device
        assert len(reasons) == 1 and "device-side assert" in reasons[0]


def test_python_m_service_exits_70_after_a_fatal_device_error(tmp_path: Path) -> None:
    serve_then_fail(tmp_path, {})


@pytest.mark.cuda
def test_a_real_device_side_assert_makes_python_m_service_exit_70(tmp_path: Path) -> None:
    serve_then_fail(tmp_path, {"CAMSERVE_TEST_REAL_CUDA_FAULT": "1"})


def serve_then_fail(tmp_path: Path, extra_env: dict[str, str]) -> None:
    """One request answered, then the faulting one 503, then the process exits 70."""
    port = free_port()
    env = {**os.environ, "CAMSERVE_DEVICE": "cpu", "CAMSERVE_WARMUP": "false", **extra_env}
    env.pop("CAMSERVE_API_KEY", None)
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "tests.fatal_server", "--port", str(port)],
                                   cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:

            def ready() -> bool:
                assert process.poll() is None, log_path.read_text()
                try:
                    return client.get("/readyz").status_code == 200
                except httpx.TransportError:
                    return False

            poll(ready, "the server to be ready", timeout_s=START_S)
            assert predict(client, 3).status_code == 200
            failed = predict(client, 66)
            assert failed.status_code == 503, failed.text
            assert failed.json()["error"]["code"] == "unavailable"
        assert process.wait(timeout=60) == EXIT_DEVICE_FAILED
        text = log_path.read_text()
        assert "device-side assert triggered" in text
        assert f"exiting with status {EXIT_DEVICE_FAILED}" in text
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
