"""``python -m service [--host HOST] [--port PORT]``: run the server with uvicorn.

SIGTERM drains before it stops: ``/readyz`` turns 503 and new requests get 503 at once (so a
load balancer moves traffic away), queued and running work finishes (up to
``CAMSERVE_DRAIN_TIMEOUT_S``), then uvicorn closes the listener, lets every response in
progress go out, and the process exits 0. A second SIGTERM, or SIGINT, stops at once the
usual uvicorn way.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from types import FrameType

import uvicorn
from fastapi import FastAPI

import service.openmp  # noqa: F401  (before torch loads: see its docstring)
from service.config import get_settings
from service.logs import configure_logging
from service.main import create_app

log = logging.getLogger("service")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.app = app
        self.drain_timeout_s = drain_timeout_s
        self._drain: asyncio.Task[None] | None = None

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

    async def _drain_then_exit(self) -> None:
        engine = self.app.state.engine
        log.info("SIGTERM: draining", extra={"timeout_s": self.drain_timeout_s})
        drained = await engine.drain(self.drain_timeout_s)
        log.info("drained; shutting down" if drained else "drain timed out; shutting down",
                 extra={"queue_depth": engine.queue_depth, "in_flight": engine.in_flight})
        self.should_exit = True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    configure_logging(getattr(logging, args.log_level.upper()))
    settings = get_settings()
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_config=None,
        access_log=False,
        # Responses already computed when the drain ends still need time to go out.
        timeout_graceful_shutdown=max(5, int(settings.drain_timeout_s)),
    )
    DrainingServer(config, app, settings.drain_timeout_s).run()


if __name__ == "__main__":
    main()
