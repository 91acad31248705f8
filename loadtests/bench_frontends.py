"""``python -m loadtests.bench_frontends``: throughput with 1 and with 2 front-end processes.

The model is chosen so cheap that the host's work dominates: a registered ``mobilenet_v3_small``
with random weights at 96x96 (a models file written to a temporary folder). Each request is
``/explain`` with Grad-CAM, the mask at the input size as lists plus the overlay PNG, on
``tests/data/chelsea.png`` (451x300): decoding, resizing, blending, PNG and JSON at the photo's
size cost far more than the model. Both servers (``CAMSERVE_WORKERS=1`` and ``=2``, each with its
default threads: one front end gets every core, two get half each) are started first, then
measured in turns (``--rounds``) at ``--concurrency`` clients, as ``loadtests.bench_serving``
measures. Prints requests/s, p50/p99, the CPU ms per request of the server's processes (the
supervisor and its front ends), and the ratio of the two throughputs. Never asserted.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from loadtests import bench_serving as serving
from loadtests.bench_serving import Config, Outcome, Server

MODELS_TOML = """\
[[models]]
name = "tiny"
architecture = "mobilenet_v3_small"
weights = "random"
input_size = [96, 96]
"""


def measured(server: Server, image: bytes, concurrency: int, seconds: float, warm_up_s: float,
             client: str = "httpx", client_processes: int = 1) -> None:
    """One turn of load on ``server`` by ``client`` (``bench_serving.measure``); its processes'
    CPU time (``bench_serving.tree_cpu_s``) added to its outcome."""
    outcome = server.outcome
    if warm_up_s:
        serving.measure(client, server.base, image, concurrency, warm_up_s, Outcome("warm-up"),
                        client_processes=client_processes)
    serving.measure(client, server.base, image, concurrency, seconds, outcome, server_pid=server.process.pid,
                    client_processes=client_processes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_frontends", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds measured per config, in all")
    parser.add_argument("--rounds", type=int, default=2, help="turns the configs are measured in")
    parser.add_argument("--client", choices=serving.CLIENTS, default="httpx",
                        help="load client: httpx (one process) or raw (loadtests.rawload)")
    parser.add_argument("--client-processes", type=int, default=1,
                        help="processes the raw client's connections are split over (default 1)")
    args = parser.parse_args(argv)
    import service.api.pipeline  # noqa: F401  (imported now, not during the first round: see bench_serving)

    workdir = Path(tempfile.mkdtemp(prefix="camserve-bench-frontends-"))
    models = workdir / "models.toml"
    models.write_text(MODELS_TOML)
    env = {"CAMSERVE_DEVICE": os.environ.get("CAMSERVE_DEVICE", "cpu"), "CAMSERVE_MODELS_FILE": str(models),
           "CAMSERVE_DEFAULT_MODEL": "tiny"}
    command = [sys.executable, "-m", "service", "--log-level", "warning"]
    configs = [Config(f"{n} front end{'s' if n > 1 else ''}", command, {**env, "CAMSERVE_WORKERS": str(n)},
                      "/readyz") for n in (1, 2)]
    print(f"bench: mobilenet_v3_small (random weights) at 96x96, 1 then 2 front ends, {args.duration:.0f} s "
          f"each in {args.rounds} rounds at concurrency {args.concurrency}; logs in {workdir}", flush=True)
    servers = serving.launch(configs, workdir)
    image = serving.IMAGE.read_bytes()
    form = dict(serving.FORM)
    try:
        for round_ in range(max(1, args.rounds)):
            for server in servers:
                measured(server, image, args.concurrency, args.duration / max(1, args.rounds),
                         serving.WARM_UP_S if round_ == 0 else 0.0, args.client, args.client_processes)
            done = ", ".join(f"{s.config.name} {s.outcome.throughput:.1f}" for s in servers)
            print(f"  round {round_ + 1}: req/s so far {done}", flush=True)
    finally:
        serving.stop(servers)
    print(f"\n/explain, Grad-CAM, mask ({form['mask_encoding']}, {form['mask_size']} size) + overlay PNG, "
          f"chelsea.png, concurrency {args.concurrency}")
    print("(cpu: CPU ms per answered request, of every server process together and of the load client;"
          " cores: what they used meanwhile)")
    print(f"{'config':<14} {'requests':>8} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'errors':>8} "
          f"{'cpu srv':>8} {'cpu cli':>8} {'cores':>6}")
    for server in servers:
        o = server.outcome
        errors = ",".join(f"{k}:{v}" for k, v in sorted(o.errors.items())) or "0"
        cpu, client = o.cpu_ms(o.server_cpu_s), o.cpu_ms(o.client_cpu_s)
        cores = ((o.server_cpu_s or 0.0) + o.client_cpu_s) / o.elapsed if o.elapsed else 0.0
        print(f"{o.name:<14} {len(o.latencies):>8} {o.throughput:>7.1f} {o.percentile(0.5) * 1000:>8.0f} "
              f"{o.percentile(0.99) * 1000:>8.0f} {errors:>8} {cpu if cpu is None else round(cpu, 1)!s:>8} "
              f"{client if client is None else round(client, 1)!s:>8} {cores:>6.2f}")
    one, two = (server.outcome.throughput for server in servers)
    if one:
        print(f"throughput 2 front ends / 1 front end: {two / one:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
