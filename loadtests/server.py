"""Talk to the service before a load test: start it (``--start``), wait for it, read its catalog."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from loadtests.report import gpu_names

REPO = Path(__file__).resolve().parent.parent
POLL_INTERVAL_S = 0.25
HEAVY_FAMILIES = ("perturbation",)
# Passes that grow with the channels or with noisy copies: "1 forward per non-zero channel", "N forwards".
HEAVY_PASSES = re.compile(r"\bper\b|\bN\b")


class ServiceError(RuntimeError):
    """The service could not be started, or is not ready to be measured."""


class UsageError(Exception):
    """A request the runner refuses before sending load (unknown method, bad option...)."""


@dataclass(frozen=True)
class MethodInfo:
    name: str
    family: str
    passes: str

    @property
    def heavy(self) -> bool:
        """Perturbation methods, and any whose cost grows with channels or noise samples."""
        return self.family in HEAVY_FAMILIES or bool(HEAVY_PASSES.search(self.passes))


def _get_json(url: str, path: str, headers: dict[str, str]) -> Any:
    try:
        response = httpx.get(f"{url}{path}", headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        raise ServiceError(f"GET {url}{path} failed: {type(exc).__name__}: {exc}") from None
    if response.status_code != 200:
        raise ServiceError(f"GET {url}{path} answered {response.status_code}: {response.text[:300]}")
    return response.json()


def server_methods(url: str, headers: dict[str, str]) -> dict[str, MethodInfo]:
    body = _get_json(url, "/methods", headers)
    return {
        m["name"]: MethodInfo(m["name"], m.get("family", ""), m.get("passes", ""))
        for m in body.get("methods", [])
    }


def choose_methods(requested: str, available: dict[str, MethodInfo], url: str) -> list[MethodInfo]:
    names = [m.strip().lower() for m in requested.split(",") if m.strip()]
    if not names:
        raise UsageError("--methods is empty")
    if names == ["all"]:
        if not available:
            raise UsageError(f"the service at {url} lists no methods in GET /methods")
        return list(available.values())
    unknown = [n for n in dict.fromkeys(names) if n not in available]
    if unknown:
        raise UsageError(
            f"unknown method{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: "
            f"the service at {url} offers {', '.join(available) or 'none'} (GET /methods)"
        )
    return [available[n] for n in dict.fromkeys(names)]


def server_facts(url: str, headers: dict[str, str], model: str | None, local: bool) -> dict[str, str]:
    models = _get_json(url, "/models", headers).get("models", [])
    chosen = next(
        (m for m in models if (m.get("name") == model if model else m.get("default"))),
        models[0] if models else {},
    )
    device = str(chosen.get("device", "unknown"))
    facts = {
        "service": url + (" (started by the runner on this machine)" if local else ""),
        "model": f"{chosen.get('name', '?')} ({chosen.get('version', '?')})",
        "device": f"{device} (from GET /models)",
    }
    if device.startswith("cuda"):
        facts["GPU"] = gpu_names(device) if local else "on the server (not visible from the client)"
    return facts


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_ready(
    url: str, timeout_s: float, headers: dict[str, str] | None = None,
    process: subprocess.Popen[bytes] | None = None, log: Path | None = None,
) -> None:
    """Poll ``GET /readyz`` until it answers 200, the process exits, or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while True:
        if process is not None and process.poll() is not None:
            raise ServiceError(
                f"the service exited with status {process.returncode} before it was ready; "
                f"last lines of {log}:\n{_tail(log) if log else ''}"
            )
        try:
            response = httpx.get(f"{url}/readyz", headers=headers, timeout=5)
            if response.status_code == 200:
                return
            last = f"{response.status_code} {response.text[:300]}"
            if _state(response) == "failed":
                raise ServiceError(f"the service at {url} failed to start: {last}")
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= deadline:
            raise ServiceError(f"{url}/readyz did not answer 200 within {timeout_s:g} s (last: {last})")
        time.sleep(POLL_INTERVAL_S)


def _state(response: httpx.Response) -> str:
    try:
        return str(response.json().get("state", ""))
    except (ValueError, AttributeError):
        return ""


class StartedService:
    """``with StartedService(log) as url:`` runs the service on 127.0.0.1 until the block ends.

    The service inherits this process's environment, so ``CAMSERVE_*`` settings (device, batch
    size...) apply to it; ``api_key``, when given, becomes its ``CAMSERVE_API_KEY``. It is
    stopped with SIGTERM (a graceful drain), then killed if it has not exited after
    ``stop_timeout_s``.
    """

    def __init__(
        self, log: Path, start_timeout_s: float = 180.0, stop_timeout_s: float = 40.0,
        api_key: str | None = None,
    ) -> None:
        self.log = log
        self.api_key = api_key
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def __enter__(self) -> str:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        command = [
            sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning",
        ]
        env = os.environ.copy()
        if self.api_key:
            env["CAMSERVE_API_KEY"] = self.api_key
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        try:
            key = env.get("CAMSERVE_API_KEY")
            headers = {"Authorization": f"Bearer {key}"} if key else None
            wait_ready(self.url, self.start_timeout_s, headers, self.process, self.log)
        except BaseException:
            self.stop()
            raise
        return self.url

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
