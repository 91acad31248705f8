"""The same HTTP contract, served by Ray Serve across machines (``python -m service.ray_serve``).

One Serve application, ``camserve``, made of:

* the ingress deployment ``camserve``: the service's own FastAPI app (``create_app``, every
  route, the request checks and the engine's queue and batcher), whose engine hands each batch
  to a model deployment instead of computing it in-process;
* one deployment per registered model, ``model-<name>``: each replica owns one device, loads
  and warms its model before it takes traffic, and computes the batches the ingress forms, one
  at a time on its worker thread. The device is decided where the replica runs: the GPU Ray
  assigned it (``ray.get_gpu_ids()``), else the CPU, so a replica never takes a node's GPU that
  it has not reserved.

Both scale with Ray's autoscaler (replicas between ``min_replicas`` and ``max_replicas``,
following ``target_ongoing_requests``); ``deploy/serve_config.yaml`` (GPU cluster) and
``deploy/serve_config.cpu.yaml`` hold those settings and work with ``serve run`` and ``serve
deploy`` as well as with ``--config`` here.

GPUs: a Serve config's ``ray_actor_options`` *replace* the code's (Serve does not merge them),
so a config that names resources for a model deployment must name ``num_gpus`` too, as the
shipped GPU config does. Without one, the builder asks for ``gpus_per_replica`` GPUs (an
application arg; by default 1 when ``CAMSERVE_DEVICE`` names CUDA, 0 for ``cpu``, and for
``auto`` 1 only if the cluster has GPUs when the application is built: set it on a cluster
whose GPU nodes the autoscaler adds later).

The ingress computes nothing, so its engine keeps ``batches_in_flight`` batches (an
application arg, default 8) waiting on the model deployments at once instead of one.

``CAMSERVE_*`` settings are read once where the application is built and handed to every
replica, so nodes need the same weights files (and models file) at the same paths, not the
same environment.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
import yaml
from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.config import Settings
from service.engine.jobs import ExplainSpec, ItemResult, WorkItem
from service.engine.pool import WorkerSlot, is_fatal_device_error
from service.engine.worker import Worker, resolve_devices, warm_batch_sizes
from service.logs import configure_logging
from service.main import create_app
from service.models.catalog import ModelInfo
from service.models.loader import verify_weights
from service.models.spec import registered_specs

log = logging.getLogger(__name__)

APP_NAME = "camserve"
INGRESS_NAME = "camserve"
LOAD_TIMEOUT_S = 900.0  # a model replica may wait for a node, download nothing, load and warm up
BATCHES_IN_FLIGHT = 8  # per ingress replica: batches waiting on the model deployments at once

# Used when no Serve config overrides them (deploy/serve_config.yaml mirrors these).
INGRESS_OPTIONS: dict[str, Any] = {
    "max_ongoing_requests": 64,
    "autoscaling_config": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16},
    "ray_actor_options": {"num_cpus": 0.5},
    "graceful_shutdown_timeout_s": 40,
}
MODEL_OPTIONS: dict[str, Any] = {
    "max_ongoing_requests": 2,
    "autoscaling_config": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 1},
    "ray_actor_options": {"num_cpus": 1},
    "graceful_shutdown_timeout_s": 40,
}


def model_deployment_name(model: str) -> str:
    return f"model-{model}"


@dataclass
class RemoteItem:
    """What a model replica needs of a :class:`WorkItem`: plain data, no future, no clock."""

    model: str
    pixels: np.ndarray
    topk: int
    explain: ExplainSpec | None
    request_id: str


def _settings(values: Mapping[str, Any], **overrides: Any) -> Settings:
    return Settings(**{**values, **overrides})


def _replica_logging() -> None:
    """The service's JSON logs in a replica process (left alone anywhere else)."""
    if ray.is_initialized():
        configure_logging(logging.INFO)


def _assigned_cpus() -> int:
    """The CPUs Ray gave this replica: torch's thread count (1 outside Ray)."""
    if not ray.is_initialized():
        return 1
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, round(cpus))


class _ModelReplica:
    """One model on one device: the engine's own worker, on its own thread."""

    async def __init__(self, settings: dict[str, Any], model: str) -> None:  # type: ignore[misc]
        _replica_logging()
        self.settings = _settings(settings)
        spec = registered_specs(self.settings.models_file)[model]
        verify_weights(spec)
        device = replica_device(self.settings.device)
        threads = self.settings.torch_threads or _assigned_cpus()
        channels_last, precision = self.settings.channels_last, self.settings.precision
        self.slot = WorkerSlot(0, device, lambda d: Worker(d, threads, channels_last=channels_last,
                                                           precision=precision))
        size = self.settings.batch_size_for(device.type)
        warm = warm_batch_sizes(size, device) if self.settings.warmup else []
        self.info = (await self.slot.start([spec], warm))[model]
        self.device_failed: str | None = None
        log.info("model replica ready", extra={"model": model, "device": str(device)})

    def describe(self) -> ModelInfo:
        return self.info

    def check_health(self) -> None:
        """Serve's health check: a replica whose device failed is replaced by a fresh one."""
        if self.device_failed is not None:
            raise RuntimeError(f"this replica's device failed: {self.device_failed}")

    async def compute(self, items: list[RemoteItem]) -> list[ItemResult]:
        if self.device_failed is not None:
            raise ReplicaDeviceFailed("this model replica's device failed; it is being replaced")
        loop = asyncio.get_running_loop()
        work = [
            WorkItem(model=item.model, pixels=item.pixels, topk=item.topk, explain=item.explain,
                     deadline=float("inf"), future=loop.create_future(), request_id=item.request_id)
            for item in items
        ]
        try:
            return await self.slot.compute(work)
        except Exception as exc:
            if not is_fatal_device_error(exc):
                raise
            # Only this replica's process is poisoned: fail its health check so Serve replaces
            # it, and tell the ingress in words that do not read as its own device's failure.
            self.device_failed = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            log.critical("fatal device error in a model replica; failing its health check",
                         extra={"reason": self.device_failed})
            raise ReplicaDeviceFailed("this model replica's device failed; it is being replaced") from None

    def __del__(self) -> None:
        slot = getattr(self, "slot", None)
        if slot is not None:
            slot.close()


def replica_device(setting: str) -> torch.device:
    """A model replica's device, decided where it runs: the GPU Ray assigned it (Ray makes
    only that one visible, as ``cuda:0``); without one the CPU for ``auto``, else the setting."""
    if ray.is_initialized() and ray.get_gpu_ids():
        return torch.device("cuda", 0)
    if setting == "auto":
        return torch.device("cpu")
    return resolve_devices(setting)[0]


class ReplicaDeviceFailed(RuntimeError):
    """A model replica's device failed; Serve replaces the replica (an ordinary, retried error)."""


class RemoteWorker:
    """The engine's worker interface, answered by the model deployments.

    The engine calls it on its worker thread, so blocking on a Serve response is fine there."""

    def __init__(self, handles: Mapping[str, DeploymentHandle]) -> None:
        self.handles = dict(handles)

    def load(self, specs: Sequence[Any]) -> dict[str, ModelInfo]:
        catalog: dict[str, ModelInfo] = {}
        for spec in specs:
            info: ModelInfo = self.handles[spec.name].describe.remote().result(timeout_s=LOAD_TIMEOUT_S)
            catalog[spec.name] = info
        return catalog

    def warm_up(self, batch_sizes: Sequence[int]) -> None:
        """Model replicas warm up before they take traffic."""

    def compute(self, items: Sequence[WorkItem]) -> list[ItemResult]:
        # The ingress's slots are CPU ones, so the API decodes every file: pixels, never bytes.
        payload = [RemoteItem(i.model, _pixels(i), i.topk, i.explain, i.request_id) for i in items]
        try:
            results: list[ItemResult] = self.handles[items[0].model].compute.remote(payload).result()
        except Exception as exc:
            if is_fatal_device_error(exc):  # a replica's device, never the ingress's own (it has none)
                log.error("a model replica's device failed", extra={"reason": str(exc)[:300]})
                raise ReplicaDeviceFailed("a model replica's device failed; Serve replaces it") from None
            raise
        return results


def _pixels(item: WorkItem) -> np.ndarray:
    if item.pixels is None:
        raise RuntimeError("a model replica is sent decoded pixels only")
    return item.pixels


class _Ingress:
    """The service's FastAPI app; its lifespan starts the engine in each replica."""

    def __init__(self, settings: dict[str, Any], models: dict[str, DeploymentHandle],
                 batches_in_flight: int = BATCHES_IN_FLIGHT) -> None:
        _replica_logging()
        # The ingress holds no model: its engine's workers forward batches, so keep it off GPUs.
        self.settings = _settings(settings, device="cpu", warmup=False)
        self.models = models
        self.batches_in_flight = max(1, int(batches_in_flight))

    def __serve_build_asgi_app__(self) -> FastAPI:
        # One engine slot per batch in flight: each slot's thread waits on one remote batch,
        # so the ingress forms the next batches while the model replicas compute.
        app = create_app(self.settings, worker_factory=lambda _device: RemoteWorker(self.models),
                         devices=[torch.device("cpu")] * self.batches_in_flight)
        app.add_middleware(ProxyRequestId)
        return app


class ProxyRequestId:
    """Serve's HTTP proxy appends ``X-Request-ID`` (the request's, which it set when the client
    sent none) to every response; the app echoes the same id, so drop the app's copy and the
    client gets the header once."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = Headers(scope=scope).get("x-request-id")

        async def send_once(message: Message) -> None:
            if message["type"] == "http.response.start" and sent is not None:
                message["headers"] = [
                    (key, value) for key, value in message.get("headers", [])
                    if not (key.lower() == b"x-request-id" and value.decode("latin-1") == sent)
                ]
            await send(message)

        await self.app(scope, receive, send_once)


ModelReplica = serve.deployment(**MODEL_OPTIONS)(_ModelReplica)
Ingress = serve.deployment(**INGRESS_OPTIONS)(serve.ingress()(_Ingress))


def build_app(args: Mapping[str, Any] | None = None) -> serve.Application:
    """The Serve application; an application builder for ``serve run``/``serve deploy``.

    ``args``: ``settings`` (``CAMSERVE_*`` names without the prefix, lower case), overriding the
    environment; ``gpus_per_replica`` and ``batches_in_flight`` (see the module docstring);
    ``deployments`` (per deployment name, Serve options such as ``autoscaling_config``), as a
    Serve config file's ``deployments`` list or mapping.
    """
    args = dict(args or {})
    settings = Settings(**args.get("settings", {}))
    values = settings.model_dump(mode="json")
    overrides = _deployment_overrides(args.get("deployments"))
    gpus = _gpus_per_replica(args.get("gpus_per_replica"), settings.device)
    # The ingress's engine forms the batches on CPU slots for replicas on the devices Ray
    # gives them: unset, the batch size is that of the replicas' kind, decided here once.
    values["max_batch_size"] = settings.batch_size_for("cuda" if gpus > 0 else "cpu")
    handles = {}
    for name in registered_specs(settings.models_file):
        deployment_name = model_deployment_name(name)
        options: dict[str, Any] = {**overrides.get(deployment_name, {}), "name": deployment_name}
        if gpus > 0:  # each replica owns a GPU unless the config's own options say otherwise
            actor = {**MODEL_OPTIONS["ray_actor_options"], **options.get("ray_actor_options", {})}
            options["ray_actor_options"] = {"num_gpus": gpus, **actor}
        handles[name] = ModelReplica.options(**options).bind(values, name)
    ingress = Ingress.options(name=INGRESS_NAME, **overrides.get(INGRESS_NAME, {}))
    return ingress.bind(values, handles, int(args.get("batches_in_flight", BATCHES_IN_FLIGHT)))


def _gpus_per_replica(asked: Any, device: str) -> float:
    """GPUs each model replica asks Ray for (see the module docstring)."""
    if asked is not None:
        return float(asked)
    if device == "cpu":
        return 0.0
    if "cuda" in device:
        return 1.0
    return 1.0 if _cluster_gpus() > 0 else 0.0  # auto: what the cluster has now


def _deployment_overrides(deployments: Any) -> dict[str, dict[str, Any]]:
    if not deployments:
        return {}
    if isinstance(deployments, Mapping):
        return {str(k): dict(v) for k, v in deployments.items()}
    return {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in deployments}


def _cluster_gpus() -> float:
    if not ray.is_initialized():
        return 0.0
    return float(ray.cluster_resources().get("GPU", 0.0))


def read_serve_config(path: Path) -> dict[str, Any]:
    """The ``camserve`` application's ``args`` and ``deployments`` of a Serve config file."""
    config = yaml.safe_load(path.read_text())
    for application in config.get("applications", []):
        if application.get("name", APP_NAME) == APP_NAME:
            return {**application.get("args", {}), "deployments": application.get("deployments", [])}
    raise ValueError(f"{path} has no application named {APP_NAME!r}")
