"""The ASGI application: ``service.main:app``.

Nothing heavy happens at import time. The lifespan checks every weights file (a wrong one
stops start-up with its reason), then loads and warms the models in the background so
``/healthz`` answers at once and ``/readyz`` turns 200 when the engine is ready.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from service import __version__, frontends
from service.api.deps import require_api_key
from service.api.disconnect import DisconnectMiddleware
from service.api.errors import install_error_handlers
from service.api.jobstore import Job, JobStore
from service.api.middleware import RequestContextMiddleware
from service.api.pacs import Pacs
from service.api.routes import (
    catalog,
    dicomweb,
    dicomweb_browse,
    docs,
    health,
    inference,
    introspection,
    jobs,
    kserve,
    ui,
)
from service.api.sharedjobs import SharedJobs
from service.config import Settings, get_settings
from service.engine.engine import Engine
from service.engine.pool import WorkerFactory
from service.metrics import Metrics, MetricsMiddleware
from service.models.loader import verify_weights
from service.models.spec import ModelSpec, registered_specs

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DESCRIPTION = """
Classify images with PyTorch/torchvision models and explain each prediction with Class
Activation Maps. Responses carry the predicted classes, the raw masks and base64 PNG overlays.

Try it: open **POST /explain**, press *Try it out*, choose a photo and *Execute*.
"""


def checked_specs(settings: Settings) -> list[ModelSpec]:
    """The registered models, every weights file checked: raises ``ModelsFileError``,
    ``ModelLoadError`` or ``RuntimeError`` with a one-line reason when start-up must stop."""
    specs = list(registered_specs(settings.models_file).values())
    for spec in specs:
        verify_weights(spec)
    if settings.default_model not in {spec.name for spec in specs}:
        raise RuntimeError(f"CAMSERVE_DEFAULT_MODEL={settings.default_model!r} is not registered")
    return specs


def create_app(
    settings: Settings | None = None,
    worker_factory: WorkerFactory | None = None,
    specs: list[ModelSpec] | None = None,
    on_fatal: Callable[[str], None] | None = None,
    devices: Sequence[torch.device] | None = None,
) -> FastAPI:
    """The app; ``worker_factory`` swaps the torch workers for fakes in tests; ``specs``, from
    :func:`checked_specs`, spares the lifespan checking the weights a second time; ``on_fatal``
    is called with the reason when a device fails beyond repair (``python -m service`` exits);
    ``devices`` overrides ``CAMSERVE_DEVICE`` (one engine slot each)."""
    settings = settings or get_settings()
    # The batch-size histogram's buckets reach the largest batch any device here forms.
    metrics = Metrics(max(settings.batch_size_for(d.type) for d in devices) if devices
                      else settings.largest_batch_size())

    def job_finished(job: Job, seconds: float) -> None:
        for method in job.methods:
            metrics.job_duration.labels(method, job.status).observe(seconds)

    # Front-end processes (service.frontends) share their jobs through the supervisor's folder.
    frontend = frontends.current()
    store = JobStore(settings, on_finish=job_finished,
                     shared=SharedJobs(frontend.jobs_dir) if frontend is not None else None)
    metrics.bind_jobs(store.counts)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registered = specs if specs is not None else checked_specs(settings)
        engine = Engine(settings, registered, worker_factory, metrics, devices)
        engine.on_fatal = on_fatal
        metrics.bind_engine(lambda: engine.queue_depth, lambda: engine.in_flight)
        metrics.bind_names((spec.name for spec in registered), list(engine.methods))
        app.state.engine = engine
        app.state.jobs = store
        loading = asyncio.create_task(engine.start(), name="camserve-load")
        gauges = asyncio.create_task(metrics.refresh_forever(), name="camserve-gauges")
        try:
            yield
        finally:
            gauges.cancel()
            await loading
            store.stop_accepting()
            if engine.state != "stopped":  # a timed-out drain has stopped it already
                await engine.stop()  # drains: running jobs may finish within the drain timeout
            await store.close()  # the rest are marked cancelled

    app = FastAPI(
        title="camserve",
        version=__version__,
        summary="Image classification with Class Activation Map explanations",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served from the installed package instead of a CDN: service.api.routes.docs
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=docs.OAUTH_REDIRECT_URL,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    install_error_handlers(app)
    protected = [Depends(require_api_key)]
    app.include_router(inference.router, dependencies=protected)
    app.include_router(catalog.router, dependencies=protected)
    app.include_router(jobs.router, dependencies=protected)
    app.include_router(dicomweb.router, dependencies=protected)
    app.include_router(dicomweb_browse.router, dependencies=protected)
    app.state.pacs = Pacs(settings) if settings.dicomweb_url else None
    app.include_router(kserve.router, dependencies=protected)
    app.include_router(introspection.router, dependencies=protected)
    app.include_router(health.router)
    app.include_router(ui.router)
    app.include_router(docs.router)
    docs.with_file_pickers(app)
    app.add_middleware(dicomweb.JsonJobs)  # POST /jobs with a JSON body: a DICOMweb job
    app.add_middleware(DisconnectMiddleware)  # cancels the handler when its client has gone
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.max_upload_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # sees every response
    if settings.cors_origins:
        # Outermost, so a browser can read every answer, the middleware's own 413 and 500 too.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID", "X-Request-Timeout"],
            expose_headers=["X-Request-ID", "Retry-After", "Server-Timing"],
        )
    return app


def __getattr__(name: str) -> FastAPI:
    # ``service.main:app`` is built on first access, so importing this module stays cheap
    # and tests can build apps with their own settings.
    if name == "app":
        application = create_app()
        globals()["app"] = application
        return application
    raise AttributeError(name)
