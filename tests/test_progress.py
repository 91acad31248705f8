"""Command-line progress: a bar on a terminal, one plain line per step elsewhere."""

from __future__ import annotations

import io

from service.progress import tracked


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    assert list(tracked(["gradcam", "scorecam"], 2, "evaluating", stream=out)) == ["gradcam", "scorecam"]
    lines = out.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == ["evaluating: 1/2 gradcam", "evaluating: 2/2 scorecam"]
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_a_bar_on_a_terminal() -> None:
    out = Terminal()
    assert list(tracked(range(3), 3, "load test", label=lambda n: f"method {n}", stream=out)) == [0, 1, 2]
    drawn = out.getvalue()
    assert "load test" in drawn and "3/3" in drawn and "\r" in drawn and "method 2" in drawn
