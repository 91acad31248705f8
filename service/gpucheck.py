"""``python -m service.gpucheck`` (``make gpu-check``): everything only a GPU can show, in one run.

Without a CUDA device it prints one line and exits 0. With one, within about 8 minutes, it:

1. runs the tests marked ``cuda`` (CUDA maps against CPU maps for every method, out-of-memory
   splitting on the device, a real device-side assert ending ``python -m service`` with 70,
   every visible GPU computing);
2. runs ``python -m service.bench --device cuda --quick``;
3. times the bare GPU work of a batch of 64 (forward, and Grad-CAM's forward plus backward);
4. runs the serving benchmark on the GPU (``python -m service`` with its default front ends,
   Grad-CAM on the cat photo, base64 float16 mask plus overlay PNG) at concurrency 16, 64 and
   256, then at 256 the photo as a JPEG (decoded on the GPU) and both without the overlay
   (``CASES``), loaded by loadtests.rawload's client processes (a quarter of the cores),
   sampling the GPU's utilisation meanwhile (NVML through pynvml when installed, else
   ``nvidia-smi``);

and writes ``build/gpu-check/report.md`` with the device, driver, torch and CUDA versions and
every figure, plus each step's output beside it. The exit status is 1 when a step failed.
Nothing here asserts a timing: the report is for people. ``--device cpu`` runs the same steps
on the CPU (the CUDA tests then skip): a check of the check itself where no GPU is lent.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from service.frontends import usable_cores

REPO = Path(__file__).resolve().parent.parent
NO_CUDA = "no CUDA device: nothing to check"
CONCURRENCY = (16, 64, 256)
# Where the tests marked cuda live (tests/test_gpucheck.py keeps this true). Named rather than
# the whole tests folder: collecting every module would import the browser, fuzzing and Ray
# test dependencies, which a GPU machine with only the service's own packages lacks.
CUDA_TESTS = ("tests/cuda", "tests/test_fatal_exit.py")
SERVING_FORM = {"methods": "gradcam", "outputs": "mask,overlay", "mask_size": "input",
                "mask_encoding": "base64", "mask_dtype": "float16"}


@dataclass(frozen=True)
class Case:
    """One serving measurement: the cat photo as ``image`` (PNG: decoded on the host; JPEG: on
    the GPU, as CAMSERVE_GPU_DECODE's default does on CUDA) with the form's ``outputs``."""

    concurrency: int
    image: str
    outputs: str


# The concurrency sweep first; then, at 256, what the host's share is made of: the GPU's JPEG
# decode, and answers without the overlay (whose goal is half the bare GPU rate).
CASES = (*(Case(c, "PNG", "mask,overlay") for c in CONCURRENCY), Case(256, "JPEG", "mask,overlay"),
         Case(256, "PNG", "mask"), Case(256, "JPEG", "mask"))


@dataclass
class Step:
    name: str
    ok: bool
    seconds: float
    output: str = ""


@dataclass
class Report:
    started: float = field(default_factory=time.monotonic)
    budget_s: float = 480.0
    steps: list[Step] = field(default_factory=list)
    facts: dict[str, str] = field(default_factory=dict)
    bare: dict[str, float] = field(default_factory=dict)
    serving: list[dict[str, object]] = field(default_factory=list)
    device: str = "cuda:0"  # where the bare rates and the serving benchmark ran

    def left(self, reserve_s: float = 0.0) -> float:
        return self.budget_s - (time.monotonic() - self.started) - reserve_s


def device_facts(device: str = "cuda") -> dict[str, str]:
    facts = {
        "devices": ", ".join(f"{i}: {torch.cuda.get_device_name(i)}"
                             for i in range(torch.cuda.device_count())) if device == "cuda" else device,
        "torch": torch.__version__,
        "CUDA (torch)": str(torch.version.cuda),
        "cuDNN": str(torch.backends.cudnn.version()),
    }
    smi = _nvidia_smi(["--query-gpu=driver_version,memory.total", "--format=csv,noheader"])
    facts["driver, memory"] = smi.strip().splitlines()[0] if smi.strip() else "unknown (no nvidia-smi)"
    facts["host CPUs"] = str(os.cpu_count())
    return facts


def _nvidia_smi(args: list[str]) -> str:
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return ""
    try:
        return subprocess.run([binary, *args], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


class UtilisationSampler:
    """The GPU's utilisation (percent, device 0) every ``interval_s`` until stopped."""

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval_s = interval_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-util", daemon=True)
        self._read = self._reader()

    def _reader(self):  # type: ignore[no-untyped-def]
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:  # no pynvml, or no NVML through it: ask nvidia-smi
            def smi() -> float | None:
                out = _nvidia_smi(["--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"])
                return float(out.strip()) if out.strip() else None

            return smi

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            value = self._read()
            if value is not None:
                self.samples.append(value)

    def __enter__(self) -> UtilisationSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def mean(self) -> float | None:
        return statistics.fmean(self.samples) if self.samples else None


def run_step(report: Report, name: str, argv: list[str], timeout_s: float) -> Step:
    print(f"gpu-check: {name} (at most {timeout_s:.0f} s)", flush=True)
    began = time.monotonic()
    # A session of its own, so a step stopped at its limit takes what it started with it (the
    # pytest step's servers would otherwise go on holding the GPU beside the serving step).
    process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": python_path()}, start_new_session=True)
    try:
        out, err = process.communicate(timeout=max(1.0, timeout_s))
        step = Step(name, process.returncode == 0, time.monotonic() - began, out + err)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        try:
            out, err = process.communicate(timeout=10)  # what it said before it was stopped
        except subprocess.TimeoutExpired:  # a descendant left the group and holds the pipes
            process.kill()
            out, err = "", "(its output could not be read)"
        step = Step(name, False, time.monotonic() - began, out + err + f"\n(stopped after {timeout_s:.0f} s)")
    report.steps.append(step)
    return step


def python_path() -> str:
    """The repository first, then whatever PYTHONPATH already holds (the packages installed
    beside it by ``make gpu-check-offline``), for the steps' own processes."""
    return os.pathsep.join([str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])


def bare_gpu_rates(batch: int = 64, repeats: int = 20, device_name: str = "cuda") -> dict[str, float]:
    """Images/s of mobilenet_v2's forward and of Grad-CAM (forward + partial backward) at
    ``batch`` on cuda:0 (or ``device_name``), timed with the benchmark's own code
    (service.bench) on the network as the worker serves it: batch norm folded, channels-last
    weights and inputs, cuDNN autotuning, TF32 off, and the settings the serving step's server
    reads from the environment (CAMSERVE_PRECISION: its batches' autocast)."""
    from service.bench import Bench, sample_input
    from service.cams import get_method
    from service.config import Settings
    from service.engine.worker import Worker
    from service.models.spec import embedded_default

    device = torch.device("cuda", 0) if device_name == "cuda" else torch.device(device_name)
    # As the server is configured: the serving step inherits this environment, so a
    # CAMSERVE_PRECISION=bf16 (or a lean copy turned off) must time the same network here.
    settings = Settings()
    worker = Worker(device, channels_last=settings.channels_last, fold_batch_norm=settings.fold_batch_norm,
                    precision=settings.precision)  # its load sets the backend flags, builds the lean copy
    worker.load([embedded_default()])
    (loaded,) = worker.models.values()
    image = sample_input(loaded, device)
    if settings.channels_last:  # the worker's inputs are then NHWC too
        image = image.contiguous(memory_format=torch.channels_last)
    bench = Bench(loaded, image, repeats, exact=False)
    gradcam = get_method("gradcam")
    with worker.autocast():
        forward_ms = bench.forward_ms(batch)
    with worker.autocast([gradcam]):
        gradcam_ms = bench.ours([gradcam], batch, repeats)
    return {f"forward, batch {batch}": batch / forward_ms * 1000,
            f"Grad-CAM, batch {batch}": batch / gradcam_ms * 1000}


def client_processes(concurrency: int, cores: int | None = None) -> int:
    """Load client processes for ``concurrency`` connections: a quarter of the cores (the rest
    serve), at least 1, at most one per connection."""
    return max(1, min(concurrency, (cores or usable_cores()) // 4))


def serving(report: Report, duration_s: float, device: str = "cuda", workdir: Path | None = None) -> None:
    """``python -m service`` on cuda:0 (or ``device``) with its default front ends, loaded at each
    concurrency in turn by loadtests.rawload's client processes (one httpx process would
    measure itself)."""
    from loadtests import bench_serving as bs
    from loadtests import rawload

    env = {"CAMSERVE_DEVICE": device, "CAMSERVE_MAX_BATCH_SIZE": "64", "CAMSERVE_MAX_QUEUE": "4096",
           "CAMSERVE_MAX_BATCH_DELAY_MS": "2", "CAMSERVE_MAX_CONNECTIONS": "2048"}
    config = bs.Config("gpu", bs.camserve_command("--log-level", "warning"), env, "/readyz")
    workdir = workdir or REPO / "build" / "gpu-check"  # the server's log goes there
    workdir.mkdir(parents=True, exist_ok=True)
    images = {"PNG": ("chelsea.png", bs.IMAGE.read_bytes()), "JPEG": ("chelsea.jpg", cat_jpeg())}
    (server,) = bs.launch([config], workdir)
    try:
        front_ends = bs.wait_front_ends(server.process, int(server.base.rpartition(":")[2]))
        report.facts["serving front ends"] = str(front_ends)
        failed: list[str] = []
        for case in CASES:
            concurrency = case.concurrency
            if report.left() < duration_s + 15:
                report.serving.append({"concurrency": concurrency, "image": case.image,
                                       "outputs": case.outputs, "note": "not run: the time budget was spent"})
                continue
            outcome = bs.Outcome(f"c{concurrency}")
            clients = client_processes(concurrency)
            filename, image = images[case.image]
            try:
                with UtilisationSampler() as sampler:
                    rawload.load(server.base, image, concurrency, duration_s, outcome, warm_up_s=3.0,
                                 server_pid=server.process.pid, processes=clients, filename=filename,
                                 form={**SERVING_FORM, "outputs": case.outputs})
            except Exception as exc:  # the other cases still run; the step fails at the end
                failed.append(f"{case}: {exc!r}")
                report.serving.append({"concurrency": concurrency, "image": case.image,
                                       "outputs": case.outputs, "note": f"FAILED: {exc!r}"[:300]})
                continue
            report.serving.append({
                "concurrency": concurrency, "image": case.image, "outputs": case.outputs,
                "requests": len(outcome.latencies),
                "explanations/s": outcome.throughput, "p50 ms": outcome.percentile(0.5) * 1000,
                "p99 ms": outcome.percentile(0.99) * 1000, "errors": dict(outcome.errors),
                "front ends": front_ends, "client processes": clients,
                "server CPU ms/request": outcome.cpu_ms(outcome.server_cpu_s),
                "host CPU ms/request": outcome.cpu_ms(outcome.host_cpu_s),  # outside torch threads
                "client CPU ms/request": outcome.cpu_ms(outcome.client_cpu_s),
                "GPU util % (mean)": sampler.mean(), "GPU util samples": len(sampler.samples),
            })
            print(f"gpu-check: serving {case.image} ({case.outputs}) at concurrency {concurrency} "
                  f"({front_ends} front ends, {clients} client processes): "
                  f"{outcome.throughput:.0f} explanations/s", flush=True)
        report.facts["serving mean batch"] = f"{bs.mean_batch_size(server.base) or 0:.1f}"
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(CASES)} serving cases failed: " + "; ".join(failed))
    finally:
        bs.stop([server])


def cat_jpeg(quality: int = 90) -> bytes:
    """The cat photo as a baseline JPEG, the kind the GPU decodes."""
    import io

    from PIL import Image

    from loadtests.bench_serving import IMAGE

    buffer = io.BytesIO()
    with Image.open(IMAGE) as image:
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def render(report: Report) -> str:
    lines = ["# camserve GPU check", "", f"Run {time.strftime('%Y-%m-%d %H:%M:%S %Z')} in "
             f"{time.monotonic() - report.started:.0f} s.", "", "| fact | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report.facts.items()]
    lines += ["", "## Steps", "", "| step | result | seconds |", "|---|---|---|"]
    lines += [f"| {s.name} | {'ok' if s.ok else 'FAILED'} | {s.seconds:.0f} |" for s in report.steps]
    if report.bare:
        lines += ["", f"## Bare GPU work ({report.device}, mobilenet_v2, 224x224)", "",
                  "| work | images/s |", "|---|---|"]
        lines += [f"| {k} | {v:,.0f} |" for k, v in report.bare.items()]
    if report.serving:
        keys = ["concurrency", "image", "outputs", "requests", "explanations/s", "p50 ms", "p99 ms", "errors",
                "front ends", "client processes", "server CPU ms/request", "host CPU ms/request",
                "client CPU ms/request", "GPU util % (mean)", "GPU util samples"]
        lines += ["", f"## Serving (python -m service on {report.device}; Grad-CAM on the cat photo, "
                  "base64 float16 mask, overlay PNG where the outputs say)", "",
                  "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for row in report.serving:
            if "note" in row:
                named = [_cell(row.get(k)) for k in ("concurrency", "image", "outputs")]
                lines.append("| " + " | ".join([*named, str(row["note"])]) + " |" + " |" * (len(keys) - 4))
                continue
            lines.append("| " + " | ".join(_cell(row.get(k)) for k in keys) + " |")
    for step in report.steps:
        lines += ["", f"## Output: {step.name}", "", "```", step.output.strip()[-6000:], "```"]
    return "\n".join(lines) + "\n"


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, dict):
        return ",".join(f"{k}:{v}" for k, v in value.items()) or "0"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.gpucheck", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "build" / "gpu-check", help="report folder")
    parser.add_argument("--budget-s", type=float, default=480.0, help="time for everything (default 480)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per case (default 10)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: the same steps on the CPU, to check the check (default cuda)")
    parser.add_argument("--batch", type=int, default=64, help="batch of the bare rates (default 64)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    report = Report(budget_s=args.budget_s, device="cuda:0" if args.device == "cuda" else args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    report.facts = device_facts(args.device)
    py = sys.executable
    # Reserve time for the steps after each one: bench 100 s, bare rates 30 s, serving ~90 s.
    run_step(report, "pytest -m cuda", [py, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                                        *CUDA_TESTS], report.left(reserve_s=240))
    run_step(report, f"python -m service.bench --device {args.device} --quick",
             [py, "-m", "service.bench", "--device", args.device, "--quick", "--threads", "4"],
             min(120.0, report.left(reserve_s=150)))
    began = time.monotonic()
    try:
        report.bare = bare_gpu_rates(args.batch, device_name=args.device)
        report.steps.append(Step("bare GPU rates", True, time.monotonic() - began))
    except Exception:  # the report says what failed; the other steps still run
        report.steps.append(Step("bare GPU rates", False, time.monotonic() - began, traceback.format_exc()))
    began = time.monotonic()
    try:
        serving(report, args.duration, args.device, args.out)
        report.steps.append(Step("serving benchmark", True, time.monotonic() - began))
    except Exception:
        failed = traceback.format_exc()
        report.steps.append(Step("serving benchmark", False, time.monotonic() - began, failed))
    path = args.out / "report.md"
    path.write_text(render(report))
    print(f"gpu-check: report in {path}", flush=True)
    return 0 if all(step.ok for step in report.steps) else 1


if __name__ == "__main__":
    sys.exit(main())
