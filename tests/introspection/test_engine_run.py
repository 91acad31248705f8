"""Engine.run: one-off work runs on the worker's own thread, with the worker's model."""

from __future__ import annotations

import threading

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.models.loader import LoadedModel


def test_run_calls_the_function_on_the_worker_thread(client: TestClient, app: FastAPI) -> None:
    def probe(loaded: LoadedModel) -> tuple[str, str, bool]:
        return threading.current_thread().name, loaded.spec.name, loaded.module.training

    thread, name, training = client.portal.call(app.state.engine.run, "mobilenet_v2", probe)
    assert thread.startswith("camserve-worker-") and thread != threading.current_thread().name
    assert (name, training) == ("mobilenet_v2", False)


def test_errors_of_the_function_reach_the_caller(client: TestClient, app: FastAPI) -> None:
    def fail(_loaded: LoadedModel) -> None:
        raise ValueError("bad layer")

    with pytest.raises(ValueError, match="bad layer"):
        client.portal.call(app.state.engine.run, "mobilenet_v2", fail)
    # The worker keeps serving afterwards.
    layer = client.portal.call(app.state.engine.run, "mobilenet_v2", lambda m: m.default_layer)
    assert layer == "features.18"
