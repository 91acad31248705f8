"""``python -m loadtests --url URL --methods gradcam --concurrency 4 --requests 40``

A closed-loop load generator on httpx: N concurrent clients each send /explain requests
back to back, then per-request latency percentiles and throughput are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import httpx

DEFAULT_IMAGE = Path(__file__).resolve().parent.parent / "tests" / "data" / "chelsea.png"


async def _client(
    client: httpx.AsyncClient, url: str, image: bytes, method: str, count: int, out: list[float],
    failures: list[int],
) -> None:
    for _ in range(count):
        started = time.perf_counter()
        response = await client.post(
            f"{url}/explain", files={"file": ("image.png", image, "image/png")}, data={"methods": method}
        )
        if response.status_code == 200:
            out.append((time.perf_counter() - started) * 1000)
        else:
            failures.append(response.status_code)


async def run(url: str, method: str, concurrency: int, requests: int, image: bytes) -> dict[str, float]:
    latencies: list[float] = []
    failures: list[int] = []
    per_client = max(1, requests // concurrency)
    async with httpx.AsyncClient(timeout=120) as client:
        started = time.perf_counter()
        await asyncio.gather(*(
            _client(client, url, image, method, per_client, latencies, failures) for _ in range(concurrency)
        ))
        elapsed = time.perf_counter() - started
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {
        "requests": len(latencies) + len(failures),
        "failures": len(failures),
        "rps": len(latencies) / elapsed,
        "p50_ms": quantiles[49],
        "p99_ms": quantiles[98],
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests", description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--methods", default="gradcam")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    args = parser.parse_args()
    image = args.image.read_bytes()
    print("method,concurrency,requests,failures,rps,p50_ms,p99_ms")
    for method in args.methods.split(","):
        row = asyncio.run(run(args.url, method, args.concurrency, args.requests, image))
        print(f"{method},{args.concurrency},{row['requests']},{row['failures']},"
              f"{row['rps']:.2f},{row['p50_ms']:.1f},{row['p99_ms']:.1f}")


if __name__ == "__main__":
    main()
