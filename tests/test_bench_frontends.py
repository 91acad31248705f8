"""The front-end benchmark's pieces (the benchmark itself runs by hand): its cheap model is a
valid registration at 96x96, and CPU time is summed over the server's processes
(``bench_serving.tree_cpu_s``, which every serving benchmark uses)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from loadtests import bench_frontends, bench_serving
from service.models.spec import read_models_file


def test_the_cheap_model_is_registered_at_96x96(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(bench_frontends.MODELS_TOML)
    (spec,) = read_models_file(path)
    assert (spec.name, spec.architecture, spec.input_size) == ("tiny", "mobilenet_v3_small", (96, 96))
    assert spec.weights is None or str(spec.weights) == "random"


def test_cpu_time_counts_the_children_too() -> None:
    # The parent sleeps; its child burns 0.3 s of CPU, then sleeps too (still alive, counted).
    child = ("import time\nend = time.process_time() + 0.3\n"
             "while time.process_time() < end: pass\ntime.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c",
                               f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {child!r}])"])
    try:
        def children_cpu_s() -> float:
            return (bench_serving.tree_cpu_s(parent.pid) or 0.0) - (
                bench_serving.process_cpu_s(parent.pid) or 0.0)

        deadline = time.monotonic() + 60
        while children_cpu_s() < 0.25:
            assert time.monotonic() < deadline, "the child's CPU time was never counted"
            time.sleep(0.05)
    finally:
        for pid in Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split():
            os.kill(int(pid), signal.SIGKILL)
        parent.kill()
        parent.wait()
