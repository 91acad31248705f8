"""``python loadtests/named_threads.py -m MODULE ARGS...``: run MODULE with every Python thread's
operating-system name set to its Python name (the first 15 bytes), so /proc/<pid>/task/*/comm
tells the threads apart.

The serving benchmark starts its servers through this to split a server's CPU time between
the worker's torch threads and the host work (HTTP, decoding, rendering, JSON): the worker's
thread is ``camserve-worker-...`` and the OpenMP threads torch starts from it inherit that name.
It works on any commit of the service, so an old commit's server is measured the same way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib
import os
import runpy
import sys
import threading
from typing import Any

WORKER_PREFIX = "camserve-worker"  # the OS name (15 bytes) of every camserve-worker-* thread
_PR_SET_NAME = 15


def set_os_name(name: str) -> bool:
    """Name the calling thread for the kernel (Linux only); False where that is not possible."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        return int(libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def install() -> None:
    """Every thread started from now on takes its Python name as its OS name."""
    original = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]

    def named(self: threading.Thread, *args: Any, **kwargs: Any) -> Any:
        set_os_name(self.name)
        return original(self, *args, **kwargs)

    threading.Thread._bootstrap_inner = named  # type: ignore[attr-defined]


def name_front_ends() -> None:
    """With several front ends (``CAMSERVE_WORKERS``) the supervisor starts each as ``python -m
    service``: start them through this script too, or their threads keep the name ``python`` and
    the benchmark cannot tell their torch threads from their host work. A commit without
    front ends has nothing to change."""
    try:
        frontends = importlib.import_module("service.frontends")
    except ImportError:
        return
    original = getattr(frontends, "_child_command", None)
    if original is None:
        return
    script = os.path.abspath(__file__)

    def through_this_script(argv: list[str]) -> list[str]:
        command = list(original(argv))
        return [command[0], script, *command[1:]] if command[1:2] == ["-m"] else command

    setattr(frontends, "_child_command", through_this_script)  # noqa: B010  (a module global, looked up per call)


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] != "-m":
        raise SystemExit("usage: python -m loadtests.named_threads -m MODULE [ARGS...]")
    install()
    # As ``python -m`` would: the working directory first, not this file's folder, so the
    # service imported is the one in the directory the server was started in.
    sys.path[0] = os.getcwd()
    if argv[1] == "service" or argv[1].startswith("service."):
        name_front_ends()
    sys.argv = [argv[1], *argv[2:]]
    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
