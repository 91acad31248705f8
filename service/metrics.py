"""Prometheus metrics, one :class:`Metrics` (and one registry) per app.

A registry per app, rather than prometheus-client's global one, lets several apps live in one
process (tests build many) without duplicate-registration errors.

:class:`MetricsMiddleware` (pure ASGI, outermost) times every request and counts error codes;
:meth:`Engine.submit` leaves the model, the CAM methods and its timings in the request's state
(see :data:`service.logs.request_state`); the engine reports batches (size, queue wait, compute
time) through :meth:`Metrics.observe_batch`. Encode time is from the engine's answer to the
response's first byte: rendering masks and PNGs and serialising the JSON.

Every label value comes from a bounded set, whatever clients send: endpoints are route
templates (``unmatched`` for any other path), HTTP methods the standard ones (``other``), models
and CAM methods registered names only (bound by the app's lifespan), and the CAM methods of a
request count one sample per method (``camserve_cam_method_requests_total``), not one series
per list: a list in request order made 12,000 requests 157,794 series.

Several front-end processes (:mod:`service.frontends`) run prometheus-client's multiprocess
mode: the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` before they start, every metric writes
to that folder, and ``/metrics`` from any of them sums every process's files (counters and
histograms are totals over all processes, the ones gone included; the gauges are ``livesum``:
the sum over the processes alive). The engine's gauges, read from a function in one process,
are then written by each process every :data:`REFRESH_S` and when it is scraped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.logs import request_state

log = logging.getLogger("service.access")

_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
_CODE = re.compile(r"^[a-z_]{1,40}$")
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# prometheus-client chooses its value store when it is imported, from this variable.
MULTIPROCESS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
REFRESH_S = 1.0
_STAGE = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self, max_batch_size: int = 8) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_latency = Histogram(
            "camserve_request_duration_seconds",
            "HTTP request latency, by endpoint (route template), HTTP method, model and status",
            ["endpoint", "method", "model", "status"], buckets=_LATENCY, registry=r)
        self.cam_method_requests = Counter(
            "camserve_cam_method_requests_total",
            "explain requests answered, one sample per CAM method they asked for, by method and status",
            ["cam_method", "status"], registry=r)
        self.errors = Counter(
            "camserve_errors_total", "error responses, by error code and endpoint",
            ["code", "endpoint"], registry=r)
        self.in_flight_requests = Gauge(
            "camserve_in_flight_requests", "HTTP requests being handled", registry=r,
            multiprocess_mode="livesum")
        self.queue_wait = Histogram(
            "camserve_queue_wait_seconds", "time an image waited in the queue before its batch started",
            ["model"], buckets=_STAGE, registry=r)
        self.compute = Histogram(
            "camserve_compute_seconds", "time a worker spent on one batch (forward, CAMs, resizing)",
            ["model", "device"], buckets=_STAGE, registry=r)
        self.encode = Histogram(
            "camserve_encode_seconds", "time spent rendering a response (PNG, masks, JSON)",
            ["endpoint"], buckets=_STAGE, registry=r)
        sizes = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, max_batch_size})
        self.batch_size = Histogram(
            "camserve_batch_size", "images per computed batch", ["model"],
            buckets=[s for s in sizes if s <= max_batch_size], registry=r)
        self.queue_depth = Gauge("camserve_queue_depth", "images waiting in the queue", registry=r,
                                 multiprocess_mode="livesum")
        self.in_flight_images = Gauge(
            "camserve_in_flight_images", "images being computed by the workers", registry=r,
            multiprocess_mode="livesum")
        self.images_accepted = Counter(
            "camserve_images_accepted_total", "images accepted into the queue", ["model"], registry=r)
        self.expired = Counter(
            "camserve_expired_images_total", "images dropped unqueued because their deadline passed",
            registry=r)
        self.models: frozenset[str] = frozenset()
        self.cam_methods: frozenset[str] = frozenset()
        self.worker_restarts = Counter(
            "camserve_worker_restarts_total", "workers rebuilt after their thread died", registry=r)
        self.jobs = Gauge("camserve_jobs", "jobs held, by status", ["status"], registry=r,
                          multiprocess_mode="livesum")  # each process counts the jobs it runs
        self.job_duration = Histogram(
            "camserve_job_duration_seconds", "time from a job's creation to its end, by CAM method "
            "(a job of several methods counts once for each) and final status",
            ["cam_method", "status"], buckets=(*_LATENCY, 120.0, 300.0, 600.0, 1800.0, 3600.0), registry=r)
        self.passes = Counter(
            "camserve_heavy_passes_total", "forward-pass equivalents run by heavy explanations; "
            "its rate is the passes per second", registry=r)

    def bind_names(self, models: Iterable[str], cam_methods: Iterable[str]) -> None:
        """The registered names: any other value becomes an empty label or is not counted."""
        self.models = frozenset(models)
        self.cam_methods = frozenset(cam_methods)

    def bind_engine(self, queue_depth: Callable[[], int], in_flight: Callable[[], int]) -> None:
        if MULTIPROCESS_DIR is None:
            self.queue_depth.set_function(queue_depth)
            self.in_flight_images.set_function(in_flight)
        else:  # a function gauge is only seen by its own process's registry: write it instead
            self._engine_reads = (queue_depth, in_flight)

    _engine_reads: tuple[Callable[[], int], Callable[[], int]] | None = None
    _job_counts: Callable[[], dict[str, int]] | None = None

    def bind_jobs(self, counts: Callable[[], dict[str, int]]) -> None:
        """The jobs held by status, read at each scrape (and refresh): set only when a job
        finished, the gauge never showed a running job, and kept the expired ones."""
        self._job_counts = counts

    def _refresh_jobs(self) -> None:
        if self._job_counts is not None:
            for status, count in self._job_counts().items():
                self.jobs.labels(status).set(count)

    def refresh(self) -> None:
        """Multiprocess mode: write the engine's and the jobs' gauges to this process's files."""
        self._refresh_jobs()
        if self._engine_reads is not None:
            queue_depth, in_flight = self._engine_reads
            self.queue_depth.set(queue_depth())
            self.in_flight_images.set(in_flight())

    async def refresh_forever(self) -> None:
        """Multiprocess mode: :meth:`refresh` every :data:`REFRESH_S`, so a scrape answered by
        another process sees this one's queue; returns at once in a single process."""
        while MULTIPROCESS_DIR is not None:
            self.refresh()
            await asyncio.sleep(REFRESH_S)

    def exposition(self) -> bytes:
        """The text exposition: this app's registry, or every front end's files summed."""
        if MULTIPROCESS_DIR is None:
            self._refresh_jobs()
            return generate_latest(self.registry)
        self.refresh()
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=MULTIPROCESS_DIR)
        return generate_latest(registry)

    def observe_batch(
        self, model: str, device: str, size: int, queue_waits_s: Sequence[float], compute_s: float
    ) -> None:
        self.batch_size.labels(model).observe(size)
        self.compute.labels(model, device).observe(compute_s)
        wait = self.queue_wait.labels(model)
        for seconds in queue_waits_s:
            wait.observe(seconds)


class MetricsMiddleware:
    """Times each HTTP request, counts error codes and writes one structured access log line."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})  # request.state: the engine leaves model, timings here
        token = request_state.set(state)
        started = time.perf_counter()
        status = 0
        responded = 0.0
        error_chunks: list[bytes] = []
        self.metrics.in_flight_requests.inc()

        async def send_and_watch(message: Message) -> None:
            nonlocal status, responded
            if message["type"] == "http.response.start":
                status = message["status"]
                responded = time.perf_counter()
            elif message["type"] == "http.response.body" and status >= 400:
                error_chunks.append(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            request_state.reset(token)
            self.metrics.in_flight_requests.dec()
            if not status:  # no response: the client went away, or a fault escaped everything
                status = 499 if state.get("disconnected") else 500
            computed = state.get("computed_at")
            if computed and responded:
                state["encode_ms"] = round((responded - computed) * 1000, 2)
            self._record(scope, status, b"".join(error_chunks), time.perf_counter() - started)

    def _record(self, scope: Scope, status: int, error_body: bytes, seconds: float) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or "unmatched"
        state: dict[str, Any] = scope.get("state") or {}
        model = str(state.get("model", ""))
        requested = list(state.get("cam_methods", ()))
        cam_methods = ",".join(requested)
        metrics = self.metrics
        http_method = scope["method"] if scope["method"] in _HTTP_METHODS else "other"
        model_label = model if model in metrics.models else ""
        metrics.request_latency.labels(endpoint, http_method, model_label, str(status)).observe(seconds)
        for name in sorted(set(requested) & metrics.cam_methods):
            metrics.cam_method_requests.labels(name, str(status)).inc()
        timing = {k: state[f"{k}_ms"] for k in ("queue", "compute", "encode") if f"{k}_ms" in state}
        if "encode" in timing:
            self.metrics.encode.labels(endpoint).observe(timing["encode"] / 1000)
        code = _error_code(error_body) if status >= 400 else None
        if code:
            self.metrics.errors.labels(code if _CODE.match(code) else "other", endpoint).inc()
        if endpoint in ("/metrics", "/healthz", "/readyz"):
            return
        log.info("request", extra={
            "request_id": state.get("request_id", ""), "method": http_method, "endpoint": endpoint,
            "status": status, "model": model or None, "cam_methods": cam_methods or None,
            "images": state.get("images"), "batch_sizes": state.get("batch_sizes"), "error": code,
            "timing_ms": {**timing, "total": round(seconds * 1000, 2)},
        })


def _error_code(body: bytes) -> str:
    try:
        parsed = orjson.loads(body)
        return str(parsed["error"]["code"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return "http_error"
