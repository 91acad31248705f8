"""``python -m loadtests.bench_serving``: throughput and latency of /explain, printed, never asserted.

Runs each configuration as its own server process on a free port:

- ``batched``: ``python -m service`` as configured (``CAMSERVE_MAX_BATCH_SIZE=8``, 5 ms window);
- ``unbatched``: the same with ``CAMSERVE_MAX_BATCH_SIZE=1``;
- ``baseline``: the service a user writes today: FastAPI, one global model, TorchCAM's Grad-CAM
  under a lock, the same response content (top-5 predictions, the 224x224 mask as lists, the
  overlay PNG), the endpoint returning a dict with no response model, as FastAPI's tutorials
  and TorchCAM's examples write it. FastAPI then runs the body through ``jsonable_encoder``,
  which walks the 50,176 mask floats in Python (about 150 ms a response). Served by
  ``python -m loadtests.bench_serving --serve-baseline``.
- ``baseline-typed``: the same with ``response_model=dict[str, Any]`` (as a ``-> dict[str, Any]``
  return annotation would also declare), which makes FastAPI serialise with pydantic-core
  instead (about 10 ms): that service tuned by one line.
- ``batched@REV`` (``--baseline-rev REV``): the batched server of an older commit, from
  ``git archive REV``, so a change's effect is measured against its old code in the same run.
Both baselines run with OpenMP's default spinning; camserve sets its own (service.openmp).

All servers are started first and measured in turns: ``--rounds`` rounds, each giving every
server ``--duration / --rounds`` seconds of ``--concurrency`` clients (16) posting
``tests/data/chelsea.png`` with Grad-CAM, after 5 s of unrecorded load per server. Measuring in
turns spreads whatever else the machine is doing over every configuration alike. The report
gives requests/s, p50/p99, the mean batch size, the CPU milliseconds per request of the
server process, of its host work (the server's CPU outside the worker's torch threads:
HTTP, decoding, rendering, JSON; servers start through loadtests/named_threads.py so their
threads can be told apart in /proc) and of the load client (getrusage; ``--client httpx,raw``
measures every server with httpx and with loadtests.rawload in turn), and the ratios, then the
server's own split of a request from its ``Server-Timing`` header (decode, queue, compute,
render: overlay blend, PNG and mask arrays; json: serialising the body; other: multipart
parsing and waiting for the event loop), then the client's share (the round trip minus the
server's total: sending, receiving and parsing in httpx). A last table times the stages in this process,
and mobilenet_v2's forward pass (as torchvision builds it, and with batch norm folded as the
worker runs it) alone and per image in a batch of 8: the machine's own speed.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from fastapi import FastAPI, File, UploadFile  # module level: the baseline's annotations resolve here

REPO = Path(__file__).resolve().parent.parent
IMAGE = REPO / "tests" / "data" / "chelsea.png"
WARM_UP_S = 5.0  # unrecorded load on each server before its first round
FORM = {"methods": "gradcam", "outputs": "mask,overlay", "mask_size": "input", "mask_encoding": "list"}


# --- the baseline service ---------------------------------------------------------------------


def embedded_mobilenet() -> Any:
    """torchvision's mobilenet_v2 with the embedded ImageNet weights, in eval mode."""
    import torch
    import torchvision

    from service.models.spec import embedded_weights_path

    model = torchvision.models.mobilenet_v2(weights=None)
    model.load_state_dict(torch.load(embedded_weights_path(), map_location="cpu", weights_only=True))
    return model.eval()


def baseline_app(typed: bool = False) -> FastAPI:
    """FastAPI, one global model, TorchCAM Grad-CAM under a lock: how such a service is usually
    written. Same content as camserve's /explain: top-5, the 224x224 mask as lists, overlay PNG.
    ``typed``: declare the response model, so FastAPI serialises with pydantic-core."""
    import base64

    import torch
    import torch.nn.functional as F
    import torchvision
    from PIL import Image
    from torchcam.methods import GradCAM
    from torchcam.utils import overlay_mask
    from torchvision.transforms.functional import normalize, resize, to_pil_image, to_tensor

    model = embedded_mobilenet()
    labels = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
    extractor = GradCAM(model, target_layer="features.18")
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    # No return annotation: FastAPI reads one as the response model (and then serialises with
    # pydantic-core), so only ``typed`` declares it.
    @app.post("/explain", response_model=dict[str, Any] if typed else None)
    def explain(file: UploadFile = File(...)):  # type: ignore[no-untyped-def]  # noqa: B008
        image = Image.open(io.BytesIO(file.file.read())).convert("RGB")
        x = normalize(to_tensor(resize(image, [224, 224])), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        with lock:
            out = model(x.unsqueeze(0))
            probs = out.softmax(dim=1)[0]
            class_idx = int(probs.argmax())
            cam = extractor(class_idx, out)[0].detach()
        top = torch.topk(probs.detach(), 5)
        mask = F.interpolate(cam[None], size=(224, 224), mode="bilinear", align_corners=False)[0, 0]
        overlay = overlay_mask(image, to_pil_image(cam[0], mode="F"), alpha=0.5)
        buffer = io.BytesIO()
        overlay.save(buffer, format="PNG")
        return {
            "predictions": [{"class_idx": int(i), "label": labels[int(i)], "score": float(s)}
                            for s, i in zip(top.values, top.indices, strict=True)],
            "explanations": [{"method": "gradcam", "class_idx": class_idx,
                              "mask": mask.tolist(),
                              "overlay_png": base64.b64encode(buffer.getvalue()).decode()}],
        }

    return app


# --- running servers --------------------------------------------------------------------------


@dataclass
class Config:
    name: str
    command: list[str]
    env: dict[str, str]
    ready_path: str
    cwd: Path = REPO  # where the server starts (and imports the service from)


def camserve_command(*args: str) -> list[str]:
    """``python -m service ARGS`` with every thread named for the kernel after its Python name
    (loadtests/named_threads.py), so the worker's torch threads can be told from the rest."""
    return [sys.executable, str(REPO / "loadtests" / "named_threads.py"), "-m", "service", *args]


@dataclass
class Outcome:
    name: str
    latencies: list[float] = field(default_factory=list)
    timings: list[dict[str, float]] = field(default_factory=list)  # Server-Timing stages, ms
    errors: dict[int, int] = field(default_factory=dict)  # status (0: none) -> count
    elapsed: float = 0.0
    mean_batch: float | None = None
    server_cpu_s: float | None = None  # CPU seconds of the server process while measured
    torch_cpu_s: float | None = None  # of that, the worker's threads and the torch threads they started
    client_cpu_s: float = 0.0  # CPU seconds of this (the load client's) process while measured

    def cpu_ms(self, seconds: float | None) -> float | None:
        """CPU milliseconds per answered request."""
        return seconds * 1000 / len(self.latencies) if seconds is not None and self.latencies else None

    @property
    def host_cpu_s(self) -> float | None:
        """The server's CPU seconds outside the worker's torch threads: HTTP, decoding,
        rendering, JSON (None where the threads could not be told apart)."""
        if self.server_cpu_s is None or self.torch_cpu_s is None:
            return None
        return self.server_cpu_s - self.torch_cpu_s

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(config: Config, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    log = log_path.open("wb")
    env = {**os.environ, **config.env}
    env.pop("CAMSERVE_API_KEY", None)
    return subprocess.Popen([*config.command, "--port", str(port)], cwd=config.cwd,
                            env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(server: subprocess.Popen[bytes], base: str, path: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    pause = threading.Event()
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode} before it was ready")
        try:
            if httpx.get(base + path, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        pause.wait(0.25)
    raise RuntimeError(f"{base}{path} was not ready within {timeout_s:.0f} s")


def _stages(response: httpx.Response) -> dict[str, float] | None:
    """camserve's ``Server-Timing`` header as {stage: ms}; None where there is none."""
    from service.api.pipeline import parse_server_timing  # not imported by the baseline's process

    header = response.headers.get("server-timing")
    return parse_server_timing(header) if header else None


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process so far, from /proc; None where there is none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def torch_threads_cpu_s(pid: int) -> float | None:
    """CPU seconds so far of the threads named ``camserve-worker...`` of ``pid`` and its
    children (the front ends under a supervisor): the worker's threads and the OpenMP threads
    torch started from them, which inherit the name (servers started through
    loadtests/named_threads.py). None where there is no such thread."""
    from loadtests.named_threads import WORKER_PREFIX

    total, found = 0.0, False
    for process in [pid, *children_of(pid)]:
        for task in Path(f"/proc/{process}/task").glob("*"):
            try:
                if not (task / "comm").read_text().startswith(WORKER_PREFIX):
                    continue
                fields = (task / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue  # the thread ended
            found = True
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total if found else None


def children_of(pid: int) -> list[int]:
    """The live child processes of ``pid`` (none where /proc cannot tell)."""
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def front_end_count(pid: int) -> int:
    """The front-end processes serving under ``pid`` (its children the supervisor marked as
    such in their environment), or 1 where ``pid`` serves alone."""
    marker = b"\0_CAMSERVE_FRONTEND="
    count = 0
    for child in children_of(pid):
        try:
            count += marker in b"\0" + Path(f"/proc/{child}/environ").read_bytes()
        except OSError:
            continue
    return count or 1


def listening_sockets(port: int) -> int:
    """How many sockets listen on TCP ``port`` on this machine (each front end listens on its
    own, SO_REUSEPORT, once its models are loaded), from /proc/net/tcp and tcp6."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 3 and fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port:
                count += 1
    return count


def wait_front_ends(server: subprocess.Popen[bytes], port: int, timeout_s: float = 300) -> int:
    """Wait until every front end of ``server`` listens on ``port`` (``/readyz`` answers as soon
    as the first is ready; keep-alive connections opened before the others listen would all stay
    on it); the number of front ends."""
    deadline = time.monotonic() + timeout_s
    pause = threading.Event()
    while True:
        count = front_end_count(server.pid)
        if listening_sockets(port) >= count:
            return count
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{count} front ends started but only {listening_sockets(port)} listen "
                               f"on port {port}")
        pause.wait(0.25)


def tree_cpu_s(pid: int) -> float | None:
    """CPU seconds of ``pid`` and its live children: with several front ends
    (``CAMSERVE_WORKERS``), the supervisor and the server processes under it."""
    total = process_cpu_s(pid)
    if total is None:
        return None
    return total + sum(process_cpu_s(child) or 0.0 for child in children_of(pid))


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def load(
    base: str, image: bytes, concurrency: int, duration_s: float, outcome: Outcome, warm_up_s: float = 0.0,
    server_pid: int | None = None, form: dict[str, str] | None = None,
) -> None:
    """``concurrency`` clients posting back to back for ``warm_up_s`` unrecorded, then for
    ``duration_s``; results added to ``outcome``, with the CPU time the server process
    ``server_pid`` and this process spent meanwhile. ``form``: the /explain form (FORM)."""
    data = form if form is not None else FORM
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:

        async def one(record: bool) -> None:
            started = time.perf_counter()
            try:
                response = await client.post(
                    "/explain", files={"file": ("chelsea.png", image, "image/png")}, data=data)
            except httpx.HTTPError:
                if record:
                    outcome.errors[0] = outcome.errors.get(0, 0) + 1  # 0: no HTTP answer
                return
            seconds = time.perf_counter() - started
            if not record:
                return
            if response.status_code != 200:
                outcome.errors[response.status_code] = outcome.errors.get(response.status_code, 0) + 1
                return
            outcome.latencies.append(seconds)
            stages = _stages(response)
            if stages:
                outcome.timings.append(stages)

        async def client_loop(stop_at: float, record: bool) -> None:
            while time.perf_counter() < stop_at:
                await one(record)

        if warm_up_s:
            warm_until = time.perf_counter() + warm_up_s
            await asyncio.gather(*(client_loop(warm_until, False) for _ in range(concurrency)))
        server_before = tree_cpu_s(server_pid) if server_pid else None
        torch_before = torch_threads_cpu_s(server_pid) if server_pid else None
        client_before = own_cpu_s()
        began = time.perf_counter()
        await asyncio.gather(*(client_loop(began + duration_s, True) for _ in range(concurrency)))
        outcome.elapsed += time.perf_counter() - began
        outcome.client_cpu_s += own_cpu_s() - client_before
        server_after = tree_cpu_s(server_pid) if server_pid else None
        torch_after = torch_threads_cpu_s(server_pid) if server_pid else None
        if server_before is not None and server_after is not None:
            outcome.server_cpu_s = (outcome.server_cpu_s or 0.0) + server_after - server_before
        if torch_before is not None and torch_after is not None:
            outcome.torch_cpu_s = (outcome.torch_cpu_s or 0.0) + torch_after - torch_before


def mean_batch_size(base: str) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(base + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    totals = {"sum": 0.0, "count": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "camserve_batch_size_sum":
                totals["sum"] += sample.value
            elif sample.name == "camserve_batch_size_count":
                totals["count"] += sample.value
    return totals["sum"] / totals["count"] if totals["count"] else None


@dataclass
class Server:
    config: Config
    process: subprocess.Popen[bytes]
    base: str
    outcome: Outcome


def launch(configs: list[Config], workdir: Path) -> list[Server]:
    """Start every server, then wait until each is ready."""
    servers = []
    for config in configs:
        port = free_port()
        process = start(config, port, workdir / f"{config.name}.log")
        servers.append(Server(config, process, f"http://127.0.0.1:{port}", Outcome(config.name)))
    began = time.perf_counter()
    for server in servers:
        wait_ready(server.process, server.base, server.config.ready_path)
        print(f"  {server.config.name}: ready after {time.perf_counter() - began:.1f} s", flush=True)
    return servers


def stop(servers: list[Server]) -> None:
    for server in servers:
        server.process.send_signal(signal.SIGTERM)
    for server in servers:
        try:
            server.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


CLIENTS = ("httpx", "raw")


def measure(
    client: str, base: str, image: bytes, concurrency: int, duration_s: float, outcome: Outcome,
    warm_up_s: float = 0.0, server_pid: int | None = None, form: dict[str, str] | None = None,
    client_processes: int = 1,
) -> None:
    """One turn of load by ``client``: ``httpx`` (:func:`load`, one process) or ``raw``
    (loadtests.rawload: raw HTTP/1.1 in ``client_processes`` processes)."""
    if client == "raw":
        from loadtests import rawload  # it imports this module

        rawload.load(base, image, concurrency, duration_s, outcome, warm_up_s=warm_up_s,
                     server_pid=server_pid, form=form, processes=client_processes)
    elif client == "httpx":
        asyncio.run(load(base, image, concurrency, duration_s, outcome, warm_up_s=warm_up_s,
                         server_pid=server_pid, form=form))
    else:
        raise ValueError(f"no load client {client!r}: one of {', '.join(CLIENTS)}")


def bench(
    configs: list[Config], concurrency: int, duration_s: float, rounds: int, workdir: Path,
    form: dict[str, str] | None = None, clients: tuple[str, ...] = ("httpx",), client_processes: int = 1,
) -> list[Outcome]:
    """Every config measured for ``duration_s`` in all, in ``rounds`` turns, by each of
    ``clients`` in turn (the first one's outcome keeps the config's name, the others' are
    named ``config/client``)."""
    # Imported here, not on the first response: importing the service (and torch) takes the
    # client's event loop away for seconds, which would show as a stall of the first server.
    import service.api.pipeline  # noqa: F401

    image = IMAGE.read_bytes()
    servers = launch(configs, workdir)
    outcomes = {(s.config.name, client): s.outcome if i == 0 else Outcome(f"{s.config.name}/{client}")
                for s in servers for i, client in enumerate(clients)}
    try:
        for round_ in range(rounds):
            for server in servers:
                for i, client in enumerate(clients):
                    # The baselines always send their own response (lists + overlay): only
                    # camserve's form changes.
                    measure(client, server.base, image, concurrency, duration_s / rounds,
                            outcomes[server.config.name, client],
                            warm_up_s=WARM_UP_S if round_ == 0 and i == 0 else 0.0,
                            server_pid=server.process.pid, client_processes=client_processes,
                            form=None if server.config.name.startswith("baseline") else form)
            done = ", ".join(f"{o.name} {o.throughput:.2f}" for o in outcomes.values())
            print(f"  round {round_ + 1}/{rounds}: req/s so far {done}", flush=True)
        for server in servers:
            if not server.config.name.startswith("baseline"):
                mean = mean_batch_size(server.base)
                for client in clients:
                    outcomes[server.config.name, client].mean_batch = mean
    finally:
        stop(servers)
    return list(outcomes.values())


def old_commit_config(config: Config, rev: str, workdir: Path) -> Config:
    """``config`` run from the tree of commit ``rev`` (``git archive``, into ``workdir``)."""
    tree = workdir / f"tree-{rev}"
    tree.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", rev], cwd=REPO, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    env = {**config.env, "PYTHONPATH": str(tree)}
    return Config(f"{config.name}@{rev}", config.command, env, config.ready_path, cwd=tree)


# --- where the time goes, in this process ----------------------------------------------------


def stage_costs(repeats: int = 20) -> dict[str, float]:
    """Median milliseconds of the CPU stages around the model, for one cat photo, in this process."""
    import json

    import numpy as np
    from fastapi.encoders import jsonable_encoder
    from PIL import Image

    from service.api.render import dumps
    from service.bench import timed as median_ms
    from service.imaging import encode
    from service.imaging.decode import DecodeLimits, decode_image
    from service.imaging.preprocess import resize_for_model

    data = IMAGE.read_bytes()
    frame = decode_image(data, DecodeLimits(50_000_000, 64), "chelsea.png")[0]
    ys, xs = np.mgrid[0:frame.height, 0:frame.width].astype(np.float32)
    display = np.exp(-((ys - 150) ** 2 + (xs - 250) ** 2) / 8000).astype(np.float32)  # a CAM-like blob
    mask = np.asarray(Image.fromarray(display).resize((224, 224)), dtype=np.float32)
    blended = encode.overlay(frame.image, display, "jet", 0.5)
    body = dumps({"mask": {"data": mask}, "overlay_png": encode.png_base64(blended, 3)})

    def timed(fn: Any) -> float:
        return median_ms(fn, repeats, lambda: None)

    def pillow_png() -> None:
        buffer = io.BytesIO()
        Image.fromarray(blended).save(buffer, format="PNG", compress_level=3)

    return {
        "decode + resize to 224": timed(lambda: resize_for_model(
            decode_image(data, DecodeLimits(50_000_000, 64), "x.png")[0].image, (224, 224))),
        "overlay blend 451x300": timed(lambda: encode.overlay(frame.image, display, "jet", 0.5)),
        "overlay PNG (service encoder)": timed(lambda: encode.png_base64(blended, 3)),
        "overlay PNG (Pillow, level 3)": timed(pillow_png),
        "mask 224x224 to JSON (orjson, numpy)": timed(
            lambda: dumps({"data": mask})),
        "mask .tolist() + FastAPI encoder + json": timed(
            lambda: json.dumps(jsonable_encoder({"data": mask.tolist()}))),
        f"client: parse the {len(body) // 1024} KiB body (orjson)": timed(lambda: orjson.loads(body)),
        "client: the same with json": timed(lambda: json.loads(body)),
    }


def model_costs(model: Any, name: str, repeats: int = 10) -> dict[str, float]:
    """Median milliseconds of ``model``'s forward pass in this process, channels-last, with
    torch's default threads: one image alone, and per image in a batch of 8. Run on
    mobilenet_v2, this is the model's speed on this machine, which is what numbers taken on
    other machines differ by."""
    import torch

    from service.bench import timed

    model = model.eval().to(memory_format=torch.channels_last)

    def forward_ms(batch: int) -> float:
        inputs = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            for _ in range(2):  # the first passes choose kernels
                model(inputs)
            return timed(lambda: model(inputs), repeats, lambda: None)

    return {f"{name}, 1 image": forward_ms(1), f"{name}, per image in a batch of 8": forward_ms(8) / 8}


# --- report ----------------------------------------------------------------------------------


STAGES = ("decode", "queue", "compute", "render", "json")


def report(outcomes: list[Outcome], concurrency: int, form: dict[str, str] | None = None) -> None:
    form = form or FORM
    mask = ("lists" if form["mask_encoding"] == "list"
            else f"base64 {form.get('mask_dtype', 'float32')}")
    print(f"\n/explain, Grad-CAM, mask ({mask}) + overlay PNG, chelsea.png, concurrency {concurrency}")
    print("(cpu: CPU ms per answered request, of the server process, of its host work outside "
          "the worker's torch threads, and of the load client)")
    print(f"{'config':<18} {'requests':>8} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'errors':>8} "
          f"{'batch':>6} {'cpu srv':>8} {'cpu host':>8} {'cpu cli':>8}")

    def cell(value: float | None) -> str:
        return f"{value:.1f}" if value is not None else "-"

    for o in outcomes:
        errors = ",".join(f"{k}:{v}" for k, v in sorted(o.errors.items())) or "0"
        batch = f"{o.mean_batch:.2f}" if o.mean_batch else "-"
        print(f"{o.name:<18} {len(o.latencies):>8} {o.throughput:>7.2f} {o.percentile(0.5) * 1000:>8.0f} "
              f"{o.percentile(0.99) * 1000:>8.0f} {errors:>8} {batch:>6} "
              f"{cell(o.cpu_ms(o.server_cpu_s)):>8} {cell(o.cpu_ms(o.host_cpu_s)):>8} "
              f"{cell(o.cpu_ms(o.client_cpu_s)):>8}")
    by_name = {o.name: o for o in outcomes}

    def ratio(a: str, b: str) -> None:
        if a in by_name and b in by_name and by_name[b].throughput:
            print(f"throughput {a} / {b}: {by_name[a].throughput / by_name[b].throughput:.2f}x")

    ratio("batched", "unbatched")
    for base in ("baseline", "baseline-typed"):
        ratio("batched", base)
        ratio("unbatched", base)
    for name, old in by_name.items():  # the same server at an older commit, from --baseline-rev
        if "@" not in name or name.partition("@")[0] not in by_name:
            continue
        new = by_name[name.partition("@")[0]]
        new_ms, old_ms = new.cpu_ms(new.host_cpu_s), old.cpu_ms(old.host_cpu_s)
        if new_ms is not None and old_ms:
            print(f"host CPU per request {new.name} / {name}: {new_ms:.2f} / {old_ms:.2f} ms = "
                  f"{new_ms / old_ms:.2f}x")
        ratio(new.name, name)

    timed = [o for o in outcomes if o.timings]
    if not timed:
        return
    print("\nwhere a request's time goes, mean ms (server: Server-Timing; other = multipart parsing and "
          "waiting for the event loop or a thread; client = round trip minus server total)")
    print(f"{'config':<18} " + " ".join(f"{s:>8}" for s in (*STAGES, "other", "server", "client", "latency")))
    for o in timed:
        means = {k: statistics.fmean(t.get(k, 0.0) for t in o.timings) for k in (*STAGES, "total")}
        other = means["total"] - sum(means[k] for k in STAGES)
        latency = statistics.fmean(o.latencies) * 1000
        cells = [means[k] for k in STAGES] + [other, means["total"], latency - means["total"], latency]
        print(f"{o.name:<18} " + " ".join(f"{c:>8.1f}" for c in cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_serving", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds measured per config, in all")
    parser.add_argument("--rounds", type=int, default=3, help="turns the configs are measured in")
    parser.add_argument("--only", default="batched,unbatched,baseline,baseline-typed",
                        help="comma-separated configs")
    parser.add_argument("--baseline-rev", metavar="REV",
                        help="also measure the batched server of this git commit (config batched@REV, "
                             "from git archive), in the same turns, and print the ratios of CPU "
                             "per request and throughput against it")
    parser.add_argument("--mask-encoding", choices=("list", "base64"), default="list",
                        help="camserve's mask encoding (default list, as the baselines send)")
    parser.add_argument("--mask-dtype", choices=("float32", "float16", "uint8"), default="float32",
                        help="camserve's base64 mask element type (default float32)")
    parser.add_argument("--client", default="httpx",
                        help="load client(s), comma-separated, each measuring every server in turn: httpx "
                             "(one process, as before) or raw (loadtests.rawload: raw HTTP/1.1 keep-alive "
                             "in --client-processes processes, about a seventh of httpx's CPU per request)")
    parser.add_argument("--client-processes", type=int, default=1,
                        help="processes the raw client's connections are split over (default 1)")
    parser.add_argument("--serve-baseline", choices=("plain", "typed"), nargs="?", const="plain",
                        help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=8001, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_baseline:
        import uvicorn

        app = baseline_app(typed=args.serve_baseline == "typed")
        uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
        return 0

    # One front end: the CPU figures are of one process (loadtests.bench_frontends compares more).
    quiet = {"CAMSERVE_DEVICE": os.environ.get("CAMSERVE_DEVICE", "auto"), "CAMSERVE_WORKERS": "1"}
    configs = {
        "batched": Config("batched", camserve_command("--log-level", "warning"),
                          {**quiet, "CAMSERVE_MAX_BATCH_SIZE": "8"}, "/readyz"),
        "unbatched": Config("unbatched", camserve_command("--log-level", "warning"),
                            {**quiet, "CAMSERVE_MAX_BATCH_SIZE": "1"}, "/readyz"),
        "baseline": Config("baseline", [sys.executable, "-m", "loadtests.bench_serving", "--serve-baseline"],
                           {}, "/healthz"),
        "baseline-typed": Config("baseline-typed", [sys.executable, "-m", "loadtests.bench_serving",
                                                    "--serve-baseline", "typed"], {}, "/healthz"),
    }
    chosen = [configs[name] for name in args.only.split(",")]
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"camserve-bench-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    if args.baseline_rev:
        chosen.append(old_commit_config(configs["batched"], args.baseline_rev, workdir))
    print(f"bench: {len(chosen)} servers, {args.duration:.0f} s each in {args.rounds} rounds at "
          f"concurrency {args.concurrency}; server logs in {workdir}", flush=True)
    form = {**FORM, "mask_encoding": args.mask_encoding, "mask_dtype": args.mask_dtype}
    clients = tuple(args.client.split(","))
    if not set(clients) <= set(CLIENTS):
        parser.error(f"--client: one or more of {', '.join(CLIENTS)}")
    outcomes = bench(chosen, args.concurrency, args.duration, max(1, args.rounds), workdir, form,
                     clients, args.client_processes)
    report(outcomes, args.concurrency, form)
    print("\nstages in this process (median ms, one cat photo 451x300):")
    from service.models.fold import fold_batch_norms

    model = embedded_mobilenet()
    folded = fold_batch_norms(model)
    assert folded is not None
    costs = {**stage_costs(), **model_costs(model, "forward pass"),
             **model_costs(folded.module, "forward pass, batch norm folded")}
    for stage, ms in costs.items():
        print(f"  {stage:<58} {ms:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
