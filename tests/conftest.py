"""Shared fixtures: the real service (embedded mobilenet_v2) loaded once per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app

DATA = Path(__file__).parent / "data"

# The real-server tests start ``python -m service`` and look at one process (its descriptors,
# its connection bound, its exit): one front end, as CAMSERVE_WORKERS=1 asks. The tests of
# several front ends (tests/test_frontends.py) ask for them themselves.
os.environ.setdefault("CAMSERVE_WORKERS", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` are skipped where torch sees no CUDA device: the only skips."""
    cuda = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not cuda:
        return
    import torch

    if torch.cuda.is_available():
        return
    for item in cuda:
        item.add_marker(pytest.mark.skip(reason="needs CUDA"))


def ready_client(app: FastAPI) -> Iterator[TestClient]:
    """A TestClient whose app has finished loading and warming its models."""
    with TestClient(app) as client:
        client.portal.call(app.state.engine.wait_ready)
        assert app.state.engine.state == "ready", app.state.engine.failure
        yield client


@pytest.fixture(scope="session")
def app() -> FastAPI:
    return create_app(Settings())


@pytest.fixture(scope="session")
def client(app: FastAPI) -> Iterator[TestClient]:
    yield from ready_client(app)


@pytest.fixture(scope="session")
def cat_png() -> bytes:
    return (DATA / "chelsea.png").read_bytes()


@pytest.fixture(scope="session")
def coffee_png() -> bytes:
    return (DATA / "coffee.png").read_bytes()
