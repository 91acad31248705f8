"""Sweep ``POST /explain`` per method over concurrency levels and arrival rates; write the report.

Fixed concurrency (closed loop): N Locust users per method, all started at once, each sending its
next request as soon as the previous one is answered, for ``--duration`` seconds. Requests that are
in flight when the time is up are waited for and counted.

Fixed request rate (open loop, like perf_analyzer's request-rate mode): requests are sent at
``--rate`` per second whatever the responses, each on its own greenlet, and latency counts from the
time a request was due, so a server that falls behind shows its queueing in the percentiles
instead of slowing the client down. In-flight requests are capped by ``--max-inflight``; a request
due while the cap is reached is counted as a failure.
"""

from __future__ import annotations

import locust  # noqa: F401  (first: Locust monkey-patches the standard library for gevent)

# isort: split
import argparse
import json
import logging
import math
import os
import random
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

import gevent
from gevent.pool import Pool
from locust.env import Environment

from loadtests.locustfile import (
    DEFAULT_IMAGES,
    ExplainUser,
    Image,
    Recorder,
    Sample,
    load_images,
    user_class_for,
)
from loadtests.report import (
    Row,
    describe_machine,
    markdown_table,
    summarise,
    write_csv,
    write_markdown,
    write_plot,
)
from loadtests.server import (
    MethodInfo,
    ServiceError,
    StartedService,
    UsageError,
    choose_methods,
    server_facts,
    server_methods,
    wait_ready,
)
from service.progress import tracked

DEFAULT_CONCURRENCY = "1,4,16,64"
MAX_SAMPLES_PER_CELL = 200_000


def _ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"concurrency levels must be >= 1, got {text!r}")
    return values


def _floats(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if any(not v > 0 or math.isinf(v) for v in values):
        raise argparse.ArgumentTypeError(f"rates must be > 0 requests/s, got {text!r}")
    return values


def _form_field(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    if key.strip() in ("methods", "file", "method_params"):
        raise argparse.ArgumentTypeError(f"{key.strip()!r} is set by the runner")
    return key.strip(), value


def _method_params(text: str) -> dict[str, dict[str, object]]:
    try:
        value = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--method-params is not JSON: {exc}") from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise argparse.ArgumentTypeError(
            "--method-params must be a JSON object of objects, keyed by method name"
        )
    return {str(k).lower(): v for k, v in value.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--url", help="base URL of a running service (default http://127.0.0.1:8000)")
    target.add_argument(
        "--start", action="store_true",
        help="start `python -m service` on a free 127.0.0.1 port, wait for /readyz, stop it after "
        "(it inherits CAMSERVE_* settings from this environment)",
    )
    parser.add_argument(
        "--methods", default="all",
        help="comma-separated CAM methods, checked against GET /methods; 'all' (default) for every one",
    )
    parser.add_argument(
        "--concurrency", type=_ints, default=None,
        help=f"comma-separated numbers of concurrent clients (default {DEFAULT_CONCURRENCY} "
        "unless --rate is given)",
    )
    parser.add_argument(
        "--rate", type=_floats, default=[],
        help="comma-separated arrival rates in requests/s for the open-loop mode (e.g. 2,5)",
    )
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per cell (default 30)")
    parser.add_argument(
        "--heavy-concurrency", type=_ints, default=None,
        help="concurrency levels for heavy methods: the perturbation family (scorecam, ablationcam...) "
        "and any whose passes in GET /methods grow per channel or per noisy copy "
        "(smoothgradcampp) (default: --concurrency)",
    )
    parser.add_argument(
        "--heavy-rate", type=_floats, default=None,
        help="arrival rates for heavy methods (default: --rate)",
    )
    parser.add_argument("--no-heavy-rate", action="store_true", help="no open-loop cells for heavy methods")
    parser.add_argument("--heavy-duration", type=float, default=None, help="seconds per heavy-method cell")
    parser.add_argument("--out", type=Path, default=Path("build/loadtest"), help="output folder")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of images to send")
    parser.add_argument(
        "--api-key", default=os.environ.get("CAMSERVE_API_KEY") or None,
        help="sent as 'Authorization: Bearer KEY' (default $CAMSERVE_API_KEY)",
    )
    parser.add_argument(
        "--form", type=_form_field, action="append", default=[], metavar="KEY=VALUE",
        help="extra /explain form field, repeatable (e.g. --form outputs=overlay --form model=resnet50)",
    )
    parser.add_argument(
        "--method-params", type=_method_params, default={}, metavar="JSON",
        help="per-method parameters as a JSON object keyed by method name, e.g. "
        "'{\"scorecam\": {\"top_k_channels\": 256}}'; each method's requests carry its own entry "
        "as the method_params form field (methods not measured are ignored)",
    )
    parser.add_argument(
        "--warmup", type=int, default=2, help="unmeasured requests per method before its cells (default 2)"
    )
    parser.add_argument(
        "--deadline", type=float, default=None,
        help="server-side deadline per request, seconds, sent as X-Request-Timeout (default: the "
        "server's, 30 s unless configured)",
    )
    parser.add_argument(
        "--timeout", type=float, default=None,
        help="client timeout per request, seconds (default: --deadline + 30, or 120)",
    )
    parser.add_argument(
        "--max-inflight", type=int, default=256, help="open loop: cap on requests in flight (default 256)"
    )
    parser.add_argument(
        "--arrival", choices=("constant", "poisson"), default="constant",
        help="open loop: evenly spaced arrivals, or a Poisson process (seeded)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for Poisson arrivals")
    parser.add_argument(
        "--start-timeout", type=float, default=180.0, help="--start: seconds to wait for /readyz"
    )
    return parser


# --- the two modes --------------------------------------------------------------------------------


def run_closed(user_class: type[ExplainUser], url: str, concurrency: int, duration: float,
               recorder: Recorder, stop_timeout: float) -> tuple[list[Sample], float, list[str]]:
    """``concurrency`` users back to back for ``duration`` seconds; the samples and the cell's span."""
    env = Environment(user_classes=[user_class], host=url, stop_timeout=stop_timeout)
    runner = env.create_local_runner()
    try:
        # At spawn_rate == concurrency Locust starts every user in its first dispatch step.
        started = time.perf_counter()
        runner.start(concurrency, spawn_rate=concurrency)
        gevent.sleep(duration)
        ended = time.perf_counter()
        runner.stop()  # graceful: users finish the request they have in flight
    finally:
        runner.quit()
    problems = [f"{e['msg']} (×{e['count']})" for e in runner.exceptions.values()]
    window = [s for s in recorder.samples if started <= s.sent < ended]
    # The cell lasts until its last counted response: requests in flight at the end are awaited.
    last = max((s.intended + s.latency_ms / 1000 for s in window), default=ended)
    return window, max(ended, last) - started, problems


def run_open(user_class: type[ExplainUser], url: str, rate: float, duration: float,
             recorder: Recorder, max_inflight: int, arrival: str, seed: int,
             drain_timeout: float) -> tuple[list[Sample], float]:
    """Send at ``rate`` per second for ``duration`` seconds, whatever the responses."""
    env = Environment(user_classes=[user_class], host=url)
    user = user_class(env)
    pool = Pool(max_inflight)
    rng = random.Random(seed)
    planned = min(MAX_SAMPLES_PER_CELL, math.ceil(rate * duration) + 1)
    start = time.perf_counter() + 0.05
    end = start + duration
    due = start
    sent = 0
    while due < end and sent < planned:
        delay = due - time.perf_counter()
        if delay > 0:
            gevent.sleep(delay)
        if pool.full():
            recorder.add(Sample(user_class.method, due, due, 0.0, False, 0,
                                f"client: {max_inflight} requests already in flight (--max-inflight)"))
        else:
            pool.spawn(user.send, due)
        sent += 1
        due += rng.expovariate(rate) if arrival == "poisson" else 1.0 / rate
    pool.join(timeout=drain_timeout)
    pool.kill(block=True, timeout=10)
    finished = time.perf_counter()
    for _ in range(sent - len(recorder.samples)):
        recorder.add(Sample(user_class.method, end, end, math.nan, False, 0,
                            f"client: no response within {drain_timeout:g} s after the last send"))
    return list(recorder.samples), max(duration, finished - start)


# --- the sweep ------------------------------------------------------------------------------------


# Warm-up answers that no other method would get past either: stop the whole run on these.
FATAL_STATUSES = (0, 401, 403, 404)


class SkipMethod(Exception):
    """A method whose warm-up failed for a reason of its own (e.g. a deadline): sweep the others."""


def _warm_up(user_class: type[ExplainUser], url: str, count: int) -> None:
    if count <= 0:
        return
    user = user_class(Environment(user_classes=[user_class], host=url))
    for _ in range(count):
        sample = user.send()
        if not sample.ok:
            message = f"warm-up request for {user_class.method!r} failed: {sample.error}"
            if sample.status in FATAL_STATUSES:
                raise ServiceError(message)
            raise SkipMethod(message)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def sweep(args: argparse.Namespace, url: str, images: list[Image],
          methods: Sequence[MethodInfo]) -> tuple[list[Row], list[str], list[str]]:
    concurrency = args.concurrency if args.concurrency is not None else (
        [] if args.rate else _ints(DEFAULT_CONCURRENCY)
    )
    # The user classes add Authorization themselves, from args.api_key.
    headers = {"X-Request-Timeout": f"{args.deadline:g}"} if args.deadline else {}
    rows: list[Row] = []
    notes: list[str] = []
    skipped: list[str] = []
    # Light methods first: a heavy request the server is still computing cannot delay their cells.
    ordered = sorted(methods, key=lambda m: m.heavy)
    for method in tracked(ordered, len(ordered), "load test", label=lambda m: m.name):
        levels = concurrency
        if method.heavy and args.heavy_concurrency is not None:
            levels = args.heavy_concurrency
        rates = args.rate
        if method.heavy:
            rates = [] if args.no_heavy_rate else (args.heavy_rate if args.heavy_rate is not None else rates)
        duration = args.heavy_duration if method.heavy and args.heavy_duration else args.duration
        if method.heavy and (levels != concurrency or rates != args.rate or duration != args.duration):
            notes.append(
                f"{method.name} is a heavy method ({method.family}: {method.passes}), measured at "
                f"concurrency {','.join(map(str, levels)) or 'none'}"
                + (f" and {','.join(f'{r:g}' for r in rates)} rps" if rates else "")
                + f", {duration:g} s per cell."
            )
        form = dict(args.form)
        if method.name in args.method_params:
            form["method_params"] = json.dumps({method.name: args.method_params[method.name]})
        warm = user_class_for(method.name, images, form, args.api_key, timeout=args.timeout, host=url,
                              headers=headers)
        warmup = min(args.warmup, 1) if method.heavy else args.warmup
        _log(f"[{method.name}] warm-up: {warmup} request(s)")
        try:
            _warm_up(warm, url, warmup)
        except SkipMethod as exc:
            skipped.append(f"{method.name} not measured: {exc}")
            _log(f"[{method.name}] skipped: {exc}")
            continue
        for level in levels:
            recorder = Recorder(MAX_SAMPLES_PER_CELL)
            cls = user_class_for(method.name, images, form, args.api_key, recorder, args.timeout,
                                 host=url, headers=headers)
            samples, window, problems = run_closed(cls, url, level, duration, recorder, args.timeout + 5)
            for problem in problems:
                notes.append(f"{method.name} at concurrency {level}: client exception {problem}")
            rows.append(summarise(method.name, "closed", level, window, _outcomes(samples)))
            _log(f"[{method.name}] concurrency {level}: {_brief(rows[-1])}")
        for rate in rates:
            recorder = Recorder(MAX_SAMPLES_PER_CELL)
            cls = user_class_for(method.name, images, form, args.api_key, recorder, args.timeout,
                                 connections=args.max_inflight, host=url, headers=headers)
            samples, window = run_open(cls, url, rate, duration, recorder, args.max_inflight,
                                       args.arrival, args.seed, args.timeout + 5)
            rows.append(summarise(method.name, "open", rate, window, _outcomes(samples)))
            _log(f"[{method.name}] {rate:g} requests/s: {_brief(rows[-1])}")
    return rows, notes, skipped


def _outcomes(samples: Sequence[Sample]) -> list[tuple[bool, float, str, dict[str, float] | None]]:
    return [(s.ok, s.latency_ms, s.error, s.timing) for s in samples]


def _brief(row: Row) -> str:
    return (f"{row.requests} requests, {row.failures} failures, {row.rps:.2f} rps, "
            f"p50 {row.percentiles_ms[50]:.1f} ms, p99 {row.percentiles_ms[99]:.1f} ms")


def _load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except (AttributeError, OSError):
        return ""


def _is_local(url: str) -> bool:
    return (urlsplit(url).hostname or "") in ("127.0.0.1", "localhost", "::1")


def run(args: argparse.Namespace, url: str, local: bool) -> int:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    images = load_images(args.images)
    if not local:
        wait_ready(url, 10.0, headers)
    methods = choose_methods(args.methods, server_methods(url, headers), url)
    model = dict(args.form).get("model")
    facts = server_facts(url, headers, model, local or _is_local(url))
    args.out.mkdir(parents=True, exist_ok=True)
    load_before = _load_average()
    rows, notes, skipped = sweep(args, url, images, methods)
    notes = skipped + notes

    settings = {
        "command": "python -m loadtests " + shlex.join(sys.argv[1:]),
        "seconds per cell": f"{args.duration:g}"
        + (f" ({args.heavy_duration:g} for heavy methods)" if args.heavy_duration else ""),
        "images": f"{len(images)} from {args.images} ({', '.join(i.name for i in images)})",
        "form fields": ", ".join(f"{k}={v}" for k, v in args.form) or "API defaults",
        "method parameters": json.dumps(args.method_params) if args.method_params else "defaults",
        "open-loop arrivals": args.arrival if args.rate else "not run",
        "server settings": (", ".join(
            f"{k}={v}" for k, v in sorted(os.environ.items())
            if k.startswith("CAMSERVE_") and k != "CAMSERVE_API_KEY"
        ) or "defaults") if local else "those of the deployment",
    }
    machine = describe_machine(facts)
    if load_before and (load_after := _load_average()):
        # Anything above the core count means other work competed with the service for the CPU.
        machine["load average (1 min)"] = f"{load_before} before the sweep, {load_after} after"
    write_csv(rows, args.out / "results.csv")
    write_plot(rows, args.out / "latency.png",
               f"POST /explain latency — {facts['model']} on {facts['device'].split(' ')[0]}"
               + (f" ({facts['GPU']})" if facts.get("GPU") else f" — {machine['CPU']}"))
    write_markdown(rows, machine, settings, notes, args.out / "report.md", "latency.png")
    print(markdown_table(rows))
    failed = sum(r.failures for r in rows)
    _log(f"wrote {args.out}/results.csv, report.md and latency.png"
         + (f"; {failed} request(s) failed, see report.md" if failed else ""))
    for line in skipped:
        _log(f"error: {line}")
    return 1 if skipped else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.duration <= 0 or (args.heavy_duration is not None and args.heavy_duration <= 0):
        parser.error("durations must be > 0 seconds")
    if args.max_inflight < 1:
        parser.error("--max-inflight must be >= 1")
    if args.deadline is not None and not 0 < args.deadline <= 3600:
        parser.error("--deadline must lie in (0, 3600] seconds")
    if args.timeout is None:
        args.timeout = args.deadline + 30 if args.deadline else 120.0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.start:
            args.out.mkdir(parents=True, exist_ok=True)
            _log("starting the service...")
            with StartedService(args.out / "server.log", args.start_timeout, api_key=args.api_key) as url:
                _log(f"service ready at {url}")
                return run(args, url, local=True)
        return run(args, (args.url or "http://127.0.0.1:8000").rstrip("/"), local=False)
    except (UsageError, ServiceError, ValueError) as exc:
        _log(f"error: {exc}")
        return 2
