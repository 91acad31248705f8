"""Jobs: long explanations that a client follows instead of holding a connection open.

A job is an ``/explain`` request (checked and decoded before ``POST /jobs`` answers, so a bad
request still gets its 4xx at once) whose work items run in the engine's heavy lane with a
deadline of ``CAMSERVE_JOB_TIMEOUT_S``. Its progress is what the scheduler reports as passes
complete (:mod:`service.cams.passes`), never an estimate; its result is the ``POST /explain``
response body, kept as JSON bytes for ``CAMSERVE_JOB_TTL_S`` after it finished.

The store holds at most ``CAMSERVE_MAX_JOBS`` jobs, and finished results up to
``CAMSERVE_JOB_STORE_MB``; past either a new job is answered 503 with ``Retry-After``. Jobs live
in this process only (with several front-end processes, in the folder they share,
:mod:`service.api.sharedjobs`, so any of them answers for any job): a restart forgets them.
At shutdown the engine drains (running jobs may finish within ``CAMSERVE_DRAIN_TIMEOUT_S``)
and every job still unfinished is marked ``cancelled`` with the reason, never dropped silently.

States: ``queued`` -> ``running`` -> ``succeeded`` | ``failed`` | ``cancelled``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from service.api.errors import error_body
from service.api.sharedjobs import CANCEL_POLL_S, FOLLOW_POLL_S, PUBLISH_EVERY_S, SharedJobs, Snapshot
from service.config import Settings
from service.engine.jobs import WorkItem
from service.errors import NotFound, ServiceError, ServiceUnavailable
from service.logs import request_state

log = logging.getLogger(__name__)

FINAL = ("succeeded", "failed", "cancelled")
KEEP_ALIVE_S = 15.0  # a comment line on an idle event stream, so proxies keep it open
REMOTE_CANCEL_WAIT_S = 10.0  # DELETE of another process's job: how long to wait for it to stop


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Job:
    job_id: str
    request_id: str
    methods: tuple[str, ...]
    created_at: float = field(default_factory=time.time)
    status: str = "queued"
    started_at: float | None = None
    finished_at: float | None = None
    done: int = 0
    total: int = 1
    result: bytes | None = None  # the /explain response body, JSON
    error: dict[str, Any] | None = None
    task: asyncio.Task[None] | None = None
    _items_done: dict[int, int] = field(default_factory=dict)
    _items_total: dict[int, int] = field(default_factory=dict)
    _running_since: float | None = None  # time.monotonic()
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    on_change: Callable[[Job], None] | None = None  # the store's: publishes to other processes

    @property
    def finished(self) -> bool:
        return self.status in FINAL

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the rate this job's passes have run so far (0 once finished)."""
        if self.finished:
            return 0.0
        if self._running_since is None or self.done <= 0:
            return None
        rate = self.done / max(time.monotonic() - self._running_since, 1e-6)
        return round(max(self.total - self.done, 0) / rate, 1)

    def progress(self) -> dict[str, Any]:
        fraction = self.done / self.total if self.total else 1.0
        return {"done": self.done, "total": self.total, "fraction": round(min(fraction, 1.0), 4)}

    def view(self) -> dict[str, Any]:
        """The job object of the contract (``result`` embedded as the JSON it already is)."""
        return {
            "job_id": self.job_id,
            "status": self.status,
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "progress": self.progress(),
            "eta_s": self.eta_s,
            "methods": list(self.methods),
            "result": orjson.Fragment(self.result) if self.result is not None else None,
            "error": self.error,
        }

    def dumps(self) -> bytes:
        return orjson.dumps(self.view())

    # changes, from the engine's progress reports and the job's own task ----------------------

    def item_progress(self, index: int, done: int, total: int) -> None:
        if self.finished:
            return
        if self.status == "queued":
            self.status, self.started_at = "running", time.time()
            self._running_since = time.monotonic()
        self._items_done[index] = max(self._items_done.get(index, 0), done)
        self._items_total[index] = total
        self.done = max(self.done, sum(self._items_done.values()))  # never decreases
        self.total = max(self.done, sum(self._items_total.values()))
        self._touch()

    def finish(self, status: str, result: bytes | None = None, error: dict[str, Any] | None = None) -> None:
        if self.finished:
            return
        self.status, self.result, self.error = status, result, error
        self.finished_at = time.time()
        if status == "succeeded":
            self.total = self.done = max(self.done, self.total)
        self._touch()

    def _touch(self) -> None:
        self._changed.set()
        if self.on_change is not None:
            self.on_change(self)

    async def changed(self, timeout_s: float) -> bool:
        """Wait for the next change (True) or ``timeout_s`` (False)."""
        self._changed.clear()
        try:
            async with asyncio.timeout(timeout_s):
                await self._changed.wait()
        except TimeoutError:
            return False
        return True


Runner = Callable[[Sequence[WorkItem]], Awaitable[bytes]]


def _reporter(job: Job, index: int) -> Callable[[int, int], None]:
    def report(done: int, total: int) -> None:
        job.item_progress(index, done, total)

    return report


class JobStore:
    def __init__(self, settings: Settings, on_finish: Callable[[Job, float], None] | None = None,
                 shared: SharedJobs | None = None) -> None:
        """``on_finish(job, seconds)`` is told of every job that ends (the metrics); ``shared``:
        the folder of the front-end processes (none: this process alone)."""
        self.settings = settings
        self.on_finish = on_finish
        self.shared = shared
        self._jobs: dict[str, Job] = {}
        self._closing = False
        # Shared mode: when each job was last published, with which status, and the timers of
        # progress not yet published; the task that looks for other processes' cancellations.
        self._published: dict[str, tuple[float, str]] = {}
        self._pending: dict[str, asyncio.TimerHandle] = {}
        self._watcher: asyncio.Task[None] | None = None

    def stop_accepting(self) -> None:
        """Shutdown begins: no new jobs, and what the engine cuts short counts as cancelled."""
        self._closing = True

    def create(self, items: Sequence[WorkItem], methods: tuple[str, ...], request_id: str,
               run: Runner) -> Job:
        """Hold a new job for ``items`` and start ``run(items)`` (which returns the result JSON)
        in the background; 503 when the store is full."""
        if self._closing:
            raise ServiceUnavailable("the service is shutting down; no new jobs",
                                     headers={"Retry-After": "5"})
        self._expire()
        job = Job(job_id=uuid.uuid4().hex, request_id=request_id, methods=methods)
        if self.shared is None:
            finished = [j.finished_at for j in self._jobs.values() if j.finished_at is not None]
            self._check_room(len(self._jobs), sum(len(j.result or b"") for j in self._jobs.values()),
                             min(finished, default=None))
        else:
            with self.shared.lock():  # counted and added at once, whichever process asks
                self._check_room(*self.shared.census(self.settings.job_ttl_s))
                self._publish(job)
            job.on_change = self._changed
            if self._watcher is None:
                self._watcher = asyncio.create_task(self._watch_cancels(), name="camserve-job-cancels")
        for index, item in enumerate(items):
            item.heavy = True  # jobs run in the heavy lane, whatever they cost
            item.background = True
            item.request_id = request_id
            item.on_progress = _reporter(job, index)
        job.total = max(1, sum(item.passes for item in items))
        self._jobs[job.job_id] = job
        if self.shared is not None:
            self._publish(job)  # with its total
        # A context of its own: the POST request's state (access log, metrics) is not the job's.
        context = contextvars.Context()
        context.run(request_state.set, {"request_id": request_id})
        job.task = asyncio.create_task(self._run(job, items, run), name=f"camserve-job-{job.job_id}",
                                       context=context)
        log.info("job created", extra={"job_id": job.job_id, "request_id": request_id,
                                       "methods": list(methods), "passes": job.total})
        return job

    def get(self, job_id: str) -> Job | Snapshot:
        """The job: this process's own, or (front ends) another's as last published."""
        self._expire()
        job = self._jobs.get(job_id)
        if job is not None:
            return job
        snapshot = self._shared_get(job_id)
        if snapshot is None:
            raise NotFound(f"no job {job_id[:64]!r}: unknown, or expired {self.settings.job_ttl_s:g} s "
                           "after it finished")
        return snapshot

    def _shared_get(self, job_id: str) -> Snapshot | None:
        if self.shared is None:
            return None
        snapshot = self.shared.read(job_id)
        if (snapshot is not None and snapshot.finished_at is not None
                and snapshot.finished_at < time.time() - self.settings.job_ttl_s):
            self.shared.remove(job_id)
            return None
        return snapshot

    async def cancel(self, job_id: str) -> Job | Snapshot:
        """Stop the job (no further pass of it runs); a finished job is returned as it is.
        Another process's job is asked to stop, and answered once it has (bounded wait)."""
        job = self.get(job_id)
        if isinstance(job, Snapshot):
            return await self._cancel_elsewhere(job)
        if not job.finished:
            job.finish("cancelled", error=error_body(
                "cancelled", "the job was cancelled by a client", job.request_id)["error"])
            if job.task is not None:
                job.task.cancel()
                await asyncio.gather(job.task, return_exceptions=True)
        return job

    async def _cancel_elsewhere(self, snapshot: Snapshot) -> Snapshot:
        assert self.shared is not None
        if snapshot.finished:
            return snapshot
        self.shared.request_cancel(snapshot.job_id)
        deadline = time.monotonic() + REMOTE_CANCEL_WAIT_S
        while time.monotonic() < deadline:
            await asyncio.sleep(FOLLOW_POLL_S)
            snapshot = self._shared_get(snapshot.job_id) or snapshot
            if snapshot.finished:
                break
        return snapshot

    async def _watch_cancels(self) -> None:
        """The owner's side of a cancellation asked for by another process."""
        assert self.shared is not None
        while True:
            await asyncio.sleep(CANCEL_POLL_S)
            for job in [j for j in self._jobs.values() if not j.finished]:
                if self.shared.cancel_requested(job.job_id):
                    log.info("job cancelled from another front end", extra={"job_id": job.job_id})
                    with contextlib.suppress(ServiceError):  # expired meanwhile: nothing to stop
                        await self.cancel(job.job_id)

    def _changed(self, job: Job) -> None:
        """Publish a change: a new status at once, progress at most every PUBLISH_EVERY_S."""
        last, status = self._published.get(job.job_id, (0.0, ""))
        wait = last + PUBLISH_EVERY_S - time.monotonic()
        if status != job.status or wait <= 0:
            self._publish(job)
        elif job.job_id not in self._pending:
            self._pending[job.job_id] = asyncio.get_running_loop().call_later(wait, self._publish, job)

    def _publish(self, job: Job) -> None:
        assert self.shared is not None
        pending = self._pending.pop(job.job_id, None)
        if pending is not None:
            pending.cancel()
        header = {"status": job.status, "progress": job.progress(), "eta_s": job.eta_s,
                  "finished_at": job.finished_at, "result_bytes": len(job.result or b"")}
        try:
            self.shared.publish(job.job_id, header, job.dumps())
        except OSError:
            log.exception("could not publish a job to the other front ends", extra={"job_id": job.job_id})
        self._published[job.job_id] = (time.monotonic(), job.status)

    async def close(self) -> None:
        """At shutdown, after the engine drained: whatever is unfinished is marked cancelled."""
        self._closing = True
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        unfinished = [job for job in self._jobs.values() if not job.finished]
        for job in unfinished:
            if job.task is not None:
                job.task.cancel()
        await asyncio.gather(*(j.task for j in unfinished if j.task), return_exceptions=True)
        for job in unfinished:
            job.finish("cancelled", error=self._shutdown_error(job))
        if unfinished:
            log.warning("jobs cancelled at shutdown", extra={"jobs": len(unfinished)})
        for pending in self._pending.values():
            pending.cancel()

    def counts(self) -> dict[str, int]:
        """Jobs held, by status (for the metrics): the expired ones are let go first."""
        self._expire()
        found = dict.fromkeys(("queued", "running", *FINAL), 0)
        for job in self._jobs.values():
            found[job.status] += 1
        return found

    async def events(self, job: Job | Snapshot) -> AsyncIterator[bytes]:
        """Server-sent events: ``progress`` whenever passes complete, then one ``done`` with
        the whole job; the stream then ends."""
        if isinstance(job, Snapshot):
            async for event in self._follow(job):
                yield event
            return
        sent: tuple[str, int, int] | None = None
        while True:
            if job.finished:
                yield b"event: done\ndata: " + job.dumps() + b"\n\n"
                return
            now = (job.status, job.done, job.total)
            if now != sent:
                sent = now
                data = orjson.dumps({**job.progress(), "eta_s": job.eta_s})
                yield b"event: progress\ndata: " + data + b"\n\n"
            if not await job.changed(KEEP_ALIVE_S):
                yield b": still running\n\n"

    async def _follow(self, snapshot: Snapshot) -> AsyncIterator[bytes]:
        """The same events for another process's job, from its published snapshots."""
        sent: tuple[object, ...] | None = None
        quiet_since = time.monotonic()
        while True:
            if snapshot.finished:
                yield b"event: done\ndata: " + snapshot.dumps() + b"\n\n"
                return
            now = (snapshot.status, snapshot.progress.get("done"), snapshot.progress.get("total"))
            if now != sent:
                sent, quiet_since = now, time.monotonic()
                data = orjson.dumps({**snapshot.progress, "eta_s": snapshot.eta_s})
                yield b"event: progress\ndata: " + data + b"\n\n"
            elif time.monotonic() - quiet_since >= KEEP_ALIVE_S:
                quiet_since = time.monotonic()
                yield b": still running\n\n"
            await asyncio.sleep(FOLLOW_POLL_S)
            latest = self._shared_get(snapshot.job_id)
            if latest is None:  # expired or removed meanwhile: the stream ends as the job did
                return
            snapshot = latest

    # internals ---------------------------------------------------------------------------

    async def _run(self, job: Job, items: Sequence[WorkItem], run: Runner) -> None:
        try:
            result = await run(items)
        except asyncio.CancelledError:
            job.finish("cancelled", error=self._shutdown_error(job) if self._closing else error_body(
                "cancelled", "the job was cancelled before it finished", job.request_id)["error"])
            raise
        except ServiceError as exc:
            if isinstance(exc, ServiceUnavailable) and self._closing:
                job.finish("cancelled", error=self._shutdown_error(job))
            else:
                job.finish("failed", error=error_body(exc.code, exc.message, job.request_id)["error"])
        except Exception:
            log.exception("job failed", extra={"job_id": job.job_id})
            job.finish("failed", error=error_body(
                "internal", "the job failed inside the service; please submit it again",
                job.request_id)["error"])
        else:
            job.finish("succeeded", result=result)
        finally:
            seconds = (job.finished_at or time.time()) - job.created_at
            log.info("job finished", extra={"job_id": job.job_id, "status": job.status,
                                            "passes": job.done, "seconds": round(seconds, 3)})
            if self.on_finish is not None:
                self.on_finish(job, seconds)

    @staticmethod
    def _shutdown_error(job: Job) -> dict[str, Any]:
        return error_body("shutdown", "the service stopped before this job finished; submit it again",
                          job.request_id)["error"]

    def _expire(self) -> None:
        cutoff = time.time() - self.settings.job_ttl_s
        for job_id in [j.job_id for j in self._jobs.values()
                       if j.finished and (j.finished_at or 0) < cutoff]:
            del self._jobs[job_id]
            if self.shared is not None:
                self.shared.remove(job_id)
                self._published.pop(job_id, None)

    def _check_room(self, held: int, stored: int, earliest_finished: float | None) -> None:
        """503 when ``held`` jobs or ``stored`` bytes of results reach the bounds."""
        limit = self.settings.job_store_mb * 1024 * 1024
        if held < self.settings.max_jobs and stored < limit:
            return
        wait = (earliest_finished + self.settings.job_ttl_s - time.time()) if earliest_finished else 60.0
        what = (f"{held} of {self.settings.max_jobs} jobs held" if held >= self.settings.max_jobs
                else f"finished results use {stored / 2**20:.0f} of {self.settings.job_store_mb:g} MB")
        raise ServiceUnavailable(
            f"the job store is full ({what}); retry later, or fetch and let finished jobs expire",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )
