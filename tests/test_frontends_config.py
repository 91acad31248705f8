"""How ``python -m service`` sizes and configures its front ends (service.frontends), without
starting any: the count, each one's environment, its share of the cores."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from service import frontends
from service.config import Settings


def test_the_automatic_count_follows_the_cores_up_to_its_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    for cores, expected in ((1, 1), (2, 2), (6, 6), (32, frontends.MAX_AUTO_WORKERS)):
        monkeypatch.setattr(frontends, "usable_cores", lambda c=cores: c)
        assert frontends.worker_count(0) == expected
        assert frontends.worker_count(3) == 3  # asked for: as asked
    monkeypatch.delenv("CAMSERVE_WORKERS")  # tests/conftest.py pins one front end
    assert Settings().workers == 0
    assert Settings(workers=1).workers == 1


def test_the_cgroup_quota_lowers_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(frontends.os, "sched_getaffinity", lambda _pid: set(range(16)))
    monkeypatch.setattr(frontends, "_cgroup_quota", lambda: 2.5)  # docker run --cpus 2.5
    assert frontends.usable_cores() == 3
    monkeypatch.setattr(frontends, "_cgroup_quota", lambda: None)
    assert frontends.usable_cores() == 16


def test_each_front_end_gets_its_place_and_share(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(frontends, "usable_cores", lambda: 8)
    monkeypatch.delenv("CAMSERVE_TORCH_THREADS", raising=False)
    monkeypatch.setenv("CAMSERVE_DECODE_THREADS", "3")  # set by the user: kept
    env = frontends._child_env(1, 4, 7, tmp_path)
    assert env["CAMSERVE_TORCH_THREADS"] == "2" and env["CAMSERVE_DECODE_THREADS"] == "3"
    assert env["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path / "metrics")
    monkeypatch.setenv(frontends.ENV, env[frontends.ENV])
    place = frontends.current()
    assert place == frontends.FrontEnd(1, 4, 7, tmp_path, os.getpid())  # this test made the env
    assert place.jobs_dir == tmp_path / "jobs"
    assert json.loads(env[frontends.ENV])["count"] == 4


def test_a_single_process_has_no_place(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(frontends.ENV, raising=False)
    assert frontends.current() is None


def test_the_port_is_refused_when_another_server_listens(tmp_path: Path) -> None:
    import socket

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        assert frontends.supervise("127.0.0.1", port, 2, []) == frontends.EXIT_FAILED


def test_one_process_refuses_a_taken_port_before_loading_its_models(tmp_path: Path) -> None:
    # As the supervisor does: exit 1 with one line at once, not uvicorn's 3 after the models.
    import socket
    import subprocess
    import sys

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        env = {**os.environ, "CAMSERVE_WORKERS": "1", "CAMSERVE_DEVICE": "cpu"}
        done = subprocess.run([sys.executable, "-m", "service", "--port", str(port)], env=env,
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert f"cannot start: cannot listen on 127.0.0.1:{port}" in done.stderr + done.stdout
    assert "worker ready" not in done.stderr + done.stdout  # refused before any model loaded


def _lifespan_app() -> object:
    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        await send({"type": "lifespan.startup.complete"})  # type: ignore[operator]

    return app


@pytest.mark.parametrize("how", ["ready", "stopping"])
def test_a_later_front_end_starts_listening_once_ready_or_stopping(how: str) -> None:
    import asyncio

    async def scenario() -> None:
        loaded, stop = asyncio.Event(), False
        sent: list[str] = []

        async def send(message: dict[str, str]) -> None:
            sent.append(message["type"])

        wrapper = frontends.JoinWhenReady(_lifespan_app(), loaded.wait, lambda: stop)  # type: ignore[arg-type]
        startup = asyncio.create_task(wrapper({"type": "lifespan"}, None, send))  # type: ignore[arg-type]
        for _ in range(20):  # the models are loading: uvicorn is not told to listen yet
            await asyncio.sleep(0.01)
        assert sent == [] and not startup.done()
        if how == "ready":
            loaded.set()
        else:
            stop = True
        await asyncio.wait_for(startup, 10)
        assert sent == ["lifespan.startup.complete"]

    asyncio.run(scenario())
