"""``python -m service.evaluate`` on the shipped generated set, Grad-CAM only (fast)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.evaluate import Row, format_table, main

EVAL = Path(__file__).resolve().parent / "data" / "eval"


def test_gradcam_on_the_shipped_set(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    assert main([str(EVAL), "--methods", "gradcam", "--steps", "4", "--json", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"8 images in {EVAL}; model mobilenet_v2, layer features.18, 4 steps")
    correct = int(lines[0].rsplit(" ", 1)[1].split("/")[0])
    assert 6 <= correct <= 8  # the photos are small here; the model still knows most of them
    assert lines[2].split() == ["method", "pointing", "energy", "deletion", "insertion", "ins-del", "s/image"]
    name, *numbers = lines[3].split()
    assert name == "gradcam" and len(numbers) == 6
    pointing, energy, deletion, insertion, gap, _seconds = (float(n) for n in numbers)
    # The photos fill a fifth of each image; Grad-CAM finds them and its map is faithful.
    assert pointing >= 0.75
    assert energy > 0.4
    assert insertion > deletion and gap == pytest.approx(insertion - deletion, abs=2e-3)
    (row,) = json.loads(out.read_text())
    assert row["method"] == "gradcam" and row["images"] == 8 and row["error"] is None
    assert row["pointing_game"] == pytest.approx(pointing, abs=1e-3)


def test_the_table_says_why_a_method_could_not_run() -> None:
    rows = [Row("gradcam", 2, 1.0, 0.5, 0.1, 0.7, 0.02), Row("cam", 2, error="ValueError: no linear head")]
    lines = format_table(rows).splitlines()
    assert lines[1].split() == ["gradcam", "1.000", "0.500", "0.100", "0.700", "0.600", "0.020"]
    assert lines[2].split(maxsplit=1) == ["cam", "n/a: ValueError: no linear head"]


def test_unknown_methods_and_missing_labels_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="unknown method 'nope'"):
        main([str(EVAL), "--methods", "nope"])
    with pytest.raises(SystemExit, match=r"labels\.jsonl"):
        main([str(tmp_path), "--methods", "gradcam"])
