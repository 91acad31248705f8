"""The load-test runner: a short real sweep, and its behaviour against a stand-in service.

The runner always runs as ``python -m loadtests`` in a subprocess: Locust monkey-patches the
standard library for gevent, which must not happen inside the test process.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from loadtests.report import COLUMNS, percentile, summarise
from loadtests.server import MethodInfo, UsageError, choose_methods

REPO = Path(__file__).resolve().parent.parent
RESULT_COLUMNS = [
    "method", "concurrency", "requests", "failures", "rps", "p50_ms", "p90_ms", "p95_ms", "p99_ms",
]
SPLIT_COLUMNS = ["queue_mean_ms", "compute_mean_ms", "encode_mean_ms"]


def run_loadtests(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loadtests", *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
    )


def read_rows(out: Path) -> tuple[list[str], list[dict[str, str]]]:
    with (out / "results.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def check_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        assert image.width > 200 and image.height > 200


@pytest.mark.slow
def test_short_sweep_against_the_started_service(tmp_path: Path) -> None:
    out = tmp_path / "report"
    done = run_loadtests(
        "--start", "--methods", "gradcam", "--concurrency", "1,2", "--duration", "3",
        "--warmup", "1", "--out", str(out),
    )
    assert done.returncode == 0, done.stderr[-3000:]

    columns, rows = read_rows(out)
    assert columns[: len(RESULT_COLUMNS)] == RESULT_COLUMNS
    assert columns[len(RESULT_COLUMNS): len(RESULT_COLUMNS) + 3] == SPLIT_COLUMNS
    assert [(r["method"], r["concurrency"]) for r in rows] == [("gradcam", "1"), ("gradcam", "2")]
    for row in rows:
        assert int(row["requests"]) > 0, row
        assert int(row["failures"]) == 0, row
        assert float(row["rps"]) > 0, row
        p50, p90, p95, p99 = (float(row[f"p{p}_ms"]) for p in (50, 90, 95, 99))
        assert 0 < p50 <= p90 <= p95 <= p99, row
        # The split comes from the responses' timing_ms: compute is part of the server's total.
        assert 0 < float(row["compute_mean_ms"]) <= float(row["server_total_mean_ms"]), row
        assert float(row["queue_mean_ms"]) >= 0 and float(row["encode_mean_ms"]) > 0, row

    report = (out / "report.md").read_text()
    assert "| method | concurrency | requests | failures | rps | p50 ms" in report
    assert "| gradcam | 1 |" in report and "| gradcam | 2 |" in report
    for fact in ("| CPU |", "| cores |", "| memory |", "| torch |", "| device | cpu"):
        assert fact in report
    assert "latency.png" in report
    check_png(out / "latency.png")
    assert "gradcam" in done.stdout  # the table is printed too
    assert "service exited" not in done.stderr


# --- a stand-in service: fast, fully controlled ---------------------------------------------------


class StandIn(ThreadingHTTPServer):
    daemon_threads = True
    api_key = "s3cret"
    fail_every = 0  # answer 503 to every n-th /explain
    too_slow: frozenset[str] = frozenset()  # methods answered 504 (deadline passed)
    explains = 0
    methods_seen: set[str]
    deadlines_seen: set[str | None]
    params_seen: dict[str, set[str]]
    lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: StandIn

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _send(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        if self.headers.get("Authorization") == f"Bearer {self.server.api_key}":
            return True
        self._send(401, {"error": {"code": "unauthorized", "message": "bad key", "request_id": "x"}})
        return False

    def do_GET(self) -> None:
        if self.path == "/readyz":
            self._send(200, {"status": "ready", "state": "ready", "queue_depth": 0})
        elif not self._authorised():
            return
        elif self.path == "/methods":
            self._send(200, {"methods": [
                {"name": "gradcam", "family": "gradient", "passes": "1 forward + 1 backward (shared)"},
                {"name": "scorecam", "family": "perturbation", "passes": "1 forward per channel"},
            ]})
        elif self.path == "/models":
            self._send(200, {"models": [
                {"name": "stand_in", "version": "1", "device": "cpu", "default": True},
            ]})
        else:
            self._send(404, {"error": {"code": "not_found", "message": "no", "request_id": "x"}})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if not self._authorised():
            return
        method = body.split(b'name="methods"\r\n\r\n', 1)[1].split(b"\r\n", 1)[0].decode()
        with self.server.lock:
            self.server.explains += 1
            count = self.server.explains
            self.server.methods_seen.add(method)
            self.server.deadlines_seen.add(self.headers.get("X-Request-Timeout"))
            params = body.split(b'name="method_params"\r\n\r\n', 1)[1:]
            self.server.params_seen.setdefault(method, set()).add(
                params[0].split(b"\r\n", 1)[0].decode() if params else ""
            )
        has_image = b'name="file"; filename="' in body and b"\x89PNG" in body
        if self.path != "/explain" or not has_image:
            self._send(400, {"error": {"code": "bad_request", "message": "no file", "request_id": "x"}})
        elif method in self.server.too_slow:
            self._send(504, {"error": {"code": "deadline_exceeded", "message": "late", "request_id": "x"}})
        elif self.server.fail_every and count % self.server.fail_every == 0:
            self._send(503, {"error": {"code": "queue_full", "message": "busy", "request_id": "x"}})
        else:
            timing = {"queue": 0.5, "compute": 2.0, "encode": 1.0, "total": 3.5}
            self._send(200, {"request_id": "x", "results": [], "timing_ms": timing})


@pytest.fixture
def stand_in() -> Iterator[StandIn]:
    server = StandIn(("127.0.0.1", 0), Handler)
    server.methods_seen = set()
    server.deadlines_seen = set()
    server.params_seen = {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _url(server: StandIn) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def test_unknown_methods_are_refused_with_the_ones_the_service_offers(
    stand_in: StandIn, tmp_path: Path
) -> None:
    done = run_loadtests(
        "--url", _url(stand_in), "--api-key", stand_in.api_key, "--methods", "gradcam,layercam",
        "--concurrency", "1", "--duration", "1", "--out", str(tmp_path / "out"),
    )
    assert done.returncode == 2
    assert "unknown method 'layercam'" in done.stderr
    assert "offers gradcam, scorecam" in done.stderr
    assert stand_in.explains == 0  # refused before any load
    assert not (tmp_path / "out" / "results.csv").exists()


def test_a_wrong_api_key_stops_the_run_at_warm_up(stand_in: StandIn, tmp_path: Path) -> None:
    done = run_loadtests(
        "--url", _url(stand_in), "--api-key", "wrong", "--methods", "gradcam",
        "--concurrency", "1", "--duration", "1", "--out", str(tmp_path),
    )
    assert done.returncode == 2
    assert "401" in done.stderr


def test_fixed_rate_mode_counts_failures_and_reports_them(stand_in: StandIn, tmp_path: Path) -> None:
    stand_in.fail_every = 5
    done = run_loadtests(
        "--url", _url(stand_in), "--api-key", stand_in.api_key, "--methods", "all",
        "--rate", "20", "--no-heavy-rate", "--heavy-concurrency", "1", "--duration", "2",
        "--warmup", "0", "--deadline", "12", "--out", str(tmp_path),
        "--method-params", '{"scorecam": {"top_k_channels": 8}, "sscam": {"num_samples": 2}}',
    )
    assert done.returncode == 0, done.stderr[-3000:]
    _, rows = read_rows(tmp_path)
    by_key = {(r["method"], r["mode"]): r for r in rows}
    # gradcam: open loop only (no --concurrency); scorecam, a perturbation method: concurrency 1 only.
    assert set(by_key) == {("gradcam", "open"), ("scorecam", "closed")}
    opened = by_key["gradcam", "open"]
    assert opened["target_rps"] == "20" and opened["concurrency"] == ""
    # 20/s for 2 s, whatever the answers: every 5th of them is a 503.
    assert 38 <= int(opened["requests"]) <= 41
    assert int(opened["failures"]) >= 7
    assert float(opened["compute_mean_ms"]) == pytest.approx(2.0)
    assert by_key["scorecam", "closed"]["concurrency"] == "1"
    assert stand_in.methods_seen == {"gradcam", "scorecam"}
    assert stand_in.deadlines_seen == {"12"}  # --deadline travels as X-Request-Timeout
    # Each method gets its own parameters, and only those (the service rejects any other key).
    assert stand_in.params_seen == {"gradcam": {""}, "scorecam": {'{"scorecam": {"top_k_channels": 8}}'}}

    report = (tmp_path / "report.md").read_text()
    assert "Fixed request rate (open loop)" in report
    assert "| gradcam | 20 |" in report
    assert "503 queue_full: busy" in report
    assert "scorecam is a heavy method (perturbation: 1 forward per channel)" in report
    check_png(tmp_path / "latency.png")


def test_a_method_that_fails_its_warm_up_is_skipped_and_the_others_measured(
    stand_in: StandIn, tmp_path: Path
) -> None:
    stand_in.too_slow = frozenset({"gradcam"})
    done = run_loadtests(
        "--url", _url(stand_in), "--api-key", stand_in.api_key, "--methods", "all",
        "--concurrency", "2", "--duration", "1", "--warmup", "1", "--out", str(tmp_path),
    )
    assert done.returncode == 1
    assert "gradcam not measured" in done.stderr and "504 deadline_exceeded" in done.stderr
    _, rows = read_rows(tmp_path)
    assert [(r["method"], r["concurrency"]) for r in rows] == [("scorecam", "2")]
    assert int(rows[0]["requests"]) > 0 and rows[0]["failures"] == "0"
    assert "gradcam not measured" in (tmp_path / "report.md").read_text()


# --- the pure parts -------------------------------------------------------------------------------


def test_percentiles_interpolate_between_ranks() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0


def test_summary_keeps_failures_out_of_the_percentiles() -> None:
    timing = {"queue": 1.0, "compute": 10.0, "encode": 2.0, "total": 13.0}
    outcomes = [(True, 20.0, "", timing), (True, 40.0, "", timing), (False, 0.5, "503 busy", None)]
    row = summarise("gradcam", "closed", 4, 2.0, outcomes)
    assert (row.requests, row.failures, row.rps) == (3, 1, 1.0)
    assert row.percentiles_ms[50] == pytest.approx(30.0)
    assert row.split_ms["compute"] == pytest.approx(10.0)
    assert row.errors == {"503 busy": 1}
    assert list(row.csv_row()) == list(COLUMNS)


def test_method_choice() -> None:
    offered = {
        "gradcam": MethodInfo("gradcam", "gradient", "1 forward + 1 backward (shared)"),
        "scorecam": MethodInfo("scorecam", "perturbation", "K"),
    }
    assert [m.name for m in choose_methods("all", offered, "u")] == ["gradcam", "scorecam"]
    assert [m.name for m in choose_methods("ScoreCAM, gradcam", offered, "u")] == ["scorecam", "gradcam"]
    assert choose_methods("scorecam", offered, "u")[0].heavy
    assert not offered["gradcam"].heavy
    assert MethodInfo("smoothgradcampp", "gradient", "N forward and backward (noisy copies)").heavy
    with pytest.raises(UsageError, match=r"unknown methods 'a', 'b': the service at u offers gradcam"):
        choose_methods("a,gradcam,b", offered, "u")
