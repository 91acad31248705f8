"""Worker slots: one dedicated thread per device, owning that device's model replicas.

A slot runs its worker's calls one at a time on its own thread, so torch objects never leave
it and the event loop never blocks. An ``Exception`` from a call comes back to the caller; a
``BaseException`` (``SystemExit``, an interpreter-level abort) ends the thread, the caller
gets :class:`WorkerDied`, and :meth:`WorkerSlot.replace` builds a fresh worker on a fresh
thread. Tests hand the engine a factory that builds fakes, so the batching, fault and drain
logic runs without torch (like httpx's ``MockTransport``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from service.cams import passes
from service.engine.jobs import ItemResult, WorkItem
from service.engine.turns import DeviceTurns
from service.models.catalog import ModelInfo
from service.models.spec import ModelSpec

log = logging.getLogger(__name__)


class WorkerLike(Protocol):
    """What the engine needs from a worker; :class:`service.engine.worker.Worker` is the real one."""

    def load(self, specs: Sequence[ModelSpec]) -> dict[str, ModelInfo]: ...

    def warm_up(self, batch_sizes: Sequence[int]) -> None: ...

    # Optional: ``release_memory()``, called on the worker's thread after an out-of-memory
    # error, returns cached device memory (the torch worker empties CUDA's cache).

    def compute(self, items: Sequence[WorkItem]) -> list[ItemResult]: ...


WorkerFactory = Callable[[torch.device], WorkerLike]


class WorkerDied(RuntimeError):
    """The worker's thread ended (or was never running); the slot must be replaced."""


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA (or MPS) ran out of memory: a smaller batch may still fit."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc)
    )


# Messages of the CUDA errors that leave the process's CUDA context unusable ("sticky"): every
# later kernel launch on it fails too, so only a new process can serve again.
_STICKY_CUDA_ERRORS = (
    "device-side assert triggered",
    "an illegal memory access was encountered",
    "illegal instruction",
    "misaligned address",
    "unspecified launch failure",
    "uncorrectable ecc error",
    "unrecoverable",
    "cuda error: launch timed out",
    "hardware stack error",
    "cublas_status_execution_failed",
    "cudnn_status_execution_failed",
    "cudnn_status_internal_error",
)


def is_fatal_device_error(exc: BaseException) -> bool:
    """A CUDA error after which the device cannot be used again in this process (a
    device-side assert, an illegal memory access, ...): the service must answer 503 and exit
    so that its container restarts. Out-of-memory is not one (a smaller batch may fit).

    Every ``torch.AcceleratorError`` counts: the few CUDA errors that leave the context usable
    cost one restart when taken for fatal, while a sticky one taken for an ordinary error
    fails every request until someone restarts the process by hand."""
    if is_out_of_memory(exc) or not isinstance(exc, RuntimeError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)  # torch >= 2.8
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    message = str(exc).lower()
    return any(sign in message for sign in _STICKY_CUDA_ERRORS) and (
        "cuda" in message or "cublas" in message or "cudnn" in message
    )


_Call = tuple[Callable[..., Any], tuple[Any, ...], "concurrent.futures.Future[Any]"]


class WorkerThread:
    """A thread that runs the calls it is given in order, one at a time, each holding the
    device's light turn (:mod:`service.engine.turns`) while it runs."""

    def __init__(self, name: str, turns: DeviceTurns | None = None) -> None:
        self._turns = turns or DeviceTurns()
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while (call := self._calls.get()) is not None:
            self._one(*call)
            del call  # no reference to the last call's arguments or error while waiting

    def _one(self, fn: Callable[..., Any], args: tuple[Any, ...],
             future: concurrent.futures.Future[Any]) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            with self._turns.light():
                result = fn(*args)
        except Exception as exc:
            future.set_exception(exc)
        except BaseException as exc:
            future.set_exception(WorkerDied(f"the worker thread ended: {exc!r}"))
            raise
        else:
            future.set_result(result)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if not self.alive:
            raise WorkerDied(f"the worker thread {self._thread.name} is not running")
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._calls.put((fn, args, future))
        return await asyncio.wrap_future(future)

    def close(self, timeout_s: float = 5.0) -> None:
        """Let the current call finish, then end the thread (waits at most ``timeout_s``)."""
        self._calls.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout_s)


class WorkerSlot:
    """One device's worker and the thread it lives on; rebuilt when the thread dies."""

    def __init__(self, index: int, device: torch.device, factory: WorkerFactory) -> None:
        self.index = index
        self.device = device
        self.factory = factory
        self.restarts = 0
        self.turns = DeviceTurns()  # shared by the worker thread and the heavy explanations
        self.seconds_per_pass = 0.02  # one image's forward pass; measured in warm-up and heavy runs
        self._thread: WorkerThread | None = None
        self._worker: WorkerLike | None = None
        self._specs: list[ModelSpec] = []
        self._warm_sizes: list[int] = []

    @property
    def worker(self) -> WorkerLike | None:
        """The live worker (for inspection in tests; only its thread may call it)."""
        return self._worker

    @property
    def name(self) -> str:
        return f"camserve-worker-{self.index}-{self.device}"

    async def start(self, specs: Sequence[ModelSpec], warm_sizes: Sequence[int]) -> dict[str, ModelInfo]:
        """Build the worker on its own thread, load every model, warm up at ``warm_sizes``."""
        self._specs, self._warm_sizes = list(specs), list(warm_sizes)
        self._thread = WorkerThread(self.name, self.turns)
        started = time.perf_counter()
        self._worker = await self._thread.call(self.factory, self.device)
        catalog: dict[str, ModelInfo] = await self._thread.call(self._worker.load, self._specs)
        if self._warm_sizes:
            await self._thread.call(self._worker.warm_up, self._warm_sizes)
        measured = getattr(self._worker, "seconds_per_pass", None)
        if isinstance(measured, float) and measured > 0:
            self.seconds_per_pass = measured
        log.info("worker ready", extra={
            "worker": self.name, "device": str(self.device), "models": sorted(catalog),
            "warm_batch_sizes": self._warm_sizes, "ms": round((time.perf_counter() - started) * 1000, 1),
        })
        return catalog

    async def compute(self, items: Sequence[WorkItem]) -> list[ItemResult]:
        if self._thread is None or self._worker is None:
            raise WorkerDied(f"{self.name} has no worker")
        results: list[ItemResult] = await self._thread.call(self._worker.compute, items)
        return results

    async def release_memory(self) -> None:
        """Have the worker give back cached device memory, on its own thread (after an
        out-of-memory error, before the batch is split); nothing for a worker without the hook."""
        release = getattr(self._worker, "release_memory", None)
        if self._thread is None or not callable(release):
            return
        await self._thread.call(release)

    async def compute_heavy(
        self, item: WorkItem, run: passes.PassRun, background: bool = False
    ) -> ItemResult:
        """One heavy item on a thread of its own, holding the device's turn between its pass
        boundaries (see :mod:`service.cams.passes`); raises ``PassesCancelled`` when stopped."""
        worker = self._worker
        if self._thread is None or worker is None:
            raise WorkerDied(f"{self.name} has no worker")
        run.turn = self.turns
        future: concurrent.futures.Future[ItemResult] = concurrent.futures.Future()

        def explain() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                with self.turns.heavy(run, background), passes.active(run):
                    results = worker.compute([item])
            except Exception as exc:
                future.set_exception(exc)
            except BaseException as exc:
                future.set_exception(WorkerDied(f"a heavy explanation's thread ended: {exc!r}"))
                raise
            else:
                future.set_result(results[0])

        threading.Thread(target=explain, name=f"{self.name}-heavy", daemon=True).start()
        return await asyncio.wrap_future(future)

    async def replace(self) -> None:
        """A fresh thread and worker with the same models; raises when they cannot be loaded."""
        self.restarts += 1
        log.warning("replacing worker", extra={"worker": self.name, "restarts": self.restarts})
        if self._thread is not None:
            self._thread.close(timeout_s=0)
        self._thread, self._worker = None, None
        await self.start(self._specs, self._warm_sizes)

    def close(self, timeout_s: float = 5.0) -> None:
        if self._thread is not None:
            self._thread.close(timeout_s)
