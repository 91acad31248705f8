"""README.md as a newcomer runs it: every command block, pasted into a fresh shell at the root.

Each ```sh, ```bash or ```python block is run as written, against a real service this module
starts the way ``make run`` does, except blocks marked on the line just above them:

- ``<!-- readme-test: skip docker|gpu|cluster -->``: needs what this machine may not have; not
  collected, and the reason is checked against what the block runs (only ``docker`` commands
  under "docker", and so on);
- ``<!-- readme-test: server -->``: starts the service and would serve forever; its commands are
  checked to be the start this module performs itself (``make run`` is expanded with
  ``make -n``, other starts have their options parsed with ``--help`` and their settings read);
- ``<!-- readme-test: dry-run -->``: ``make test`` (the suite this file belongs to) and
  ``make loadtest`` (minutes): expanded with ``make -n``, which must succeed.

Blocks run in a scratch copy of the checkout (files copied, folders linked, ``.venv`` linked to
the virtualenv running these tests) so what they write (``overlay.png``, ``build/lt``) lands
there; the README's ``http://127.0.0.1:8000`` becomes the test server's address; ``PATH`` and
the environment are a fresh shell's (no virtualenv on ``PATH``, no ``PYTHONPATH``, no
``CAMSERVE_*``). A block passes when it exits 0, prints or writes something, prints no error
body of the service, and what it prints or writes is well formed (JSON parses, PNGs have the
signature, CSVs have rows).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from loadtests.server import free_port, wait_ready

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PERFORMANCE = ROOT / "docs" / "performance.md"
README_URL = "http://127.0.0.1:8000"
SHELLS = frozenset({"sh", "bash"})
COMMAND_LANGUAGES = SHELLS | {"python"}
SKIP_REASONS = frozenset({"docker", "gpu", "cluster"})
BLOCK_TIMEOUT_S = 240
# Not copied into the scratch checkout: history, environments, caches and earlier outputs.
NOT_COPIED = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".mypy_cache",
              ".ruff_cache", ".hypothesis", "overlay.png"}
VENV_PYTHON = ".venv/bin/python"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>\S*)\s*$")
CLOSING_FENCE = re.compile(r"^[ \t]*```\s*$")
MARKER = re.compile(r"^\s*<!--\s*readme-test:\s*(?P<what>[^>]*?)\s*-->\s*$")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
LOCAL_ADDRESS = re.compile(r"\b(?:127\.0\.0\.1|localhost|0\.0\.0\.0):\d+")


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    marker: str | None

    @property
    def is_command(self) -> bool:
        return self.lang in COMMAND_LANGUAGES

    @property
    def runnable(self) -> bool:
        return self.is_command and self.marker is None

    def commands(self) -> list[list[str]]:
        """Each shell command of the block as words: continuations joined, comments dropped."""
        assert self.lang in SHELLS, f"README.md:{self.line}: not a shell block"
        joined = re.sub(r"\\\n", " ", self.text)
        return [words for line in joined.splitlines() if (words := shlex.split(line, comments=True))]


def parse_blocks(text: str) -> list[Block]:
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not CLOSING_FENCE.match(lines[i]):
            body.append(lines[i])
            i += 1
        assert i < len(lines), f"README.md:{start + 1}: code fence never closed"
        above = start - 1
        while above >= 0 and not lines[above].strip():
            above -= 1
        marker = MARKER.match(lines[above]) if above >= 0 else None
        blocks.append(Block(start + 1, opening["lang"], textwrap.dedent("\n".join(body)) + "\n",
                            marker["what"] if marker else None))
        i += 1
    return blocks


README_TEXT = README.read_text(encoding="utf-8")
BLOCKS = parse_blocks(README_TEXT)
RUNNABLE = [b for b in BLOCKS if b.runnable]


def marked(kind: str) -> list[Block]:
    return [b for b in BLOCKS if b.marker == kind]


def block_id(block: Block) -> str:
    return f"line{block.line}-{block.lang}"


def fresh_env(assignments: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment as a new login shell would have it: no virtualenv, no project."""
    venv_bin = str(Path(sys.prefix) / "bin")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CAMSERVE_") and k not in {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"}}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and not p.startswith(venv_bin))
    env.update(assignments or {})
    return env


def scratch_checkout(where: Path) -> Path:
    """A copy of the checkout to run commands in: files copied, folders linked, .venv ours."""
    venv = Path(sys.prefix)
    assert (venv / "bin" / "python").exists(), (
        f"run the tests from the project's virtualenv (make test); {venv} has no bin/python")
    where.mkdir(parents=True, exist_ok=True)
    for entry in ROOT.iterdir():
        if entry.name in NOT_COPIED or entry.name.endswith(".egg-info"):
            continue
        if entry.is_dir():
            (where / entry.name).symlink_to(entry, target_is_directory=True)
        else:
            shutil.copy2(entry, where / entry.name)
    (where / ".venv").symlink_to(venv, target_is_directory=True)
    return where


def written_files(where: Path) -> set[Path]:
    """Files under ``where`` itself: linked folders are not followed."""
    found = set()
    for folder, _, files in os.walk(where, followlinks=False):
        found.update(Path(folder, name) for name in files)
    return {f for f in found if not f.is_symlink()}


def make_dry_run(where: Path, words: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "-n", *words[1:]], cwd=where, env=fresh_env(),
                          capture_output=True, text=True, timeout=60)


def make_run_command(where: Path, *variables: str) -> list[str]:
    """What ``make run VAR=...`` starts once the install is done (``-o install``)."""
    expanded = subprocess.run(["make", "-n", "-o", "install", "run", *variables], cwd=where,
                              env=fresh_env(), capture_output=True, text=True, timeout=60)
    assert expanded.returncode == 0, expanded.stderr
    lines = [line for line in expanded.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"make run should start one command, it runs: {lines}"
    return shlex.split(lines[0])


@pytest.fixture(scope="module")
def readme_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The service, started in a scratch checkout exactly as ``make run PORT=N`` starts it."""
    where = scratch_checkout(tmp_path_factory.mktemp("readme-service"))
    port = free_port()
    command = make_run_command(where, "HOST=127.0.0.1", f"PORT={port}")
    assert command[:3] == [VENV_PYTHON, "-m", "service"], command
    log = where / "service.log"
    # Warm-up is tested elsewhere (tests/engine); without it the service is ready sooner.
    env = fresh_env({"CAMSERVE_WARMUP": "false"})
    with log.open("wb") as out:
        process = subprocess.Popen([str(where / command[0]), *command[1:]], cwd=where, env=env,
                                   stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, 240, process=process, log=log)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def check_written(path: Path) -> None:
    data = path.read_bytes()
    assert data, f"{path.name} is empty"
    if path.suffix == ".png":
        assert data.startswith(PNG_SIGNATURE), f"{path.name} is not a PNG"
    elif path.suffix == ".json":
        json.loads(data)
    elif path.suffix == ".csv":
        rows = list(csv.reader(data.decode().splitlines()))
        assert len(rows) >= 2, f"{path.name} has no rows under its header"


# The service's error body, as curl prints it or as json.tool indents it.
ERROR_BODY = re.compile(r'\{\s*"error"\s*:\s*\{')


def check_printed(stdout: str) -> None:
    assert not ERROR_BODY.search(stdout), f"the service refused: {stdout[:2000]}"
    if not stdout.lstrip().startswith(("{", "[")):
        return  # text, such as a table or the client's lines
    # JSON, maybe several documents one after the other (curl adds no newline): all must parse.
    decoder, at = json.JSONDecoder(), 0
    while (at := len(stdout) - len(stdout[at:].lstrip())) < len(stdout):
        _, at = decoder.raw_decode(stdout, at)


@pytest.mark.parametrize("block", RUNNABLE, ids=block_id)
def test_readme_block_runs(block: Block, readme_service: str, tmp_path: Path) -> None:
    where = scratch_checkout(tmp_path / "checkout")
    before = written_files(where)
    text = block.text.replace(README_URL, readme_service)
    if block.lang == "python":
        command = [str(where / VENV_PYTHON), "-"]
    else:
        command = ["bash", "-e", "-o", "pipefail", "-c", text]
    done = subprocess.run(command, input=text if block.lang == "python" else None, cwd=where,
                          env=fresh_env(), capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    report = (f"README.md:{block.line}\n{block.text}\n"
              f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}")
    assert done.returncode == 0, report
    written = written_files(where) - before
    # Locust prints its statistics on stderr; what matters is that something came back.
    assert done.stdout.strip() or done.stderr.strip() or written, f"printed and wrote nothing\n{report}"
    check_printed(done.stdout)
    for path in written:
        check_written(path)


def test_every_block_runs_or_is_marked_for_a_reason_it_shows() -> None:
    assert RUNNABLE, "README.md has no command block to run"
    unlabelled = [b.line for b in BLOCKS if not b.lang]
    assert not unlabelled, f"code blocks without a language (a command could hide there): {unlabelled}"
    marker_lines = {i + 1 for i, line in enumerate(README_TEXT.splitlines()) if MARKER.match(line)}
    on_blocks = {b.line for b in BLOCKS if b.marker is not None}
    assert len(marker_lines) == len(on_blocks), "a readme-test marker is not just above a code block"
    for block in BLOCKS:
        if block.marker is None:
            continue
        where = f"README.md:{block.line}"
        assert block.lang in SHELLS, f"{where}: marker on a {block.lang or 'plain'} block"
        kind, _, reason = block.marker.partition(" ")
        assert block.marker in {"server", "dry-run"} or (kind == "skip" and reason in SKIP_REASONS), (
            f"{where}: unknown marker {block.marker!r}; allowed: server, dry-run, "
            f"skip {'|'.join(sorted(SKIP_REASONS))}")
        for words in block.commands():
            line = " ".join(words)
            if reason == "docker":
                assert words[0] == "docker", f"{where}: {line!r} is skipped for Docker but needs none"
            elif reason == "gpu":
                assert re.search(r"gpu|cuda", line, re.I), f"{where}: {line!r} does not need a GPU"
            elif reason == "cluster":
                remote = re.search(r"https?://(?!127\.0\.0\.1|localhost)", line)
                ray = Path(words[0]).name == "ray" or "service.ray_serve" in words
                assert remote or ray, f"{where}: {line!r} needs no cluster or remote service"
    for block in RUNNABLE:
        addresses = set(LOCAL_ADDRESS.findall(block.text))
        assert addresses <= {README_URL.removeprefix("http://")}, (
            f"README.md:{block.line}: runnable blocks reach the service at {README_URL}, not {addresses}")


def settings_table_names() -> set[str]:
    return set(re.findall(r"^\| `(CAMSERVE_[A-Z0-9_]+)` \|", README_TEXT, re.M))


def test_server_blocks_start_the_service_as_this_test_does(tmp_path: Path) -> None:
    where = scratch_checkout(tmp_path / "checkout")
    blocks = marked("server")
    assert blocks, "README.md shows no command that starts the service"
    documented = settings_table_names()
    for block in blocks:
        for words in block.commands():
            assignments = {}
            while words and ASSIGNMENT.match(words[0]):
                name, _, value = words.pop(0).partition("=")
                assignments[name] = value
            line = f"README.md:{block.line}: {' '.join(words)}"
            unknown = {n for n in assignments if n.startswith("CAMSERVE_")} - documented
            assert not unknown, f"{line}: settings missing from the Settings table: {unknown}"
            if words[0] == "make":
                assert words[1] == "run" and all(ASSIGNMENT.match(w) for w in words[2:]), line
                # The test's own service is started from this same expansion (readme_service).
                words = make_run_command(where, *words[2:])
            assert words[:3] == [VENV_PYTHON, "-m", "service"], f"{line}: not a start of the service"
            env = fresh_env(assignments)
            options = subprocess.run([str(where / VENV_PYTHON), *words[1:], "--help"], cwd=where,
                                     env=env, capture_output=True, text=True, timeout=120)
            assert options.returncode == 0 and "--port" in options.stdout, f"{line}\n{options.stderr}"
            settings = subprocess.run(
                [str(where / VENV_PYTHON), "-c", "from service.config import get_settings; get_settings()"],
                cwd=where, env=env, capture_output=True, text=True, timeout=120)
            assert settings.returncode == 0, f"{line}: the settings are refused\n{settings.stderr}"


def test_dry_run_blocks_are_make_targets_that_expand(tmp_path: Path) -> None:
    where = scratch_checkout(tmp_path / "checkout")
    blocks = marked("dry-run")
    assert any(["make", "test"] in b.commands() for b in blocks), "make test is not in a dry-run block"
    for block in blocks:
        for words in block.commands():
            line = f"README.md:{block.line}: {' '.join(words)}"
            assert words[0] == "make" and len(words) >= 2, f"{line}: only make targets are dry-run"
            expanded = make_dry_run(where, words)
            assert expanded.returncode == 0, f"{line}\n{expanded.stderr}"
            assert expanded.stdout.strip(), f"{line}: make -n shows nothing it would run"


def test_console_script_is_the_server_start() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["camserve"].partition(":")
    assert module == "service.__main__", scripts
    # In a child process: importing service.__main__ sets OpenMP's environment (service.openmp).
    shown = subprocess.run([sys.executable, "-c", f"import {module}; {module}.{function}(['--help'])"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "--port" in shown.stdout and "--host" in shown.stdout


def test_performance_tables_say_when_where_and_at_which_commit() -> None:
    assert "docs/performance.md" in README_TEXT, "README.md does not point to docs/performance.md"
    text = PERFORMANCE.read_text(encoding="utf-8")
    assert re.search(r"2 vCPUs.*24 GiB.*no GPU", text, re.S), "docs/performance.md does not name its machine"
    sections = re.split(r"^#{2,3} ", text, flags=re.M)
    tables = 0
    for section in sections:
        if not re.search(r"^\|.*\|\n\|[-| :]+\|$", section, re.M):
            continue
        tables += 1
        title = section.splitlines()[0]
        assert re.search(r"\b20\d\d-\d\d-\d\d\b", section), f"{title}: a table without its date"
        assert re.search(r"commits? `[0-9a-f]{7,40}`", section), f"{title}: a table without its commit"
    assert tables >= 3, "docs/performance.md has lost its tables"
