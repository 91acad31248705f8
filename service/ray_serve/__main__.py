"""``python -m service.ray_serve [--port N] [--address RAY_ADDRESS]``: start or join a Ray cluster
and serve camserve on it until SIGTERM or SIGINT, then delete the application (its replicas
drain) and, when this process started the cluster, stop it."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path

try:
    import ray
    from ray import serve
except ImportError as exc:  # the optional extra
    raise SystemExit(f"Ray Serve is not installed ({exc}): pip install 'camserve[ray]'") from exc

from service.logs import configure_logging
from service.ray_serve import APP_NAME, build_app, read_serve_config

log = logging.getLogger("service.ray_serve")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m service.ray_serve",
        description="Serve camserve's HTTP contract through Ray Serve.",
    )
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface of Serve's HTTP proxy (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port of Serve's HTTP proxy (default 8000)")
    parser.add_argument("--address", default=None,
                        help="an existing Ray cluster (`auto`, or host:port of its head); "
                             "without it a local one is started and stopped with this process")
    parser.add_argument("--config", type=Path, default=None,
                        help="a Serve config file (deploy/serve_config.yaml) whose camserve application's "
                             "args and deployment options (replicas, autoscaling, resources) apply")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="CPUs of the local cluster (default: this machine's cores)")
    args = parser.parse_args(argv)
    configure_logging(logging.INFO)

    app_args = read_serve_config(args.config) if args.config else {}
    started_local = args.address is None
    if started_local:
        ray.init(num_cpus=args.num_cpus or os.cpu_count() or 2, include_dashboard=False,
                 object_store_memory=256 * 1024 * 1024, logging_level=logging.WARNING)
    else:
        ray.init(address=args.address, logging_level=logging.WARNING)

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(app_args), name=APP_NAME, route_prefix="/", blocking=False)
        log.info("serving", extra={"url": f"http://{args.host}:{args.port}", "ray_address": args.address
                                   or "local"})
        stop.wait()
        log.info("stopping: the replicas drain their work")
        serve.delete(APP_NAME)
        if started_local:
            serve.shutdown()
    finally:
        ray.shutdown()  # stops the local cluster's processes when this process started it


if __name__ == "__main__":
    main()
