"""``python -m loadtests.bench_heavy``: do light requests keep their latency while heavy ones run?

One ``python -m service`` on a free port, measured in three phases of ``--duration`` seconds:

1. ``light``: ``--concurrency`` clients (4) posting Grad-CAM of the cat photo back to back;
2. ``heavy``: one client posting exact Score-CAM (``--heavy-method``, ``--heavy-params``) back
   to back, alone;
3. ``both``: the two together.

It prints the light requests' p50 and p99 in phases 1 and 3 and the heavy request's mean time
in phases 2 and 3, and their ratios (the goals: light p50 at most 2x and p99 at most 3x their
unloaded values, heavy at most 1.5x its time alone). Printed, never asserted: the numbers
belong to the machine they were measured on (docs/performance.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

from loadtests.bench_serving import (
    IMAGE,
    Config,
    Outcome,
    free_port,
    load,
    start,
    stop,
    tree_cpu_s,
    wait_ready,
)

HEAVY_TIMEOUT_S = 600


async def heavy_loop(
    base: str, image: bytes, form: dict[str, str], until: asyncio.Event, minimum: int, times: list[float]
) -> None:
    """Heavy requests one after another until ``until`` is set and ``minimum`` have been timed."""
    async with httpx.AsyncClient(base_url=base, timeout=HEAVY_TIMEOUT_S + 30) as client:
        while not until.is_set() or len(times) < minimum:
            started = time.perf_counter()
            response = await client.post(
                "/explain", files={"file": ("chelsea.png", image, "image/png")}, data=form,
                headers={"X-Request-Timeout": str(HEAVY_TIMEOUT_S)},
            )
            if response.status_code != 200:
                raise RuntimeError(f"the heavy request answered {response.status_code}: {response.text}")
            times.append(time.perf_counter() - started)


async def phase(
    base: str, image: bytes, concurrency: int, duration_s: float, heavy_form: dict[str, str] | None,
    light: bool, minimum_heavy: int, cores: list[float] | None = None, server_pid: int | None = None,
) -> tuple[Outcome, list[float]]:
    """One phase; appends to ``cores`` the server's CPU seconds per second of it (cores busy)."""
    outcome, heavy_times = Outcome("light"), []
    cpu_before, started = (tree_cpu_s(server_pid) if server_pid else None), time.perf_counter()
    done = asyncio.Event()
    tasks = []
    if heavy_form is not None:
        heavy = heavy_loop(base, image, heavy_form, done, minimum_heavy, heavy_times)
        tasks.append(asyncio.create_task(heavy))
    if light:
        await load(base, image, concurrency, duration_s, outcome)
    else:
        await asyncio.sleep(duration_s)  # the heavy loop alone, for as long as a light phase
    done.set()
    await asyncio.gather(*tasks)
    cpu_after = tree_cpu_s(server_pid) if server_pid else None
    if cores is not None and cpu_before is not None and cpu_after is not None:
        cores.append((cpu_after - cpu_before) / (time.perf_counter() - started))
    return outcome, heavy_times


def run(concurrency: int, duration_s: float, heavy_form: dict[str, str], workdir: Path) -> dict[str, float]:
    image = IMAGE.read_bytes()
    port = free_port()
    config = Config("camserve", [sys.executable, "-m", "service", "--log-level", "warning"],
                    {"CAMSERVE_DEVICE": os.environ.get("CAMSERVE_DEVICE", "auto"), "CAMSERVE_WORKERS": "1"},
                    "/readyz")
    process = start(config, port, workdir / "camserve.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, base, config.ready_path)
        asyncio.run(load(base, image, concurrency, 3.0, Outcome("warm-up")))  # unrecorded
        cores: list[float] = []
        pid = process.pid
        alone, _ = asyncio.run(phase(base, image, concurrency, duration_s, None, True, 0, cores, pid))
        print(f"  light alone: {len(alone.latencies)} requests", flush=True)
        _, heavy_alone = asyncio.run(
            phase(base, image, concurrency, duration_s, heavy_form, False, 1, cores, pid))
        print(f"  heavy alone: {len(heavy_alone)} requests", flush=True)
        loaded, heavy_loaded = asyncio.run(
            phase(base, image, concurrency, duration_s, heavy_form, True, 1, cores, pid))
        print(f"  both: {len(loaded.latencies)} light and {len(heavy_loaded)} heavy requests", flush=True)
    finally:
        stop([_Running(process)])
    if alone.errors or loaded.errors:
        raise RuntimeError(f"light requests failed: alone {alone.errors}, with heavy {loaded.errors}")
    return {
        "light_p50_alone_ms": alone.percentile(0.50) * 1000,
        "light_p99_alone_ms": alone.percentile(0.99) * 1000,
        "light_p50_loaded_ms": loaded.percentile(0.50) * 1000,
        "light_p99_loaded_ms": loaded.percentile(0.99) * 1000,
        "light_rps_alone": alone.throughput,
        "light_rps_loaded": loaded.throughput,
        "heavy_alone_s": statistics.fmean(heavy_alone),
        "heavy_loaded_s": statistics.fmean(heavy_loaded),
        **({f"server_cores_{name}": value
            for name, value in zip(("light", "heavy", "both"), cores, strict=True)}
           if len(cores) == 3 else {}),
    }


class _Running:
    """What :func:`loadtests.bench_serving.stop` needs of a server."""

    def __init__(self, process: object) -> None:
        self.process = process


def report(numbers: dict[str, float]) -> dict[str, float]:
    n = numbers
    ratios = {
        "light p50, with heavy / alone (goal <= 2)": n["light_p50_loaded_ms"] / n["light_p50_alone_ms"],
        "light p99, with heavy / alone (goal <= 3)": n["light_p99_loaded_ms"] / n["light_p99_alone_ms"],
        "heavy time, with light / alone (goal <= 1.5)": n["heavy_loaded_s"] / n["heavy_alone_s"],
    }
    print(f"\n{'':<14} {'light p50':>10} {'light p99':>10} {'light req/s':>12} {'heavy s/req':>12}")
    for name, key in (("alone", "alone"), ("together", "loaded")):
        print(f"{name:<14} {n[f'light_p50_{key}_ms']:>8.1f}ms {n[f'light_p99_{key}_ms']:>8.1f}ms "
              f"{n[f'light_rps_{key}']:>12.2f} {n[f'heavy_{key}_s']:>12.2f}")
    print()
    for name, value in ratios.items():
        print(f"  {name:<48} {value:6.2f}x")
    # Whether the three goals fit on this machine at all: if the light clients alone keep every
    # core busy, the light requests' share of the machine with heavy work (their throughput
    # against alone's, which with closed-loop clients is 1 / the p50 ratio) and the heavy
    # request's share (1 / its time ratio) add up to at most about 1, while the goals need
    # 1/2 + 1/1.5 = 1.17 of it.
    light_share = n["light_rps_loaded"] / n["light_rps_alone"]
    heavy_share = n["heavy_alone_s"] / n["heavy_loaded_s"]
    print(f"\n  shares of the machine together: light {light_share:.2f} + heavy {heavy_share:.2f} = "
          f"{light_share + heavy_share:.2f} (the goals need 1/2 + 1/1.5 = 1.17)")
    if "server_cores_light" in n:
        print(f"  server cores busy: light alone {n['server_cores_light']:.2f}, heavy alone "
              f"{n['server_cores_heavy']:.2f}, together {n['server_cores_both']:.2f} "
              f"(of {len(os.sched_getaffinity(0))} cores)")
    return ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_heavy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=4, help="light clients (default 4)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per phase (default 30)")
    parser.add_argument("--heavy-method", default="scorecam")
    parser.add_argument("--heavy-params", default="{}",
                        help="JSON method_params of the heavy request (default: exact, '{}')")
    args = parser.parse_args(argv)
    form = {"methods": args.heavy_method, "outputs": "mask"}
    params = json.loads(args.heavy_params)
    if params:
        form["method_params"] = json.dumps({args.heavy_method: params})
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"camserve-bench-heavy-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"bench_heavy: {args.concurrency} light Grad-CAM clients, one {args.heavy_method} client "
          f"{params or '(exact)'}, {args.duration:.0f} s a phase; server log in {workdir}", flush=True)
    report(run(args.concurrency, args.duration, form, workdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
