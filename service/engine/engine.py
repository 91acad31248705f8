"""The serving engine: a bounded queue in front of a worker that owns the models.

Route handlers call :meth:`Engine.submit` and await; they never touch torch. The worker runs
on its own thread (an executor of one), so the event loop keeps serving while it computes.
Batches group compatible items (same model, methods and layers) and wait at most
``max_batch_delay_ms`` counted from the oldest queued item.

States: ``starting`` (loading and warming up), ``ready``, ``draining``, ``stopped``,
``failed`` (a model could not be loaded; the reason is kept for ``/readyz``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from service.config import Settings
from service.engine.jobs import ItemResult, WorkItem
from service.engine.worker import Worker, resolve_device
from service.errors import DeadlineExceeded, QueueFull, ServiceError, ServiceUnavailable
from service.models.catalog import ModelInfo
from service.models.spec import ModelSpec

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, settings: Settings, specs: Sequence[ModelSpec]) -> None:
        self.settings = settings
        self.specs = list(specs)
        self.state = "starting"
        self.failure: str | None = None
        self.catalog: dict[str, ModelInfo] = {}
        self._queue: asyncio.Queue[WorkItem] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="camserve-worker")
        self._worker: Worker | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._ready = asyncio.Event()
        self._in_flight = 0

    # lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load and warm up every model on the worker thread, then start serving the queue."""
        loop = asyncio.get_running_loop()
        try:
            device = resolve_device(self.settings.device)
            self._worker = Worker(device, self.settings.torch_threads)
            self.catalog = await loop.run_in_executor(self._executor, self._worker.load, self.specs)
            if self.settings.warmup:
                await loop.run_in_executor(self._executor, self._worker.warm_up)
        except Exception as exc:
            self.state, self.failure = "failed", str(exc)
            log.exception("engine failed to start")
            self._ready.set()
            return
        self._tasks.append(asyncio.create_task(self._serve(), name="camserve-batcher"))
        self.state = "ready"
        self._ready.set()
        log.info("engine ready", extra={"device": str(device), "models": list(self.catalog)})

    async def wait_ready(self) -> None:
        await self._ready.wait()

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Stop taking work, let queued and running work finish, then shut the worker down."""
        if self.state == "ready":
            self.state = "draining"
            deadline = time.monotonic() + drain_timeout_s
            while (self._queue.qsize() or self._in_flight) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        self.state = "stopped"
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(ServiceUnavailable("the service stopped before computing"))
        self._executor.shutdown(wait=True)

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    # submission ------------------------------------------------------------------------

    async def submit(self, items: Sequence[WorkItem]) -> list[ItemResult]:
        """Queue all items of a request at once (or none), then await their results in order."""
        if self.state != "ready":
            reason = self.failure if self.state == "failed" else f"the service is {self.state}"
            raise ServiceUnavailable(f"not ready: {reason}")
        if self._queue.qsize() + len(items) > self.settings.max_queue:
            raise QueueFull(
                f"the queue is full ({self._queue.qsize()} of {self.settings.max_queue} images "
                "waiting); retry shortly",
                retry_after_s=1,
            )
        for item in items:
            self._queue.put_nowait(item)
        timeout = max(0.0, max(item.deadline for item in items) - time.monotonic())
        try:
            async with asyncio.timeout(timeout):
                return list(await asyncio.gather(*(item.future for item in items)))
        except TimeoutError:
            for item in items:
                item.future.cancel()
            raise DeadlineExceeded(
                "the request's deadline passed before it was computed; "
                "raise X-Request-Timeout or retry when the service is less busy"
            ) from None
        finally:
            for item in items:
                if not item.future.done():
                    item.future.cancel()

    # batching --------------------------------------------------------------------------

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        max_size = self.settings.max_batch_size
        max_delay = self.settings.max_batch_delay_ms / 1000.0
        while True:
            first = await self._queue.get()
            batch = [first]
            while len(batch) < max_size:
                remaining = first.enqueued + max_delay - time.monotonic()
                item = await self._get_within(remaining)
                if item is None:
                    break
                batch.append(item)
            self._in_flight += len(batch)
            try:
                for group in self._groups(batch):
                    await self._run_group(loop, group)
            finally:
                self._in_flight -= len(batch)

    async def _get_within(self, timeout: float) -> WorkItem | None:
        """The next item if one arrives within ``timeout`` seconds; never loses an item."""
        if not self._queue.empty():
            return self._queue.get_nowait()
        if timeout <= 0:
            return None
        getter = asyncio.ensure_future(self._queue.get())
        done, _ = await asyncio.wait({getter}, timeout=timeout)
        if getter in done:
            return getter.result()
        getter.cancel()
        try:
            return await getter  # it may have completed just before the cancel
        except asyncio.CancelledError:
            return None

    def _groups(self, batch: list[WorkItem]) -> list[list[WorkItem]]:
        now = time.monotonic()
        groups: dict[tuple[object, ...], list[WorkItem]] = defaultdict(list)
        for item in batch:
            if item.future.done():  # cancelled by its request's deadline or disconnect
                continue
            if now > item.deadline:
                item.future.set_exception(DeadlineExceeded("the request's deadline passed in the queue"))
                continue
            groups[item.batch_key()].append(item)
        return list(groups.values())

    async def _run_group(self, loop: asyncio.AbstractEventLoop, group: list[WorkItem]) -> None:
        assert self._worker is not None
        started = time.monotonic()
        try:
            results = await loop.run_in_executor(self._executor, self._worker.compute, group)
        except Exception:
            if len(group) == 1:
                log.exception("work item failed", extra={"model": group[0].model})
                _fail(group[0], ServiceError("the explanation failed inside the service"))
                return
            # One bad input must not fail its neighbours: retry each item alone.
            for item in group:
                await self._run_group(loop, [item])
            return
        for item, result in zip(group, results, strict=True):
            result.queue_ms = (started - item.enqueued) * 1000
            if not item.future.done():
                item.future.set_result(result)


def _fail(item: WorkItem, error: Exception) -> None:
    if not item.future.done():
        item.future.set_exception(error)
