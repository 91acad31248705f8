"""A models file is operator input too: paths stay in its folder, and a file that cannot be
used stops ``python -m service`` with one clear line (exit 1), never a traceback."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from service.models.spec import ModelsFileError, read_models_file

ROOT = Path(__file__).resolve().parents[2]
DEEP = 100_000


def entry(**fields: object) -> dict[str, object]:
    return {"name": "m", "architecture": "resnet18", "num_classes": 3, **fields}


@pytest.mark.parametrize("labels", ["../../../../etc/passwd", "/etc/passwd", "sub/../../x.txt",
                                    "~/labels.txt"])
def test_labels_outside_the_folder_are_refused(tmp_path: Path, labels: str) -> None:
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"models": [entry(labels=labels)]}))
    with pytest.raises(ModelsFileError, match="outside the models file's folder"):
        read_models_file(path)


def test_weights_outside_the_folder_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text('[[models]]\nname = "m"\narchitecture = "resnet18"\n'
                    f'weights = "../w.pt"\nsha256 = "{"a" * 64}"\n')
    with pytest.raises(ModelsFileError, match=re.escape("weights '../w.pt' lies outside")):
        read_models_file(path)


def test_paths_inside_the_folder_still_work(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "labels.txt").write_text("a\nb\nc\n")
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"models": [
        entry(labels="sub/./labels.txt"), entry(name="n", labels=str(tmp_path / "sub" / "labels.txt"))]}))
    specs = read_models_file(path)
    assert [spec.labels for spec in specs] == [tmp_path / "sub" / "labels.txt"] * 2


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_deeply_nested_models_file_is_a_models_file_error(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"models{suffix}"
    nested = "[" * DEEP + "]" * DEEP
    path.write_text(f'{{"models": {nested}}}' if suffix == ".json" else f"models = {nested}\n")
    with pytest.raises(ModelsFileError, match="nested too deeply"):
        read_models_file(path)


def start(tmp_path: Path, models_file: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CAMSERVE_MODELS_FILE": str(models_file), "CAMSERVE_DEVICE": "cpu"}
    return subprocess.run([sys.executable, "-m", "service", "--port", "1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("content", [
    json.dumps({"models": [entry(labels="../../../../etc/passwd")]}),
    '{"models": ' + "[" * DEEP + "]" * DEEP + "}",
    '{"models": [',
])
def test_python_m_service_stops_with_one_clear_line(tmp_path: Path, content: str) -> None:
    path = tmp_path / "models.json"
    path.write_text(content)
    done = start(tmp_path, path)
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    record = json.loads(lines[0])
    assert record["level"] == "error" and record["message"].startswith("cannot start:")
    assert str(path) in record["message"]
    assert "Traceback" not in done.stderr and "root:" not in done.stdout
