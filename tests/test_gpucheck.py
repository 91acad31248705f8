"""``make gpu-check`` where there is no CUDA device, and the report it writes where there is one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

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
        {"concurrency": 16, "requests": 3000, "explanations/s": 1234.5, "p50 ms": 12.0, "p99 ms": 30.0,
         "errors": {}, "server CPU ms/request": 4.2, "GPU util % (mean)": 61.0, "GPU util samples": 40},
        {"concurrency": 256, "note": "not run: the time budget was spent"},
    ]
    text = gpucheck.render(report)
    for wanted in ("NVIDIA H200", "580.1", "2.14.1", "13.0", "9,876", "1,234.5", "| 16 | 3000 |",
                   "61.0", "FAILED", "RuntimeError('boom')", "not run: the time budget was spent"):
        assert wanted in text, wanted
    rows = [line for line in text.splitlines() if line.startswith("| 16 |") or line.startswith("| 256 |")]
    assert len({line.count("|") for line in rows}) == 1, "every serving row has every column"


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
