"""Several front-end processes: ``python -m service --workers N`` (``CAMSERVE_WORKERS``).

One Python process decodes, renders and serialises under one GIL, which caps it at a few
hundred requests a second whatever the device could compute. With ``N > 1`` the command
becomes a small **supervisor** of ``N`` complete server processes (front ends), each with its
own engine and model copies, serving the same port:

- The supervisor binds ``N`` sockets to the port with ``SO_REUSEPORT`` (after checking with a
  plain bind that no other server listens there) and hands one to each front end (inherited
  descriptor); the kernel spreads new connections over the listening ones by their addresses.
  One shared socket would let the first process to wake take a whole burst of connections
  (asyncio accepts up to 100 per wake-up), and keep-alive clients would then stay on it.
- The first socket listens at once (front end 0 serves it as a single server does:
  ``/healthz`` answers while the models load, ``/readyz`` says 503 until they are ready); the
  other front ends listen only once their models are loaded (:class:`JoinWhenReady`), so no
  connection reaches a process still loading while another is ready. Each answers
  ``/healthz`` and ``/readyz`` for itself: a probe sees the process its connection reached.
- Each front end gets ``cores / N`` torch and decode threads (unless ``CAMSERVE_TORCH_THREADS``
  or ``CAMSERVE_DECODE_THREADS`` is set) and ``CAMSERVE_MAX_CONNECTIONS / N`` connections.
- A temporary folder, removed at exit, holds what the front ends share: prometheus-client's
  multiprocess files (``PROMETHEUS_MULTIPROC_DIR``: ``/metrics`` from any front end sums
  them) and the jobs (:mod:`service.api.sharedjobs`), so a job is seen, followed and cancelled
  from whichever process a request lands on.
- SIGTERM (or SIGINT) is forwarded to every front end, which drains as a single server does
  (a second one stops at once, as there); the supervisor exits 0 when they all exited 0.
- A front end that exits on its own (status 70 after a fatal device error, a crash, a kill)
  stops the others (SIGTERM: they drain) and the supervisor exits 70, or 1 for any other
  failure: the whole service is restarted by its container policy or orchestrator, as one
  process is, rather than a supervisor restarting a front end behind the orchestrator's back.
- Front ends watch their parent: when the supervisor is killed they drain and exit too, and
  the last one out removes the shared folder (:func:`leave`).
- Each front end batches its own requests: with ``N`` of them on one GPU, ``N`` CUDA contexts
  take turns on it with batches up to ``CAMSERVE_MAX_BATCH_SIZE`` each (a device-owner process
  fed by all would batch across them, at the price of moving images between processes).

``N = 1`` (and ``CAMSERVE_WORKERS=1``) is the single process, exactly as before. The default,
0, takes the cores the process may use (CPU affinity and the cgroup's CPU quota), at most
:data:`MAX_AUTO_WORKERS`.

Nothing here imports torch or the HTTP layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.sharedjobs import process_alive

log = logging.getLogger("service.frontends")

ENV = "_CAMSERVE_FRONTEND"  # set by the supervisor in each front end's environment
MAX_AUTO_WORKERS = 8  # the automatic count's cap: each front end holds its own model copies
EXIT_DEVICE_FAILED = 70
EXIT_FAILED = 1
_PARENT_POLL_S = 1.0


@dataclass(frozen=True)
class FrontEnd:
    """What a front-end process knows of its place: set by the supervisor."""

    index: int
    count: int
    fd: int  # the inherited listening socket
    shared: Path  # the supervisor's folder
    supervisor: int  # its pid

    @property
    def jobs_dir(self) -> Path:
        return self.shared / "jobs"


def current() -> FrontEnd | None:
    """This process's place among the front ends, or None when it serves alone."""
    raw = os.environ.get(ENV)
    if not raw:
        return None
    data = json.loads(raw)
    return FrontEnd(int(data["index"]), int(data["count"]), int(data["fd"]), Path(data["shared"]),
                    int(data.get("supervisor", os.getppid())))


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, lowered to the cgroup's CPU quota
    (``docker run --cpus 2`` sets a quota, not an affinity)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def _cgroup_quota() -> float | None:
    """CPUs allowed by the cgroup (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), None if unbounded."""
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    with contextlib.suppress(OSError, ValueError):
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    return None


def worker_count(asked: int) -> int:
    """``asked`` front ends, or for 0 the usable cores (at most :data:`MAX_AUTO_WORKERS`)."""
    return asked if asked > 0 else min(usable_cores(), MAX_AUTO_WORKERS)


def watch_parent(on_orphaned: Callable[[], None]) -> None:
    """Call ``on_orphaned`` (from a daemon thread) once the supervisor has gone."""
    parent = os.getppid()

    def watch() -> None:
        pause = threading.Event()
        while os.getppid() == parent:
            pause.wait(_PARENT_POLL_S)
        log.warning("the supervisor has gone; stopping")
        on_orphaned()

    threading.Thread(target=watch, name="camserve-parent-watch", daemon=True).start()


def arrive(frontend: FrontEnd) -> None:
    """Mark this front end present in the shared folder (see :func:`leave`)."""
    present = frontend.shared / "present"
    present.mkdir(exist_ok=True)
    (present / str(os.getpid())).touch()


def leave(frontend: FrontEnd) -> None:
    """A front end stops. If its supervisor has gone (killed: it cannot remove its folder), the
    last front end out removes the shared folder, so that no killed supervisor leaves one behind
    in the temporary directory. The lock makes "last" exact: each one unmarks itself under it."""
    if os.getppid() != frontend.supervisor:
        with contextlib.suppress(OSError), (frontend.shared / ".present.lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            present = frontend.shared / "present"
            with contextlib.suppress(FileNotFoundError):
                (present / str(os.getpid())).unlink()
            others = [int(p.name) for p in present.iterdir() if p.name.isdigit()]
            if not any(process_alive(pid) for pid in others):
                log.info("the supervisor has gone; the last front end removes the shared folder")
                shutil.rmtree(frontend.shared, ignore_errors=True)


def _listeners(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` sockets bound to one port with ``SO_REUSEPORT``: the first listening (so that no
    other server can take the port from here on), the others not yet (each front end listens
    when it serves). The port is first bound plainly, which fails if any other server listens
    there (with ``SO_REUSEPORT`` alone, a second camserve would silently share it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        port = probe.getsockname()[1]  # port 0: the one the system chose
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.set_inheritable(True)
            if not sockets[1:]:
                sock.listen(2048)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _child_command(argv: list[str]) -> list[str]:
    """The command that started this process, as ``python -m <module> argv``: the front ends
    run the same entry point (``service``, or a test's wrapper with fake workers)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    module = spec.name if spec is not None else "service"
    if module.endswith(".__main__"):
        module = module.rpartition(".")[0]
    return [sys.executable, "-m", module, *argv]


def _child_env(index: int, count: int, fd: int, shared: Path) -> dict[str, str]:
    env = dict(os.environ)
    env[ENV] = json.dumps({"index": index, "count": count, "fd": fd, "shared": str(shared),
                           "supervisor": os.getpid()})
    env["PROMETHEUS_MULTIPROC_DIR"] = str(shared / "metrics")
    share = str(max(1, usable_cores() // count))
    for name in ("CAMSERVE_TORCH_THREADS", "CAMSERVE_DECODE_THREADS"):
        if env.get(name, "0").strip() in ("", "0"):
            env[name] = share
    return env


def supervise(host: str, port: int, count: int, argv: list[str]) -> int:
    """Run ``count`` front ends on ``host:port`` until they have all exited; the exit status
    (module docstring). ``argv``: the front ends' command-line arguments."""
    try:
        sockets = _listeners(host, port, count)
    except OSError as exc:
        log.error("cannot start: cannot listen on %s:%d: %s", host, port, exc.strerror or exc)
        return EXIT_FAILED
    port = sockets[0].getsockname()[1]
    shared = Path(tempfile.mkdtemp(prefix="camserve-frontends-"))
    (shared / "metrics").mkdir()
    (shared / "jobs").mkdir()
    children: dict[int, tuple[int, subprocess.Popen[bytes]]] = {}
    stopping = False
    status = 0

    alive: set[int] = set()  # reaped by os.wait() below, never by Popen.poll()
    forwarded: set[int] = set()  # the signals sent to the front ends

    def stop_all(sig: int) -> None:
        forwarded.add(sig)
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def on_signal(sig: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        log.info("%s: stopping %d front ends", signal.Signals(sig).name, len(children))
        stop_all(sig)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for index, sock in enumerate(sockets):
            fd = sock.fileno()
            # A process group of its own: a terminal's Ctrl-C reaches the supervisor only, which
            # forwards it once (twice would make uvicorn stop at once instead of draining).
            child = subprocess.Popen(_child_command(argv), env=_child_env(index, count, fd, shared),
                                     pass_fds=(fd,), process_group=0)
            children[child.pid] = (index, child)
            alive.add(child.pid)
        for sock in sockets:
            sock.close()  # the front ends hold them now
        if stopping:  # a signal came while they were being started: the last ones missed it
            stop_all(signal.SIGTERM)
        log.info("serving with %d front ends", count, extra={
            "host": host, "port": port, "front_ends": [c.pid for _, c in children.values()]})
        while alive:
            try:
                pid, wait_status = os.wait()
            except ChildProcessError:
                break
            if pid not in alive:
                continue
            alive.discard(pid)
            index, child = children[pid]
            code = os.waitstatus_to_exitcode(wait_status)
            child.returncode = code
            _forget_metrics(pid, shared)
            # A front end still starting (importing torch, before its server handles signals)
            # dies of the SIGTERM it was sent: it stopped as asked, as one draining exits 0.
            if stopping and (code == 0 or -code in forwarded):
                continue
            reason = f"front end {index} (pid {pid}) exited with status {code}"
            if code != 0:
                new = EXIT_DEVICE_FAILED if code == EXIT_DEVICE_FAILED else EXIT_FAILED
                status = status if status == EXIT_DEVICE_FAILED else new
            if not stopping:
                stopping = True
                log.error("%s; stopping the others", reason,
                          extra={"front_end": index, "pid": pid, "status": code})
                stop_all(signal.SIGTERM)
            else:
                log.warning(reason, extra={"front_end": index, "pid": pid, "status": code})
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for pid in alive:  # only if the supervisor itself failed
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        shutil.rmtree(shared, ignore_errors=True)
    if status:
        log.critical("exiting with status %d", status, extra={"status": status})
    else:
        log.info("every front end exited cleanly")
    return status


def _forget_metrics(pid: int, shared: Path) -> None:
    """Remove a gone process's live gauges (its counters stay: totals never go back)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(shared / "metrics"))


class LogField(logging.Filter):
    """Adds ``front_end: <index>`` to every log record of a front end."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.front_end = self.index
        return True


class Tagged:
    """ASGI wrapper of a front end: every response names the front end that served it
    (``X-Camserve-Frontend: <index>``), so a client or test can tell the processes apart."""

    def __init__(self, app: ASGIApp, index: int) -> None:
        self.app = app
        self.header = (b"x-camserve-frontend", str(index).encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), self.header]}
            await send(message)

        await self.app(scope, receive, tagged)


class JoinWhenReady:
    """ASGI wrapper of front ends 1..N-1: the lifespan's start-up completes (so uvicorn starts
    listening) only once ``ready()`` returns, when the models are loaded (or failed to), or
    once ``stopping()`` holds (a SIGTERM while loading is not kept waiting for the load)."""

    def __init__(self, app: ASGIApp, ready: Callable[[], Awaitable[None]],
                 stopping: Callable[[], bool]) -> None:
        self.app = app
        self.ready = ready
        self.stopping = stopping

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_when_ready(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                await self._ready_or_stopping()
            await send(message)

        await self.app(scope, receive, send_when_ready)

    async def _ready_or_stopping(self) -> None:
        ready = asyncio.ensure_future(self.ready())
        try:
            while not self.stopping():
                done, _ = await asyncio.wait([ready], timeout=_PARENT_POLL_S / 10)
                if done:
                    return
        finally:
            ready.cancel()
