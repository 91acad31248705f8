"""The serving engine: a bounded queue, a dynamic batcher and a pool of worker slots.

Route handlers call :meth:`Engine.submit` and await; they never touch torch. Each worker slot
(one per device, see :mod:`service.engine.pool`) has a runner coroutine that, whenever its slot
is free, takes the oldest queued image and the queued images compatible with it (same model,
methods and layers) up to the slot's batch size (``CAMSERVE_MAX_BATCH_SIZE``, else its device
kind's default, :meth:`service.config.Settings.batch_size_for`: a CUDA slot forms larger
batches than a CPU slot), waiting at most ``max_batch_delay_ms`` counted from the oldest
image's arrival. Incompatible images keep their place for the next batch, and
a request's images may be spread over several batches; each has its own future, so the
request reassembles them in upload order.

Light and heavy work run in two lanes on the same devices. An item whose methods add many
passes (:mod:`service.engine.cost`: the Score-CAM family, Ablation-CAM, faithfulness curves,
...) is heavy: it runs on a thread of its own, in chunks of about ``CAMSERVE_PASS_BUDGET_MS``
(:mod:`service.cams.passes`), and between any two chunks the device goes to waiting light
batches first, then to the other heavy items in turn (:mod:`service.engine.turns`). Up to
``CAMSERVE_HEAVY_CONCURRENCY`` heavy items progress together per device, oldest first; the
rest wait. A heavy item whose client has gone or whose deadline has passed stops at its next
chunk boundary. Before anything is queued, a request whose passes exceed
``CAMSERVE_MAX_REQUEST_PASSES``, or could not finish before its deadline at the pass rate
measured on this device, is refused with 422.

Faults stay with their input: a failing batch is retried image by image, a CUDA out-of-memory
error splits the batch in halves (after the error's frames are let go and the device's cached
memory released) and caps later batches of that kind at the largest size that fitted, and a
worker whose thread dies is rebuilt. Expired or abandoned images are dropped before they are
computed. A sticky CUDA error (:func:`service.engine.pool.is_fatal_device_error`) is not
retried: the device is unusable until the process restarts, so everything queued or running
is answered 503, the state turns ``fatal`` and :attr:`Engine.on_fatal` is called (``python -m
service`` exits with status 70 so that the container restarts).

States: ``starting`` (loading and warming up), ``ready``, ``draining`` (finishing accepted work,
refusing new), ``stopped``, ``failed`` (no worker could be loaded; the reason is kept for
``/readyz``), ``fatal`` (a device failed beyond repair; ``/healthz`` turns 503 too).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import traceback
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np
import torch

from service.cams import method_catalog
from service.cams.passes import PassesCancelled, PassRun
from service.config import Settings
from service.engine import cost
from service.engine.jobs import ExplainSpec, ItemResult, WorkItem
from service.engine.pool import (
    WorkerDied,
    WorkerFactory,
    WorkerLike,
    WorkerSlot,
    is_fatal_device_error,
    is_out_of_memory,
)
from service.engine.worker import Worker, available_cores, resolve_devices, warm_batch_sizes
from service.errors import DeadlineExceeded, InvalidOption, QueueFull, ServiceError, ServiceUnavailable
from service.logs import request_state
from service.methods import MethodInfo
from service.metrics import Metrics
from service.models.catalog import ModelInfo
from service.models.spec import ModelSpec
from service.quality import introspection
from service.quality.tiles import FeatureMaps, KernelMode, Kernels

log = logging.getLogger(__name__)


class ClientDisconnected(ServiceError):
    """The client went away before its answer was ready; its unstarted work was dropped."""

    status_code = 499
    code = "client_closed_request"


class Engine:
    def __init__(
        self,
        settings: Settings,
        specs: Sequence[ModelSpec],
        worker_factory: WorkerFactory | None = None,
        metrics: Metrics | None = None,
        devices: Sequence[torch.device] | None = None,
    ) -> None:
        """``worker_factory`` builds a device's worker (default: the torch :class:`Worker`);
        ``devices`` overrides ``settings.device``, one worker each."""
        self.settings = settings
        self.devices = list(devices) if devices is not None else None
        self.specs = list(specs)
        self.worker_factory = worker_factory or self._real_worker
        self.metrics = metrics
        self.state = "starting"
        self.failure: str | None = None
        self._catalog: dict[str, ModelInfo] = {}
        # Every method's declaration as plain data: what the HTTP layer validates against.
        self.methods: dict[str, MethodInfo] = method_catalog()
        self.slots: list[WorkerSlot] = []
        self._pending: deque[WorkItem] = deque()
        self._in_flight = 0
        self._arrived = asyncio.Event()  # set when images are queued
        self._changed = asyncio.Event()  # set when queued or in-flight work shrinks
        self._forming = asyncio.Lock()  # one runner forms a batch at a time
        self._runners: list[asyncio.Task[None]] = []
        self._ready = asyncio.Event()
        self._seconds_per_image = 0.05  # running estimate, for Retry-After
        # The heavy lane: items waiting for a place, the places taken per slot, the tasks.
        self._heavy_pending: deque[WorkItem] = deque()
        self._heavy_arrived = asyncio.Event()
        self._heavy_freed = asyncio.Event()
        self._heavy_running: dict[int, int] = {}
        self._heavy_tasks: set[asyncio.Task[None]] = set()
        self._running_heavy: dict[int, WorkItem] = {}  # by id of its task
        self._dispatcher: asyncio.Task[None] | None = None
        self._dead_slots: set[int] = set()  # slots whose worker could not be replaced
        self._seconds_per_pass = 0.02  # one image's forward pass; measured, for the budget
        # Called once, with the reason, when a device fails beyond repair (state "fatal").
        self.on_fatal: Callable[[str], None] | None = None
        self._computing: dict[int, list[WorkItem]] = {}  # each slot's light batch being computed
        # Out-of-memory memory, per kind of batch (_fit_key): the smallest size that ran out,
        # and the largest smaller size that fitted since; later batches are capped at it.
        self._too_big: dict[tuple[object, ...], int] = {}
        self._fitted: dict[tuple[object, ...], int] = {}

    def _real_worker(self, device: torch.device) -> WorkerLike:
        # Every core goes to torch: a batch of 8 splits well over the cores, while decoding,
        # PNG and JSON take a small share of them between batches.
        threads = self.settings.torch_threads or available_cores()
        return Worker(device, threads, channels_last=self.settings.channels_last,
                      fold_batch_norm=self.settings.fold_batch_norm, precision=self.settings.precision)

    # lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Build, load and warm up one worker per device, then start serving the queue."""
        try:
            devices = self.devices or resolve_devices(self.settings.device)
            self.slots = [WorkerSlot(i, d, self.worker_factory) for i, d in enumerate(devices)]
            # One slot after the other: loading traces the models with torch.fx, which patches
            # nn.Module.__call__ process-wide while it runs, so another slot's forward (its
            # own load's probe, or its warm-up) on another thread would be traced into it and
            # fail ("module is not installed as a submodule"): two devices never started.
            catalogs = [await slot.start(self.specs, self._warm_sizes(slot.device)) for slot in self.slots]
        except Exception as exc:
            self.state, self.failure = "failed", str(exc)
            log.exception("engine failed to start")
            self._ready.set()
            return
        self._catalog = catalogs[0]
        self._seconds_per_pass = max(slot.seconds_per_pass for slot in self.slots)
        self._runners = [
            asyncio.create_task(self._run(slot), name=f"camserve-runner-{slot.index}") for slot in self.slots
        ]
        self._dispatcher = asyncio.create_task(self._dispatch_heavy(), name="camserve-heavy")
        self._dispatcher.add_done_callback(self._dispatcher_ended)
        self.state = "ready"
        self._ready.set()
        log.info("engine ready", extra={"devices": [str(s.device) for s in self.slots],
                                        "models": list(self._catalog)})

    def _warm_sizes(self, device: torch.device) -> list[int]:
        """The batch sizes a slot on ``device`` will see, up to its own largest batch."""
        if not self.settings.warmup:
            return []
        return warm_batch_sizes(self.settings.batch_size_for(device.type), device)

    async def wait_ready(self) -> None:
        await self._ready.wait()

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new work and wait until queued and running work has finished (True) or
        ``timeout_s`` has passed (False)."""
        if self.state in ("starting", "ready"):
            self.state = "draining"
            log.info("draining", extra={"queue_depth": self.queue_depth, "in_flight": self._in_flight})
        try:
            async with asyncio.timeout(timeout_s):
                while self._busy():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            return False
        return True

    async def stop(self, drain_timeout_s: float | None = None) -> None:
        """Drain (see :meth:`drain`), then answer anything left with 503 and end the workers."""
        timeout = self.settings.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        drained = True
        if self.state in ("ready", "draining"):
            drained = await self.drain(timeout)
            if not drained:
                log.warning("drain timed out", extra={"queue_depth": self.queue_depth,
                                                      "in_flight": self._in_flight})
        fatal = self.state == "fatal"
        if not fatal:  # a failed device stays visible to the health checks until the exit
            self.state = "stopped"
        stopping = [*self._runners, *([self._dispatcher] if self._dispatcher else [])]
        for task in stopping:
            task.cancel()
        await asyncio.gather(*stopping, return_exceptions=True)
        while self._pending:
            _fail(self._pending.popleft(), ServiceUnavailable("the service stopped before computing"))
        while self._heavy_pending:
            _fail(self._heavy_pending.popleft(), ServiceUnavailable("the service stopped before computing"))
        # Heavy items still running stop at their next chunk boundary, answered 503.
        for task in list(self._heavy_tasks):
            task.cancel()
        if self._heavy_tasks:
            await asyncio.wait(list(self._heavy_tasks), timeout=5.0)
        for slot in self.slots:  # a computation still running after a timed-out drain is abandoned
            slot.close(timeout_s=5.0 if drained and not fatal else 0.0)

    def _busy(self) -> bool:
        return self._in_flight > 0 or any(
            not item.future.done() for item in (*self._pending, *self._heavy_pending)
        )

    @property
    def catalog(self) -> dict[str, ModelInfo]:
        """The served models; asking before they are loaded is answered 503, not "unknown"."""
        if self.state in ("starting", "failed", "fatal"):
            reason = self.failure if self.state != "starting" else "the models are still loading"
            raise ServiceUnavailable(f"not ready: {reason}", headers={"Retry-After": "1"})
        return self._catalog

    @property
    def queue_depth(self) -> int:
        return len(self._pending) + len(self._heavy_pending)

    @property
    def seconds_per_pass(self) -> float:
        """One image's forward pass on the slowest device, as last measured."""
        return self._seconds_per_pass

    @property
    def jpeg_on_device(self) -> bool:
        """Whether the API hands this engine baseline JPEGs as bytes for the workers to decode
        (service.imaging.encoded): ``CAMSERVE_GPU_DECODE=auto`` and every slot on one CUDA
        device. torchvision keeps a single nvjpeg decoder per process and builds a new one,
        leaking the old one's handle and buffers, whenever it is asked for another device, so
        two GPUs decoding in turn would rebuild (and leak) it on nearly every batch: with
        several GPUs the host decodes."""
        devices = {slot.device for slot in self.slots}
        return (self.settings.gpu_decode == "auto" and len(devices) == 1
                and next(iter(devices)).type == "cuda")

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def workers(self) -> list[WorkerLike]:
        """One worker per device, in device order."""
        return [slot.worker for slot in self.slots if slot.worker is not None]

    # one-off calls ---------------------------------------------------------------------

    async def run(self, model: str, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(loaded_model)`` on a worker's own thread, between its batches, and return
        what it returns; for work that is not a batch of images (feature maps, kernels).

        ``loaded_model`` is the worker's :class:`service.models.loader.LoadedModel` named
        ``model``; ``fn`` must return plain data (numpy, Python), never torch objects.
        """
        if self.state != "ready":
            reason = self.failure if self.state in ("failed", "fatal") else f"the service is {self.state}"
            raise ServiceUnavailable(f"not ready: {reason}", headers={"Retry-After": "1"})
        slot = next((s for s in self.slots if s.worker is not None), None)
        if slot is None or slot._thread is None:
            raise ServiceUnavailable("no worker is running; retry shortly", headers={"Retry-After": "1"})
        worker = slot.worker
        return await slot._thread.call(lambda: fn(worker.models[model]))  # type: ignore[union-attr]

    async def feature_maps(
        self, model: str, pixels: np.ndarray, layer: str, max_channels: int
    ) -> FeatureMaps:
        """``layer``'s activation maps for one image (:func:`introspection.feature_maps`)."""
        found: FeatureMaps = await self.run(
            model, lambda loaded: introspection.feature_maps(loaded, pixels, layer, max_channels)
        )
        return found

    async def kernels(self, model: str, layer: str, mode: KernelMode, max_kernels: int) -> Kernels:
        """A convolution's kernels as tiles (:func:`introspection.kernels`)."""
        found: Kernels = await self.run(
            model, lambda loaded: introspection.kernels(loaded, layer, mode, max_kernels)
        )
        return found

    # submission ------------------------------------------------------------------------

    def admit(self, images: int) -> None:
        """Raise what :meth:`submit` would for a request of ``images`` images (not ready,
        draining, queue full), so a route can refuse before paying for its decode.

        A request admitted while ready is marked so (``admitted`` in its request state): a
        drain that begins while it decodes still takes its images, since it was accepted
        before the drain, and the drain waits for it (:func:`service.shutdown.InFlight`)."""
        state = request_state.get()
        accepted_before = self.state == "draining" and state is not None and state.get("admitted")
        if self.state != "ready" and not accepted_before:
            reason = self.failure if self.state in ("failed", "fatal") else f"the service is {self.state}"
            raise ServiceUnavailable(f"not ready: {reason}", headers={"Retry-After": "1"})
        if state is not None and "admitted" not in state:  # False: its request was answered
            state["admitted"] = True
        if len(self._pending) + images > self.settings.max_queue:
            self._purge_abandoned()
        if len(self._pending) + images > self.settings.max_queue:
            raise QueueFull(
                f"the queue is full ({len(self._pending)} of {self.settings.max_queue} images "
                "waiting); retry shortly",
                retry_after_s=self._retry_after(),
            )

    async def submit(
        self, items: Sequence[WorkItem], disconnected: Awaitable[object] | None = None
    ) -> list[ItemResult]:
        """Queue all items of a request at once (or none), then await their results in order.

        ``disconnected`` completes when the client goes away; the request's unstarted images
        are then dropped and :class:`ClientDisconnected` raised.
        """
        state = request_state.get()
        _note_request(state, items)
        self.price(items)
        light = [item for item in items if not item.heavy]
        heavy = [item for item in items if item.heavy]
        self.admit(len(light))
        self.admit_heavy(heavy)
        self._pending.extend(light)
        self._heavy_pending.extend(heavy)
        if light:
            self._arrived.set()
        if heavy:
            self._heavy_arrived.set()
        if self.metrics:
            self.metrics.images_accepted.labels(items[0].model).inc(len(items))
        results = asyncio.gather(*(item.future for item in items))
        watch: asyncio.Future[Any] | None = (
            asyncio.ensure_future(disconnected) if disconnected is not None else None
        )
        timeout = max(0.0, max(item.deadline for item in items) - time.monotonic())
        try:
            async with asyncio.timeout(timeout):
                waiting: set[asyncio.Future[Any]] = {results} if watch is None else {results, watch}
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if results.done():
                answered: list[ItemResult] = list(results.result())
                _note_results(state, answered)
                return answered
            raise ClientDisconnected("the client closed the connection before the answer was ready")
        except TimeoutError:
            raise DeadlineExceeded(
                "the request's deadline passed before it was computed; "
                "raise X-Request-Timeout or retry when the service is less busy"
            ) from None
        finally:
            for item in items:
                if not item.future.done():
                    item.future.cancel()  # unstarted: dropped by the batcher
            if watch is not None:
                watch.cancel()
            results.add_done_callback(_retrieve)  # so asyncio does not warn about a failed image
            self._changed.set()

    def price(self, items: Sequence[WorkItem]) -> int:
        """Set each item's passes and lane (an item already marked heavy, a job's, stays
        heavy); refuse (422) what is over budget or too slow. Returns the passes in all."""
        for item in items:
            model = self._catalog.get(item.model)
            item.passes = cost.item_passes(item.explain, model) if model is not None else 1
            item.heavy = item.heavy or (model is not None and cost.is_heavy(item.explain, model))
        total = sum(item.passes for item in items)
        limit = self.settings.max_request_passes
        advice = ("ask for fewer images, classes or methods, lower top_k_channels, num_samples "
                  "or eval_steps")
        if total > limit:
            raise InvalidOption(
                f"this request would cost about {total} forward passes; at most {limit} are "
                f"allowed per request and job (CAMSERVE_MAX_REQUEST_PASSES): {advice}"
            )
        if not any(item.heavy for item in items):
            return total
        # Heavy requests already in the lane share the device with this one, turn by turn (jobs
        # give way to them), so its passes come at a fraction of the device's rate.
        sharing = 1 + (self._foreground_heavy() if not any(i.background for i in items) else 0)
        needed = total * self._seconds_per_pass * sharing
        left = min(item.deadline for item in items) - time.monotonic()
        if needed > left:
            shared = f", sharing the device with {sharing - 1} other long requests" if sharing > 1 else ""
            raise InvalidOption(
                f"this request needs about {total} forward passes, about {needed:.1f} s at the "
                f"{1 / self._seconds_per_pass:.0f} passes/s measured on this device{shared}, more "
                f"than the {max(left, 0):.1f} s left before its deadline: submit it as a job "
                f"(POST /jobs, which shows its progress), raise X-Request-Timeout, or {advice}"
            )
        return total

    def admit_heavy(self, items: Sequence[WorkItem]) -> None:
        """503 (with Retry-After) when these heavy items would overfill the heavy lane; a job
        asks before it is created, so it is never accepted only to fail at once."""
        queued = self.heavy_passes_left
        if items and queued + sum(item.passes for item in items) > self.settings.max_queued_passes:
            raise QueueFull(
                f"the heavy lane is full ({queued} passes of long explanations waiting or running, "
                f"at most {self.settings.max_queued_passes}); retry later",
                retry_after_s=max(1, math.ceil(queued * self._seconds_per_pass / max(1, len(self.slots)))),
            )

    def _foreground_heavy(self) -> int:
        """Heavy items of synchronous requests queued or running: they share the device in turns."""
        running = sum(1 for item in self._running_heavy.values() if not item.background)
        return running + sum(1 for item in self._heavy_pending
                             if not item.background and not item.future.done())

    def method_cost(self, method: str, model: str) -> tuple[int, float, bool]:
        """(passes, seconds at the measured rate, heavy) of ``method`` with its defaults, for
        one image and its top-1 class on ``model``'s default layer."""
        info = self._catalog[model]
        spec = ExplainSpec(methods=(method,), layers=(info.default_layer,), classes=None,
                           mask_size=None, display_size=None)
        passes = cost.item_passes(spec, info)
        return passes, passes * self._seconds_per_pass, cost.is_heavy(spec, info)

    @property
    def heavy_passes_left(self) -> int:
        """Passes of heavy items still to run, queued or running."""
        left = sum(item.passes for item in self._heavy_pending if not item.future.done())
        for task_item in self._heavy_items():
            run = task_item.run
            done = round(run.done) if isinstance(run, PassRun) else 0
            left += max(0, task_item.passes - done)
        return left

    def _heavy_items(self) -> list[WorkItem]:
        return [item for item in self._running_heavy.values()]

    def _purge_abandoned(self) -> None:
        live = [item for item in self._pending if not item.future.done()]
        if len(live) != len(self._pending):
            self._pending = deque(live)
            self._changed.set()

    def _retry_after(self) -> int:
        workers = max(1, len(self.slots))
        return max(1, math.ceil(len(self._pending) * self._seconds_per_image / workers))

    # batching --------------------------------------------------------------------------

    async def _run(self, slot: WorkerSlot) -> None:
        """One slot's loop: whenever the slot is free, take the next batch and compute it."""
        while True:
            batch = await self._next_batch(slot)
            self._in_flight += len(batch)
            self._computing[slot.index] = batch
            try:
                await self._compute(slot, batch)
                if self.state == "fatal":  # the device's context is gone: nothing more runs here
                    return
            except asyncio.CancelledError:  # stopped with work running: answer it, never drop it
                for item in batch:
                    _fail(item, ServiceUnavailable("the service stopped before this image was computed"))
                raise
            except WorkerDied as exc:  # a replacement could not be loaded
                self.failure = f"worker on {slot.device} could not be replaced: {exc}"
                self._dead_slots.add(slot.index)
                for item in batch:
                    _fail(item, ServiceUnavailable("the worker failed; retry shortly"))
                self._runners = [t for t in self._runners if t is not asyncio.current_task()]
                if not self._runners and self.state == "ready":
                    self.state = "failed"
                log.error("runner stopped", extra={"worker": slot.name, "reason": str(exc)})
                return
            finally:
                self._computing.pop(slot.index, None)
                self._in_flight -= len(batch)
                self._changed.set()

    async def _next_batch(self, slot: WorkerSlot) -> list[WorkItem]:
        """The next batch for ``slot``, at most its device kind's size (a CUDA slot takes
        more images at once than a CPU slot beside it)."""
        max_size = self.settings.batch_size_for(slot.device.type)
        max_delay = self.settings.max_batch_delay_ms / 1000.0
        async with self._forming:
            while True:
                first = await self._oldest()
                batch, key = [first], first.batch_key()
                closes = first.enqueued + max_delay
                size = self._batch_cap(first, max_size)
                while True:
                    self._take_compatible(batch, key, size)
                    remaining = closes - time.monotonic()
                    if len(batch) >= size or remaining <= 0:
                        break
                    self._arrived.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(remaining):
                            await self._arrived.wait()
                batch = [item for item in batch if self._live(item)]
                if batch:
                    return batch

    async def _oldest(self) -> WorkItem:
        while True:
            while self._pending:
                item = self._pending.popleft()
                self._changed.set()
                if self._live(item):
                    return item
            self._arrived.clear()
            await self._arrived.wait()

    def _take_compatible(self, batch: list[WorkItem], key: tuple[object, ...], max_size: int) -> None:
        kept: deque[WorkItem] = deque()
        while self._pending:
            item = self._pending.popleft()
            if len(batch) < max_size and item.batch_key() == key:
                if self._live(item):
                    batch.append(item)
            else:
                kept.append(item)
        self._pending = kept
        self._changed.set()

    def _live(self, item: WorkItem) -> bool:
        """False for work nobody waits for any more; expired work is answered 504 here."""
        if item.future.done():
            return False
        if time.monotonic() > item.deadline:
            _fail(item, DeadlineExceeded("the request's deadline passed while it was queued"))
            if self.metrics:
                self.metrics.expired.inc()
            return False
        return True

    async def _compute(self, slot: WorkerSlot, batch: list[WorkItem]) -> None:
        """Compute a batch on ``slot``; on failure, split it so only the bad input fails."""
        live = [item for item in batch if self._live(item)]
        if not live:
            return
        if self.state == "fatal":  # a split or a retry after the device failed
            for item in live:
                _fail(item, self._fatal_error())
            return
        started = time.monotonic()
        for item in live:
            item.started = started
        failure = ""
        try:
            results = await slot.compute(live)
            if len(results) != len(live):
                raise RuntimeError(f"the worker returned {len(results)} results for {len(live)} images")
        except WorkerDied:
            log.exception("worker died", extra={"worker": slot.name, "batch_size": len(live)})
            failure = "died"
        except Exception as exc:
            if is_fatal_device_error(exc):
                self._fatal(slot, exc, live)
                return
            if is_out_of_memory(exc) and len(live) > 1:
                log.warning("out of memory; splitting the batch",
                            extra={"worker": slot.name, "batch_size": len(live)})
                failure = "oom"
            else:
                log.exception("batch failed", extra={"worker": slot.name, "model": live[0].model,
                                                     "batch_size": len(live)})
                failure = "error"
            # The traceback's frames hold the failed batch's tensors, and a cycle through the
            # awaited future would keep them until the cyclic collector runs: let them go now.
            traceback.clear_frames(exc.__traceback__)
        # Out of the handler, so nothing refers to the failed batch's tensors any more.
        if not failure:
            self._note_fit(live)
            self._finish(slot, live, results, started)
        elif failure == "died":
            if self.metrics:
                self.metrics.worker_restarts.inc()
            await self._replace(slot)
            await self._retry_alone(slot, live, "the worker crashed while computing this image")
        elif failure == "oom":
            key = _fit_key(live[0])
            self._too_big[key] = min(self._too_big.get(key, len(live)), len(live))
            try:
                await slot.release_memory()
            except Exception:  # a worker that cannot release shows it on the next batch
                log.exception("releasing device memory failed", extra={"worker": slot.name})
            half = len(live) // 2
            await self._compute(slot, live[:half])
            await self._compute(slot, live[half:])
        else:
            await self._retry_alone(slot, live, "the explanation failed inside the service")

    def _batch_cap(self, first: WorkItem, max_size: int) -> int:
        """At most ``max_size``; for a kind of batch that ran out of memory, the largest size
        that fitted since (half the size that did not, until one has)."""
        key = _fit_key(first)
        too_big = self._too_big.get(key)
        if too_big is None:
            return max_size
        return max(1, min(max_size, self._fitted.get(key, too_big // 2)))

    def _note_fit(self, items: list[WorkItem]) -> None:
        key = _fit_key(items[0])
        too_big = self._too_big.get(key)
        if too_big is not None and len(items) < too_big:
            self._fitted[key] = max(self._fitted.get(key, 0), len(items))

    def _fatal_error(self) -> ServiceUnavailable:
        return ServiceUnavailable(
            f"the service's device failed and this instance is restarting ({self.failure}); "
            "retry on another instance or in a few seconds", headers={"Retry-After": "5"},
        )

    def _fatal(self, slot: WorkerSlot, exc: BaseException, items: Sequence[WorkItem]) -> None:
        """A device failed beyond repair: answer everything queued and running with 503, turn
        the health checks to 503, and tell whoever runs the process (``on_fatal``)."""
        first = self.state != "fatal"
        if first:
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            self.state = "fatal"
            self.failure = f"fatal device error on {slot.device}: {detail}"
            log.critical("fatal device error: answering 503 and exiting so the process restarts",
                         exc_info=exc, extra={"worker": slot.name, "device": str(slot.device),
                                              "reason": self.failure})
        self._dead_slots.add(slot.index)
        error = self._fatal_error()
        for item in (*items, *(i for b in self._computing.values() for i in b),
                     *self._running_heavy.values(), *self._pending, *self._heavy_pending):
            _fail(item, error)  # a running heavy item stops at its next pass boundary
        self._pending.clear()
        self._heavy_pending.clear()
        self._changed.set()
        if first and self.on_fatal is not None:
            try:
                self.on_fatal(self.failure or "fatal device error")
            except Exception:
                log.exception("the fatal-error callback failed")

    async def _retry_alone(self, slot: WorkerSlot, items: list[WorkItem], reason: str) -> None:
        if len(items) == 1:
            _fail(items[0], ServiceError(f"{reason}; the service keeps serving, please retry"))
            return
        for item in items:  # one bad input must not fail its neighbours
            await self._compute(slot, [item])

    async def _replace(self, slot: WorkerSlot) -> None:
        try:
            await slot.replace()
        except Exception as exc:
            raise WorkerDied(str(exc)) from exc

    # the heavy lane ----------------------------------------------------------------------

    async def _dispatch_heavy(self) -> None:
        """Start heavy items as devices have room: a synchronous request's at once (its client
        waits on a deadline, and jobs give way to it turn by turn), a job's while fewer than
        ``CAMSERVE_HEAVY_CONCURRENCY`` heavy items run on the device; oldest first."""
        while True:
            for stale in [i for i in self._heavy_pending if not self._live_quietly(i)]:
                self._heavy_pending.remove(stale)
                self._live(stale)  # answers an expired one 504
            item: WorkItem | None = next((i for i in self._heavy_pending if not i.background),
                                         self._heavy_pending[0] if self._heavy_pending else None)
            slot = self._heavy_place(item.background) if item is not None else None
            if item is None or slot is None:
                # Wait for new heavy work or a freed place, whichever comes first.
                self._heavy_arrived.clear()
                self._heavy_freed.clear()
                arrived = asyncio.ensure_future(self._heavy_arrived.wait())
                freed = asyncio.ensure_future(self._heavy_freed.wait())
                try:
                    await asyncio.wait({arrived, freed}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    arrived.cancel()
                    freed.cancel()
                continue
            self._heavy_pending.remove(item)
            self._changed.set()
            self._heavy_running[slot.index] = self._heavy_running.get(slot.index, 0) + 1
            self._in_flight += 1
            task = asyncio.create_task(self._compute_heavy(slot, item), name="camserve-heavy-item")
            self._heavy_tasks.add(task)
            self._running_heavy[id(task)] = item
            task.add_done_callback(self._heavy_done)

    def _dispatcher_ended(self, task: asyncio.Task[None]) -> None:
        """The heavy lane's dispatcher only ends when the engine stops; anything else is a
        fault that must not go unnoticed: heavy work would wait for ever."""
        if task.cancelled() or self.state == "stopped":
            return
        error = task.exception()
        log.error("the heavy lane stopped", exc_info=error)
        self.failure = f"the heavy lane stopped: {error!r}"
        self.state = "failed"
        for item in list(self._heavy_pending):
            _fail(item, ServiceUnavailable("the service cannot run long explanations now; retry later"))
        self._heavy_pending.clear()

    def _heavy_done(self, task: asyncio.Task[None]) -> None:
        self._heavy_tasks.discard(task)
        self._running_heavy.pop(id(task), None)

    def _heavy_place(self, background: bool) -> WorkerSlot | None:
        """The device with the fewest heavy items running (a job's only below the limit)."""
        limit = self.settings.heavy_concurrency if background else None
        free = [s for s in self.slots if s.worker is not None and s.index not in self._dead_slots
                and (limit is None or self._heavy_running.get(s.index, 0) < limit)]
        return min(free, key=lambda s: self._heavy_running.get(s.index, 0)) if free else None

    @staticmethod
    def _live_quietly(item: WorkItem) -> bool:
        return not item.future.done() and time.monotonic() <= item.deadline

    async def _compute_heavy(self, slot: WorkerSlot, item: WorkItem) -> None:
        run = PassRun(
            deadline=item.deadline, total=item.passes,
            budget_s=self.settings.pass_budget_ms / 1000.0, seconds_per_pass=self._seconds_per_pass,
        )
        item.run = run
        if item.on_progress is not None:
            item.on_progress(0, round(run.total))  # started
            loop, report = asyncio.get_running_loop(), item.on_progress

            def progressed(r: PassRun) -> None:  # on the heavy item's thread
                loop.call_soon_threadsafe(report, round(r.done), round(r.total))

            run.on_progress = progressed
        # However the item's answer comes (a result, 504, the client gone), no pass runs after.
        item.future.add_done_callback(lambda _future: run.cancelled.set())
        started = time.monotonic()
        item.started = started
        try:
            result = await slot.compute_heavy(item, run, background=item.background)
        except asyncio.CancelledError:  # the engine stopped: answer, and stop at the next boundary
            _fail(item, ServiceUnavailable("the service stopped before this explanation finished"))
            run.cancelled.set()
            raise
        except PassesCancelled as exc:
            if exc.reason == "deadline":
                _fail(item, DeadlineExceeded(
                    "the request's deadline passed while it was computed; raise X-Request-Timeout"
                ))
            _fail(item, ServiceUnavailable("the explanation was stopped before it finished"))
            log.info("heavy explanation stopped", extra={
                "worker": slot.name, "reason": exc.reason, "passes_done": exc.done,
                "passes_total": run.total, "request_ids": [item.request_id],
            })
        except WorkerDied as exc:
            log.error("heavy explanation's worker died", extra={"worker": slot.name, "reason": str(exc)})
            _fail(item, ServiceUnavailable("the worker failed; retry shortly"))
        except Exception as exc:
            if is_fatal_device_error(exc):
                self._fatal(slot, exc, [item])
                return
            log.exception("heavy explanation failed", extra={"worker": slot.name, "model": item.model})
            _fail(item, ServiceError(
                "the explanation failed inside the service; the service keeps serving, please retry"
            ))
        else:
            run.total = run.done = max(run.done, 1)  # the estimate gives way to what was run
            if item.on_progress is not None:
                item.on_progress(round(run.done), round(run.total))
            self._learn_pass_rate(run)
            self._finish(slot, [item], [result], started)
        finally:
            if self.metrics:
                self.metrics.passes.inc(run.done)
            self._heavy_running[slot.index] -= 1
            self._in_flight -= 1
            self._heavy_freed.set()
            self._changed.set()

    def _learn_pass_rate(self, run: PassRun) -> None:
        """Keep the device's measured seconds per full forward pass for later estimates."""
        measured = run.rate_of("masked") or run.rate_of("faithfulness")
        if measured:
            self._seconds_per_pass = 0.7 * self._seconds_per_pass + 0.3 * measured

    def _finish(
        self, slot: WorkerSlot, items: list[WorkItem], results: list[ItemResult], started: float
    ) -> None:
        finished = time.monotonic()
        per_image = (finished - started) / len(items)
        self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * per_image
        for item, result in zip(items, results, strict=True):
            result.queue_ms = (started - item.enqueued) * 1000
            result.batch_size = len(items)
            if result.error is not None:
                _fail(item, result.error)  # its input alone, its neighbours answered
            elif not item.future.done():
                item.future.set_result(result)
        first = items[0]
        methods = list(first.explain.methods) if first.explain else []
        compute_ms = round((finished - started) * 1000, 2)
        queue_ms = [round((started - item.enqueued) * 1000, 2) for item in items]
        log.info("batch computed", extra={
            "worker": slot.name, "model": first.model, "methods": methods, "batch_size": len(items),
            "request_ids": sorted({item.request_id for item in items if item.request_id}),
            "queue_ms_max": max(queue_ms), "compute_ms": compute_ms,
        })
        if self.metrics:
            self.metrics.observe_batch(first.model, str(slot.device), len(items),
                                       [q / 1000 for q in queue_ms], finished - started)


def _fit_key(item: WorkItem) -> tuple[object, ...]:
    """What decides a batch's memory: its model, methods, layers and options, and input shape."""
    return (*item.batch_key(), item.input_shape())


def _note_request(state: dict[str, Any] | None, items: Sequence[WorkItem]) -> None:
    """What the access log and the request metrics say about this request."""
    if state is None or not items:
        return
    request_id = str(state.get("request_id", ""))
    for item in items:
        item.request_id = request_id
    explain = items[0].explain
    state["model"] = items[0].model
    state["cam_methods"] = list(explain.methods) if explain else []
    state["images"] = len(items)


def _note_results(state: dict[str, Any] | None, results: Sequence[ItemResult]) -> None:
    if state is None:
        return
    state["computed_at"] = time.perf_counter()
    state["queue_ms"] = round(max((r.queue_ms for r in results), default=0.0), 2)
    state["compute_ms"] = round(max((r.compute_ms for r in results), default=0.0), 2)
    state["batch_sizes"] = [r.batch_size for r in results]


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _fail(item: WorkItem, error: Exception) -> None:
    if not item.future.done():
        item.future.set_exception(error)
