"""The Ray Serve application's parts without a Ray cluster: the deployments it builds, the
ingress engine driving a model replica through (pickling) stand-in handles, and the proxy's
request-id header."""

from __future__ import annotations

import asyncio
import inspect
import pickle
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request, Response
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app
from service.ray_serve import (
    INGRESS_NAME,
    ProxyRequestId,
    RemoteWorker,
    _ModelReplica,
    build_app,
    model_deployment_name,
)
from tests.conftest import ready_client
from tests.custom_model import INPUT_SIZE, LABELS, png, write_models_file


@pytest.fixture(scope="module")
def models_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_models_file(tmp_path_factory.mktemp("ray_models"))


def _deployments(app: Any) -> tuple[Any, dict[str, Any]]:
    ingress = app._bound_deployment
    return ingress, {name: bound._bound_deployment for name, bound in ingress.init_args[1].items()}


def test_one_deployment_per_registered_model(models_file: Path) -> None:
    ingress, models = _deployments(build_app({"settings": {"models_file": str(models_file)}}))
    assert ingress.name == INGRESS_NAME
    assert {name: d.name for name, d in models.items()} == {
        "mobilenet_v2": model_deployment_name("mobilenet_v2"),
        "tiny_resnet": model_deployment_name("tiny_resnet"),
    }
    for name, deployment in models.items():
        settings, model = deployment.init_args
        assert model == name and settings["models_file"] == str(models_file)
        assert not deployment.ray_actor_options.get("num_gpus")  # this machine's cluster has no GPU


def test_model_replicas_own_a_gpu_when_the_cluster_has_them(monkeypatch: pytest.MonkeyPatch) -> None:
    import service.ray_serve as ray_app

    monkeypatch.setattr(ray_app, "_cluster_gpus", lambda: 2.0)
    ingress, models = _deployments(build_app())
    assert models["mobilenet_v2"].ray_actor_options["num_gpus"] == 1
    assert not ingress.ray_actor_options.get("num_gpus"), "the ingress holds no model"
    # a config's resources are merged with the GPU, not replacing it
    _, models = _deployments(build_app({"deployments": [
        {"name": "model-mobilenet_v2", "ray_actor_options": {"num_cpus": 4}}]}))
    assert models["mobilenet_v2"].ray_actor_options == {"num_cpus": 4, "num_gpus": 1}
    # CAMSERVE_DEVICE=cpu keeps replicas off GPUs
    _, models = _deployments(build_app({"settings": {"device": "cpu"}}))
    assert not models["mobilenet_v2"].ray_actor_options.get("num_gpus")


class _ReplicaLoop:
    """A background event loop standing in for a replica's."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(120)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class _Response:
    def __init__(self, value: Any) -> None:
        self.value = value

    def result(self, timeout_s: float | None = None) -> Any:
        return self.value


class _Handle:
    """``handle.method.remote(*args).result()``, with arguments and results pickled as Ray does."""

    def __init__(self, replica: Any, loop: _ReplicaLoop) -> None:
        self.replica, self.loop = replica, loop
        self.calls: list[str] = []

    def __getattr__(self, method: str) -> Any:
        handle = self

        class _Method:
            def remote(self, *args: Any) -> _Response:
                handle.calls.append(method)
                fn = getattr(handle.replica, method)
                args = pickle.loads(pickle.dumps(args))
                value = handle.loop.run(fn(*args)) if inspect.iscoroutinefunction(fn) else fn(*args)
                return _Response(pickle.loads(pickle.dumps(value)))

        return _Method()


@pytest.fixture(scope="module")
def replica_handles(models_file: Path) -> Iterator[dict[str, _Handle]]:
    loop = _ReplicaLoop()
    settings = Settings(models_file=models_file, device="cpu", warmup=False).model_dump(mode="json")
    replicas = {}
    for name in ("mobilenet_v2", "tiny_resnet"):
        replica = _ModelReplica.__new__(_ModelReplica)
        loop.run(replica.__init__(settings, name))  # async __init__, as Ray runs it
        replicas[name] = replica
    try:
        yield {name: _Handle(replica, loop) for name, replica in replicas.items()}
    finally:
        for replica in replicas.values():
            replica.slot.close()
        loop.close()


def test_ingress_engine_batches_and_the_model_replicas_compute(
    models_file: Path, replica_handles: dict[str, _Handle], cat_png: bytes
) -> None:
    settings = Settings(models_file=models_file, device="cpu", warmup=False)
    app = create_app(settings, worker_factory=lambda _device: RemoteWorker(replica_handles))
    running = ready_client(app)
    client = next(running)
    try:
        for handle in replica_handles.values():
            assert handle.calls == ["describe"]  # the catalog came from the replicas
        tiny = client.get("/models/tiny_resnet").json()
        assert tiny["input_size"] == list(INPUT_SIZE)
        response = client.post(
            "/explain",
            files=[("file", ("a.png", png(64, 48, seed=1), "image/png")),
                   ("file", ("b.png", png(40, 30, seed=2), "image/png"))],
            data={"model": "tiny_resnet", "topk": "3", "mask_size": "feature"},
        )
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert [r["image"]["filename"] for r in results] == ["a.png", "b.png"]
        for result in results:
            assert {p["label"] for p in result["predictions"]} == set(LABELS)
            (explanation,) = result["explanations"]
            assert explanation["target_layer"] == tiny["default_layer"]
        assert replica_handles["tiny_resnet"].calls[1:] and set(replica_handles["tiny_resnet"].calls[1:]) == {
            "compute"}
        assert replica_handles["mobilenet_v2"].calls == ["describe"], "each model's batches go to its own"

        cat = client.post("/explain", files={"file": ("chelsea.png", cat_png, "image/png")})
        assert cat.status_code == 200, cat.text
        assert cat.json()["results"][0]["predictions"][0]["label"] == "Egyptian cat"
        assert replica_handles["mobilenet_v2"].calls == ["describe", "compute"]
    finally:
        running.close()  # the app's lifespan stops the engine


def test_request_id_header_once_behind_serves_proxy() -> None:
    app = FastAPI()

    @app.get("/")
    def echo(request: Request) -> Response:
        chosen = request.headers.get("x-request-id") or "generated"
        return Response("ok", headers={"X-Request-ID": chosen if chosen != "bad id" else "generated"})

    app.add_middleware(ProxyRequestId)
    with TestClient(app) as client:
        # same id as the request's: the proxy adds it back, so the app's copy goes
        assert "x-request-id" not in client.get("/", headers={"X-Request-ID": "abc"}).headers
        # a different id (the app replaced an unusable one) is kept
        assert client.get("/", headers={"X-Request-ID": "bad id"}).headers["x-request-id"] == "generated"


def test_an_explicit_gpu_request_needs_no_gpu_in_the_cluster_at_build_time() -> None:
    # An autoscaled cluster adds its GPU nodes later: the request must not depend on them.
    _, models = _deployments(build_app({"gpus_per_replica": 1}))
    assert models["mobilenet_v2"].ray_actor_options["num_gpus"] == 1
    _, models = _deployments(build_app({"settings": {"device": "cuda"}}))
    assert models["mobilenet_v2"].ray_actor_options["num_gpus"] == 1
    _, models = _deployments(build_app({"gpus_per_replica": 0, "settings": {"device": "cuda"}}))
    assert not models["mobilenet_v2"].ray_actor_options.get("num_gpus")


def test_a_replica_takes_the_device_ray_assigned_where_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray
    import torch

    from service.ray_serve import replica_device

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [3])  # Ray shows it as the only one: cuda:0
    assert replica_device("auto") == torch.device("cuda", 0)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    assert replica_device("auto") == torch.device("cpu"), "no GPU reserved: none taken"
    assert replica_device("cpu") == torch.device("cpu")


class _SlowModel:
    """A model deployment's handle whose batches return only once ``together`` of them are
    being computed at once (a barrier): one batch at a time would never get there."""

    def __init__(self, together: int) -> None:
        from service.models.spec import embedded_default
        from tests.engine.fakes import model_info

        self.info = model_info(embedded_default())
        self.barrier = threading.Barrier(together, timeout=30)
        self.describe = _Call(lambda: self.info)
        self.compute = _Call(self._compute)

    def _compute(self, items: list[Any]) -> list[Any]:
        from service.engine.jobs import ItemResult

        self.barrier.wait()
        return [ItemResult([(1, 1.0)], [], 0.0, 1.0) for _ in items]


class _Call:
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> _Response:
        return _Response(self.fn(*args))


def test_the_ingress_keeps_several_batches_in_flight(cat_png: bytes) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from service.ray_serve import _Ingress

    model = _SlowModel(together=3)
    values = Settings(max_batch_size=1, max_batch_delay_ms=0).model_dump(mode="json")
    ingress = _Ingress(values, {"mobilenet_v2": model}, batches_in_flight=3)  # type: ignore[dict-item]
    app = ingress.__serve_build_asgi_app__()
    running = ready_client(app)
    client = next(running)
    try:
        assert len(app.state.engine.slots) == 3
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda _: client.post(
                "/predict", files={"file": ("c.png", cat_png, "image/png")}, data={"topk": "1"}), range(3)))
        assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
        assert not model.barrier.broken
    finally:
        running.close()


def test_a_fatal_device_error_in_a_replica_fails_its_health_check_not_the_ingress() -> None:
    from service.engine.pool import is_fatal_device_error
    from service.ray_serve import ReplicaDeviceFailed
    from tests.engine.fakes import FATAL_MESSAGE

    class _FailingSlot:
        async def compute(self, work: list[Any]) -> list[Any]:
            raise RuntimeError(FATAL_MESSAGE)

        def close(self) -> None:  # the replica's __del__ closes its slot
            pass

    replica = _ModelReplica.__new__(_ModelReplica)
    replica.slot, replica.device_failed = _FailingSlot(), None  # type: ignore[assignment]
    replica.check_health()  # healthy until the device fails
    loop = _ReplicaLoop()
    try:
        with pytest.raises(ReplicaDeviceFailed) as failed:
            loop.run(replica.compute([]))
        assert not is_fatal_device_error(failed.value), "the ingress must not take it for its own"
        with pytest.raises(RuntimeError, match="device-side assert"):
            replica.check_health()  # Serve replaces the replica
        with pytest.raises(ReplicaDeviceFailed):
            loop.run(replica.compute([]))  # and it computes nothing more meanwhile
    finally:
        loop.close()

    class _FatalHandle:
        class compute:  # handle.compute.remote(...).result(), as Serve's
            @staticmethod
            def remote(payload: Any) -> Any:
                class _Failed:
                    def result(self, timeout_s: float | None = None) -> Any:
                        raise RuntimeError(FATAL_MESSAGE)  # what a Ray error's text may carry

                return _Failed()

    import asyncio as _asyncio
    import time as _time

    import numpy as np

    from service.engine.jobs import WorkItem

    async def one() -> None:
        item = WorkItem("mobilenet_v2", np.zeros((2, 2, 3), np.uint8), 1, None, _time.monotonic() + 5,
                        _asyncio.get_running_loop().create_future())
        with pytest.raises(ReplicaDeviceFailed) as raised:
            RemoteWorker({"mobilenet_v2": _FatalHandle()}).compute([item])  # type: ignore[dict-item]
        assert not is_fatal_device_error(raised.value)

    _asyncio.run(one())
