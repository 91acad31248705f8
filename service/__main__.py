"""``python -m service [--host HOST] [--port PORT]``: run the server with uvicorn.

SIGTERM drains before it stops: ``/readyz`` turns 503 and new requests get 503 at once (so a
load balancer moves traffic away), queued and running work finishes (up to
``CAMSERVE_DRAIN_TIMEOUT_S``), then uvicorn closes the listener, lets every response in
progress go out, and the process exits 0. Work still running at the drain deadline is
answered with the JSON 503 error, the log says how many requests were cut short, and the
process still exits 0: with ``os._exit`` once the logs are flushed, since a worker thread may
still be inside torch, whose thread pools abort the process ("terminate called without an
active exception") when the interpreter's normal exit destroys them under it. A second
SIGTERM, or SIGINT, stops at once the usual uvicorn way.

Connections get the timeouts and the bound of :mod:`service.connections`. A models file or
setting that cannot be used stops start-up with one line saying why (exit status 1).

A fatal device error (a sticky CUDA error such as a device-side assert or an illegal memory
access, after which no kernel can run in this process) is answered 503 to every request
queued or running, turns ``/healthz`` and ``/readyz`` to 503, is logged with its reason, and
the process exits with status 70 (``EX_SOFTWARE``) once the answers have gone out, so that
the container's restart policy or the orchestrator brings up a fresh process.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import time
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn
from pydantic import ValidationError
from starlette.types import ASGIApp

import service.openmp  # noqa: F401  (before torch loads: see its docstring)
from service import frontends
from service.config import Settings, get_settings
from service.connections import ConnectionGuard, descriptor_bound, linger_bytes
from service.logs import configure_logging
from service.models.spec import ModelsFileError, ModelSpec, registered_specs
from service.shutdown import InFlight

if TYPE_CHECKING:  # torch comes with these: imported where a server runs, not in the supervisor
    from fastapi import FastAPI

    from service.engine.engine import Engine
    from service.engine.pool import WorkerFactory

log = logging.getLogger("service")

_ANSWERS_OUT_S = 5.0  # after a timed-out drain, time for the 503s and finished answers to go out
EXIT_DEVICE_FAILED = 70  # sysexits' EX_SOFTWARE: a device failed beyond repair; restart the process


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, in_flight: InFlight,
                 drain_timeout_s: float) -> None:
        super().__init__(config)
        self.app = app
        self.in_flight = in_flight
        self.drain_timeout_s = drain_timeout_s
        self.cut_short: int | None = None  # set when the drain deadline passed with work running
        self.device_failed: str | None = None  # set by a fatal device error: exit 70
        self.load_failed: str | None = None  # set when a front end's models failed to load: exit 1
        self.exit_on_failed_load = False  # a front end of several: see watch_load
        self._drain: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.exit_on_failed_load:
            self._watch = asyncio.get_running_loop().create_task(self.watch_load())

    async def watch_load(self) -> None:
        """One of several front ends whose models failed to load stops, and with it the
        service (the supervisor stops the others): alone it would answer ``/readyz`` 503 for
        ever beside ready ones, and a probe's answer would depend on the connection it used."""
        engine = self.app.state.engine
        await engine.wait_ready()
        if engine.state == "failed":
            self.load_failed = str(engine.failure)
            log.error("cannot start: the models failed to load: %s", self.load_failed)
            self.should_exit = True

    def fatal(self, reason: str) -> None:
        """The engine's ``on_fatal`` (on the event loop): stop serving, then exit 70."""
        if self.device_failed is None:
            self.device_failed = reason
            log.critical("exiting with status %d so that the process is restarted: %s",
                         EXIT_DEVICE_FAILED, reason, extra={"reason": reason})
        self.config.timeout_graceful_shutdown = int(_ANSWERS_OUT_S)  # the 503s are out already
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        engine = getattr(self.app.state, "engine", None)
        if sig != signal.SIGTERM or self._drain is not None or engine is None:
            super().handle_exit(sig, frame)
            return
        try:
            loop = asyncio.get_running_loop()  # the handler runs on the loop's thread
        except RuntimeError:
            super().handle_exit(sig, frame)
            return
        self._drain = loop.create_task(self._drain_then_exit())

    async def _drain_accepted(self, engine: Engine) -> bool:
        """Wait, within the drain timeout, until the engine's work is done and no request it
        admitted is still being handled (one still decoding submits its images afterwards,
        and that work is then waited for too)."""
        ends = time.monotonic() + self.drain_timeout_s
        while True:
            if not await engine.drain(max(0.0, ends - time.monotonic())):
                return False
            if not self.in_flight.admitted():
                return True
            if not await self.in_flight.wait_admitted_done(max(0.0, ends - time.monotonic())):
                return False

    async def _drain_then_exit(self) -> None:
        engine = self.app.state.engine
        log.info("SIGTERM: draining", extra={"timeout_s": self.drain_timeout_s})
        # No new jobs; jobs the drain cuts short end "cancelled", which closes their event streams.
        self.app.state.jobs.stop_accepting()
        if await self._drain_accepted(engine):
            log.info("drained; shutting down",
                     extra={"queue_depth": engine.queue_depth, "in_flight": engine.in_flight})
        else:
            self.in_flight.deadline_passed()
            queued, running = engine.queue_depth, engine.in_flight
            await engine.stop(drain_timeout_s=0)  # answers queued and running images with 503
            await self.in_flight.wait_idle(_ANSWERS_OUT_S)
            cut_short = self.cut_short = self.in_flight.cut_short()
            # What is still running now gets the JSON 503 when uvicorn cancels it (InFlight).
            self.config.timeout_graceful_shutdown = int(_ANSWERS_OUT_S)
            log.warning("drain timed out: %d requests cut short (answered 503); shutting down",
                        cut_short, extra={"cut_short": cut_short, "queued_images": queued,
                                          "running_images": running})
        self.should_exit = True


def _usable_settings(weights: bool = True) -> tuple[Settings, list[ModelSpec]]:
    """The settings and the checked models, or one log line and exit status 1. ``weights=False``
    (the supervisor of several front ends, which never loads torch): the models file is read
    but the weights are left to the front ends, and no models are returned."""
    refused: tuple[type[Exception], ...] = (ModelsFileError, RuntimeError)
    try:
        settings = get_settings()
        if not weights:
            if settings.default_model not in registered_specs(settings.models_file):
                raise RuntimeError(f"CAMSERVE_DEFAULT_MODEL={settings.default_model!r} is not registered")
            return settings, []
        from service.main import checked_specs
        from service.models.loader import ModelLoadError

        refused = (*refused, ModelLoadError)
        return settings, checked_specs(settings)
    except ValidationError as exc:
        problems = "; ".join(f"CAMSERVE_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}"
                             for e in exc.errors())
        reason = f"invalid settings: {problems}"
    except refused as exc:
        reason = str(exc)
    log.error("cannot start: %s", reason)
    raise SystemExit(1)


def _port_free_or_exit(host: str, port: int) -> None:
    """One line and exit status 1 when ``host:port`` cannot be listened on (taken, or not an
    address of this machine), before minutes of model loading, not after them."""
    try:
        socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET).close()
    except OSError as exc:
        log.error("cannot start: cannot listen on %s:%d: %s", host, port, exc.strerror or exc)
        raise SystemExit(1) from None


def _exit_now(status: int) -> None:
    """Exit without the interpreter's teardown (see the module docstring), logs flushed first."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)


def main(argv: list[str] | None = None, worker_factory: WorkerFactory | None = None) -> None:
    """Run the server; ``worker_factory`` replaces the torch workers (tests of the exit paths)."""
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="front-end processes (default CAMSERVE_WORKERS; 0: the cores)")
    args = parser.parse_args(argv)
    configure_logging(getattr(logging, args.log_level.upper()))
    if args.workers is not None and args.workers < 0:
        parser.error("--workers must be 0 (the cores) or more")
    frontend = frontends.current()
    if frontend is None:
        settings, _ = _usable_settings(weights=False)
        workers = frontends.worker_count(settings.workers if args.workers is None else args.workers)
        if workers > 1:
            child_argv = ["--host", args.host, "--port", str(args.port), "--log-level", args.log_level]
            _exit_now(frontends.supervise(args.host, args.port, workers, child_argv))
        _port_free_or_exit(args.host, args.port)  # as the supervisor does, before the models load
    else:
        for handler in logging.getLogger().handlers:
            handler.addFilter(frontends.LogField(frontend.index))
        frontends.watch_parent(lambda: os.kill(os.getpid(), signal.SIGTERM))
        frontends.arrive(frontend)
    settings, specs = _usable_settings()
    from service.main import create_app  # torch: only where a server runs
    # The engine calls back on a fatal device error; the server is built below.
    app = create_app(settings, worker_factory, specs=specs, on_fatal=lambda reason: server.fatal(reason))
    served: ASGIApp = app
    if frontend is not None:
        served = frontends.Tagged(app, frontend.index)
        if frontend.index > 0:  # listens once its models are loaded (service.frontends)
            served = frontends.JoinWhenReady(served, lambda: app.state.engine.wait_ready(),
                                             lambda: server.should_exit)
    in_flight = InFlight(served)
    # Each of N front ends takes its share of the bound.
    asked = settings.max_connections
    if frontend is not None:
        asked = max(1, asked // frontend.count)
    max_connections = descriptor_bound(asked)
    if max_connections < asked:
        log.warning("CAMSERVE_MAX_CONNECTIONS lowered to what the descriptor limit allows",
                    extra={"asked": asked, "max_connections": max_connections})
    guard = ConnectionGuard(settings.client_timeout_s, max_connections,
                            linger_bytes(settings.max_upload_bytes))
    config = uvicorn.Config(
        in_flight,
        host=args.host,
        port=args.port,
        http=guard.protocol(),
        log_config=None,
        access_log=False,
        # Responses already computed when the drain ends still need time to go out.
        timeout_graceful_shutdown=max(5, int(settings.drain_timeout_s)),
    )
    server = DrainingServer(config, app, in_flight, settings.drain_timeout_s)
    server.exit_on_failed_load = frontend is not None
    if frontend is None:
        server.run()
    else:  # the supervisor's socket, already listening (service.frontends)
        server.run(sockets=[socket.socket(fileno=frontend.fd)])
        frontends.leave(frontend)
    if server.device_failed is not None:
        _exit_now(EXIT_DEVICE_FAILED)
    if server.load_failed is not None:
        _exit_now(1)
    if server.cut_short is not None:
        _exit_now(0)


if __name__ == "__main__":
    main()
