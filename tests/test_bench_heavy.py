"""The heavy-load benchmark runs end to end and reports its three ratios (values not asserted)."""

from __future__ import annotations

import pytest

from loadtests import bench_heavy


def test_report_prints_the_three_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    numbers = {
        "light_p50_alone_ms": 40.0, "light_p99_alone_ms": 60.0, "light_p50_loaded_ms": 60.0,
        "light_p99_loaded_ms": 120.0, "light_rps_alone": 20.0, "light_rps_loaded": 15.0,
        "heavy_alone_s": 10.0, "heavy_loaded_s": 12.0,
    }
    ratios = bench_heavy.report(numbers)
    assert list(ratios.values()) == pytest.approx([1.5, 2.0, 1.2])
    out = capsys.readouterr().out
    assert "1.50x" in out and "2.00x" in out and "1.20x" in out
    # light keeps 15/20 of its throughput, heavy 10/12 of its speed
    assert "light 0.75 + heavy 0.83 = 1.58" in out


@pytest.mark.slow
def test_the_benchmark_runs_against_a_real_server(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_heavy.main(["--duration", "1", "--concurrency", "2",
                             "--heavy-params", '{"top_k_channels": 24}']) == 0
    out = capsys.readouterr().out
    assert "light alone:" in out and "both:" in out
    assert out.count("x\n") >= 3  # the three ratio lines
    assert "server cores busy: light alone" in out
