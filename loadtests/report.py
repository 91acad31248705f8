"""Turn recorded samples into ``results.csv``, ``report.md`` and ``latency.png``.

Nothing here imports Locust (so nothing here monkey-patches the standard library): the runner
hands over plain :class:`Row` values.
"""

from __future__ import annotations

import csv
import math
import os
import platform
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

PERCENTILES = (50, 90, 95, 99)
SPLIT = ("queue", "compute", "encode", "total")
COLUMNS = (
    "method", "concurrency", "requests", "failures", "rps",
    "p50_ms", "p90_ms", "p95_ms", "p99_ms",
    "queue_mean_ms", "compute_mean_ms", "encode_mean_ms", "server_total_mean_ms",
    "mode", "target_rps", "duration_s",
)


@dataclass
class Row:
    """One cell of the sweep: a method at a concurrency (closed loop) or an arrival rate (open)."""

    method: str
    mode: str  # "closed" or "open"
    concurrency: int | None
    target_rps: float | None
    duration_s: float
    requests: int
    failures: int
    rps: float
    percentiles_ms: dict[int, float]
    split_ms: dict[str, float]
    errors: Counter[str] = field(default_factory=Counter)

    def csv_row(self) -> dict[str, Any]:
        def num(value: float) -> str:
            return "" if math.isnan(value) else f"{value:.2f}"

        return {
            "method": self.method,
            "concurrency": "" if self.concurrency is None else self.concurrency,
            "requests": self.requests,
            "failures": self.failures,
            "rps": f"{self.rps:.3f}",
            **{f"p{p}_ms": num(self.percentiles_ms[p]) for p in PERCENTILES},
            "queue_mean_ms": num(self.split_ms["queue"]),
            "compute_mean_ms": num(self.split_ms["compute"]),
            "encode_mean_ms": num(self.split_ms["encode"]),
            "server_total_mean_ms": num(self.split_ms["total"]),
            "mode": self.mode,
            "target_rps": "" if self.target_rps is None else f"{self.target_rps:g}",
            "duration_s": f"{self.duration_s:.2f}",
        }


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile with linear interpolation between ranks (NaN for no values)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarise(
    method: str,
    mode: str,
    level: float,
    duration_s: float,
    outcomes: Iterable[tuple[bool, float, str, Mapping[str, float] | None]],
) -> Row:
    """A row from ``(ok, latency_ms, error, timing_ms)`` outcomes.

    Percentiles and the server split cover successful requests; failures are counted, and their
    reasons kept for the report. ``rps`` is successful requests per second of the cell.
    """
    latencies: list[float] = []
    timings: list[Mapping[str, float]] = []
    errors: Counter[str] = Counter()
    total = 0
    for ok, latency_ms, error, timing in outcomes:
        total += 1
        if ok:
            latencies.append(latency_ms)
            if timing is not None:
                timings.append(timing)
        else:
            errors[error or "unknown error"] += 1
    split = {
        key: (sum(t[key] for t in timings) / len(timings) if timings else math.nan) for key in SPLIT
    }
    return Row(
        method=method,
        mode=mode,
        concurrency=int(level) if mode == "closed" else None,
        target_rps=float(level) if mode == "open" else None,
        duration_s=duration_s,
        requests=total,
        failures=total - len(latencies),
        rps=len(latencies) / duration_s if duration_s > 0 else 0.0,
        percentiles_ms={p: percentile(latencies, p) for p in PERCENTILES},
        split_ms=split,
        errors=errors,
    )


def write_csv(rows: Sequence[Row], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(row.csv_row())


# --- the machine -------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return float(psutil.virtual_memory().total) / 1024**3
    except ImportError:
        return None


def _cores() -> str:
    logical = os.cpu_count() or 0
    text = f"{logical} logical"
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
        if physical:
            text += f", {physical} physical"
    except ImportError:
        pass
    if hasattr(os, "sched_getaffinity"):
        text += f", {len(os.sched_getaffinity(0))} usable by this process"
    return text


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def gpu_names(device: str) -> str:
    """Names of the local CUDA devices (``nvidia-smi``, else torch in a subprocess); '' when none."""
    if not device.startswith("cuda"):
        return ""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30, check=True,
            ).stdout.strip()
            if out:
                return "; ".join(line.strip() for line in out.splitlines())
        except (OSError, subprocess.SubprocessError):
            pass
    code = (
        "import torch\n"
        "print('; '.join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))"
    )
    try:
        return subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
        ).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def describe_machine(server: Mapping[str, str]) -> dict[str, str]:
    """This machine (the client's, and the server's when the runner started it) and the server facts."""
    memory = _memory_gib()
    machine = {
        "CPU": _cpu_model(),
        "cores": _cores(),
        "memory": "unknown" if memory is None else f"{memory:.1f} GiB",
        "OS": platform.platform(),
        "Python": platform.python_version(),
        "torch": _version("torch"),
        "torchvision": _version("torchvision"),
        "locust": _version("locust"),
    }
    machine.update(server)
    return machine


# --- the report --------------------------------------------------------------------------------


def _fmt(value: float, digits: int = 1) -> str:
    return "–" if math.isnan(value) else f"{value:.{digits}f}"


def markdown_table(rows: Sequence[Row]) -> str:
    closed = [r for r in rows if r.mode == "closed"]
    opened = [r for r in rows if r.mode == "open"]
    parts = []
    for title, chosen, level in (
        ("Fixed concurrency (closed loop)", closed, "concurrency"),
        ("Fixed request rate (open loop)", opened, "target rps"),
    ):
        if not chosen:
            continue
        lines = [
            f"### {title}",
            "",
            f"| method | {level} | requests | failures | rps | p50 ms | p90 ms | p95 ms | p99 ms "
            "| queue ms | compute ms | encode ms | server total ms |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in chosen:
            shown = r.concurrency if r.mode == "closed" else f"{r.target_rps:g}"
            p = r.percentiles_ms
            s = r.split_ms
            lines.append(
                f"| {r.method} | {shown} | {r.requests} | {r.failures} | {r.rps:.2f} "
                f"| {_fmt(p[50])} | {_fmt(p[90])} | {_fmt(p[95])} | {_fmt(p[99])} "
                f"| {_fmt(s['queue'])} | {_fmt(s['compute'])} | {_fmt(s['encode'])} | {_fmt(s['total'])} |"
            )
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def write_markdown(
    rows: Sequence[Row],
    machine: Mapping[str, str],
    settings: Mapping[str, str],
    notes: Sequence[str],
    path: Path,
    plot_name: str | None,
) -> None:
    lines = [
        "# camserve latency report",
        "",
        f"Generated {datetime.now(UTC):%Y-%m-%d %H:%M UTC}.",
        "",
        "## Machine",
        "",
        "| | |",
        "| --- | --- |",
        *(f"| {key} | {value} |" for key, value in machine.items()),
        "",
        "## Run",
        "",
        "| | |",
        "| --- | --- |",
        *(f"| {key} | {value} |" for key, value in settings.items()),
        "",
        "## Latency per method",
        "",
        markdown_table(rows),
        "",
        "Latency is measured by the client, per request, over successful requests: from the moment "
        "the request is sent (fixed concurrency), or from the moment it was due to be sent (fixed "
        "rate), to the last byte of the response. `rps` is successful responses per second over "
        "the cell's span, from its first request to its last response (requests still in flight "
        "when the duration is up are awaited and counted). "
        "The queue, compute, encode and server total columns are means of the `timing_ms` the "
        "service returns with each response.",
    ]
    if notes:
        lines += ["", "## Notes", "", *(f"- {note}" for note in notes)]
    failed = [r for r in rows if r.errors]
    if failed:
        lines += ["", "## Failures", ""]
        for r in failed:
            where = f"concurrency {r.concurrency}" if r.mode == "closed" else f"{r.target_rps:g} rps"
            for error, count in r.errors.most_common(5):
                lines.append(f"- {r.method} at {where}: {count} × {error}")
    if plot_name:
        lines += ["", f"![latency percentiles per method]({plot_name})"]
    path.write_text("\n".join(lines) + "\n")


def write_plot(rows: Sequence[Row], path: Path, title: str) -> None:
    """Latency percentiles per method against concurrency (and against offered rate, if any)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    panels = [
        (mode, label, [r for r in rows if r.mode == mode])
        for mode, label in (("closed", "concurrent clients"), ("open", "offered load (requests/s)"))
    ]
    panels = [p for p in panels if p[2]]
    styles = {50: "-", 90: "--", 95: "-.", 99: ":"}
    methods = list(dict.fromkeys(r.method for r in rows))
    palette = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    colours = {m: palette(i % palette.N) for i, m in enumerate(methods)}

    width = 6.5 * max(1, len(panels)) + 2.2  # the legend sits right of the panels
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(width, 4.8), squeeze=False)
    for ax, (mode, label, chosen) in zip(axes[0], panels, strict=False):
        levels: set[float] = set()
        for method in methods:
            mine = sorted(
                (r for r in chosen if r.method == method),
                key=lambda r: (r.concurrency if mode == "closed" else r.target_rps) or 0,
            )
            xs = [float((r.concurrency if mode == "closed" else r.target_rps) or 0) for r in mine]
            levels.update(xs)
            for p, style in styles.items():
                ys = [r.percentiles_ms[p] for r in mine]
                if any(not math.isnan(y) for y in ys):
                    ax.plot(xs, ys, style, marker="o", markersize=4, color=colours[method])
        if len(levels) > 1 and min(levels) > 0:
            ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(levels))
        ax.set_xticklabels([f"{x:g}" for x in sorted(levels)])
        ax.set_yscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")
        ax.yaxis.set_major_formatter(plain)
        low, high = ax.get_ylim()
        if high / max(low, 1e-9) < 30:  # within about a decade minor labels help, beyond they crowd
            ax.yaxis.set_minor_formatter(plain)
            ax.tick_params(axis="y", which="minor", labelsize="x-small")
        ax.set_xlabel(label)
        ax.set_ylabel("latency (ms)")
        ax.set_title("fixed concurrency" if mode == "closed" else "fixed request rate (open loop)")
        ax.grid(True, which="both", alpha=0.3)
    handles = [Line2D([], [], color=colours[m], marker="o", label=m) for m in methods]
    handles += [Line2D([], [], color="black", linestyle=s, label=f"p{p}") for p, s in styles.items()]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1 - 2.1 / width, 0.5),
               fontsize="small" if len(handles) <= 16 else "x-small", frameon=False)
    fig.suptitle(title, fontsize="medium")
    fig.tight_layout(rect=(0, 0, 1 - 2.2 / width, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
