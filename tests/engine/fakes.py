"""A fake worker the engine can be built with (``worker_factory``), so the batcher, the fault
handling and the drain are tested without torch and without sleeps.

Every work item carries a tag (its first pixel value); the fake answers each item with the
prediction ``(tag, 1.0)`` and records the tags of every batch it is handed. A :class:`Script`
is the test's handle: it can hold the worker at a gate, poison tags (an exception), make tags
kill the worker's thread, and make batches above a size run out of memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.config import Settings
from service.engine.jobs import ExplainSpec, ItemResult, WorkItem
from service.models.catalog import LayerInfo, ModelInfo
from service.models.spec import ModelSpec, embedded_default

WAIT_S = 20.0  # upper bound on any wait; a correct engine answers in milliseconds
# What torch raises (as RuntimeError, or torch.AcceleratorError) after a failed device assert.
FATAL_MESSAGE = ("CUDA error: device-side assert triggered\nCUDA kernel errors might be asynchronously "
                 "reported at some other API call, so the stacktrace below might be incorrect.")


@dataclass
class Script:
    gate: threading.Event = field(default_factory=threading.Event)  # cleared: compute waits
    poison: set[int] = field(default_factory=set)  # tags whose batch raises ValueError
    killers: set[int] = field(default_factory=set)  # tags whose batch ends the worker thread
    oom_above: int | None = None  # batches larger than this raise OutOfMemoryError
    fatal: set[int] = field(default_factory=set)  # tags whose batch raises a sticky CUDA error
    released: int = 0  # release_memory() calls (after out-of-memory errors)
    batches: list[list[int]] = field(default_factory=list)  # every compute call, in order
    # The same, with the kind of the worker's device ("cpu", "cuda"; fakes need no GPU).
    device_batches: list[tuple[str, list[int]]] = field(default_factory=list)
    # Per device kind, a gate of its own in place of ``gate`` (so one kind's slot can be held).
    gates: dict[str, threading.Event] = field(default_factory=dict)
    items: list[WorkItem] = field(default_factory=list)  # every item computed, in order
    built: int = 0  # workers the factory built
    builds_allowed: int | None = None  # the factory fails after this many
    warmed: list[list[int]] = field(default_factory=list)
    warmed_on: dict[str, list[int]] = field(default_factory=dict)  # by device kind
    warm_gate: threading.Event = field(default_factory=threading.Event)
    loop: asyncio.AbstractEventLoop | None = None
    _changed: asyncio.Event | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _acted: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.gate.set()
        self.warm_gate.set()

    def bind(self) -> None:
        """Call on the event loop before use, so worker threads can wake the test."""
        self.loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()

    def notify(self) -> None:
        self._acted.set()
        if self.loop is not None and self._changed is not None:
            self.loop.call_soon_threadsafe(self._changed.set)

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        """Wait (bounded) until ``condition()`` holds: re-checked whenever a worker acts, and
        every few milliseconds for what the event loop itself changes (the queue)."""
        assert self._changed is not None, "call bind() first"
        try:
            async with asyncio.timeout(WAIT_S):
                while not condition():
                    self._changed.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.005):
                            await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"gave up waiting for: {what}") from None

    def wait(self, condition: Callable[[], bool], what: str) -> None:
        """The same, from a thread that is not the event loop's (HTTP tests)."""
        deadline = time.monotonic() + WAIT_S
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"gave up waiting for: {what}")
            self._acted.wait(0.005)
            self._acted.clear()

    def factory(self, device: torch.device) -> FakeWorker:
        with self._lock:
            if self.builds_allowed is not None and self.built >= self.builds_allowed:
                raise RuntimeError("the device is gone (fake)")
            self.built += 1
        return FakeWorker(device, self)

    def computed_tags(self) -> list[int]:
        return [tag for batch in self.batches for tag in batch]


def tag_of(item: WorkItem) -> int:
    """The first pixel value; 0 for an encoded input (a JPEG left for the device to decode)."""
    return int(item.pixels[0, 0, 0]) if item.pixels is not None else 0


class FakeWorker:
    def __init__(self, device: torch.device, script: Script) -> None:
        self.device = device
        self.script = script

    def load(self, specs: Sequence[ModelSpec]) -> dict[str, ModelInfo]:
        return {spec.name: model_info(spec) for spec in specs}

    def warm_up(self, batch_sizes: Sequence[int]) -> None:
        self.script.warm_gate.wait(WAIT_S)
        self.script.warmed.append(list(batch_sizes))
        self.script.warmed_on[self.device.type] = list(batch_sizes)

    def compute(self, items: Sequence[WorkItem]) -> list[ItemResult]:
        script = self.script
        tags = [tag_of(item) for item in items]
        with script._lock:
            script.batches.append(tags)
            script.device_batches.append((self.device.type, tags))
            script.items.extend(items)
        script.notify()
        script.gates.get(self.device.type, script.gate).wait(WAIT_S)
        if script.fatal & set(tags):
            raise RuntimeError(FATAL_MESSAGE)
        if script.oom_above is not None and len(items) > script.oom_above:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        if script.killers & set(tags):
            raise SystemExit("fake crash")
        if script.poison & set(tags):
            raise ValueError(f"poisoned input among {tags}")
        return [ItemResult([(tag, 1.0)], [], 0.0, 1.5) for tag in tags]

    def release_memory(self) -> None:
        with self.script._lock:
            self.script.released += 1


def model_info(spec: ModelSpec) -> ModelInfo:
    return ModelInfo(
        name=spec.name, display_name=spec.name, version=spec.version, architecture=spec.architecture,
        num_classes=spec.num_classes, input_size=spec.input_size,
        labels=tuple(f"class {i}" for i in range(spec.num_classes)),
        layers=(LayerInfo("features.18", (1280, 7, 7), "Conv2d"),), default_layer="features.18",
        device="cpu", tail_layers=frozenset({"features.18"}),
    )


def specs() -> list[ModelSpec]:
    """Two models (the embedded one and a copy), for batches that must not mix models."""
    default = embedded_default()
    return [default, default.model_copy(update={"name": "other"})]


def settings(**overrides: object) -> Settings:
    values: dict[str, object] = {"device": "cpu", "max_batch_size": 4, "max_batch_delay_ms": 0,
                                 "max_queue": 64, "request_timeout_s": 30}
    # model_copy skips validation, so tests may use windows longer than operators may set.
    return Settings(**values).model_copy(update=overrides)  # type: ignore[arg-type]


def item(tag: int, model: str = "mobilenet_v2", methods: tuple[str, ...] | None = None,
         deadline_s: float = WAIT_S, enqueued: float | None = None) -> WorkItem:
    explain = None if methods is None else ExplainSpec(methods, ("features.18",), None, None, None)
    work = WorkItem(
        model=model, pixels=np.full((2, 2, 3), tag, np.uint8), topk=1, explain=explain,
        deadline=time.monotonic() + deadline_s, future=asyncio.get_running_loop().create_future(),
    )
    if enqueued is not None:
        work.enqueued = enqueued
    return work


def classes(results: Sequence[ItemResult]) -> list[int]:
    return [result.predictions[0][0] for result in results]


def fake_client() -> Iterator[TestClient]:
    """A TestClient of the whole app on fake workers, ready (for HTTP-level tests)."""
    from service.main import create_app

    app = create_app(settings(), worker_factory=Script().factory)
    with TestClient(app) as client:
        client.portal.call(app.state.engine.wait_ready)
        assert app.state.engine.state == "ready", app.state.engine.failure
        yield client


def tiny_png(side: int = 8, value: int = 5) -> bytes:
    """A small uniform RGB PNG."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@contextlib.contextmanager
def ready_clients(apps: Mapping[str, FastAPI]) -> Iterator[dict[str, TestClient]]:
    """A started TestClient per app, each engine ready; started one after the other (two
    models traced at once collide)."""
    with contextlib.ExitStack() as stack:
        clients = {}
        for name, app in apps.items():
            clients[name] = stack.enter_context(TestClient(app))
            clients[name].portal.call(app.state.engine.wait_ready)
            assert app.state.engine.state == "ready", app.state.engine.failure
        yield clients
