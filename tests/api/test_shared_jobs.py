"""Jobs shared by front-end processes through one folder (service.api.sharedjobs): two stores
on one folder stand for two processes; one runs a job, the other sees, follows and cancels it.
The real processes are tests/test_frontends.py."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from service.api.jobstore import Job, JobStore
from service.api.sharedjobs import SharedJobs, Snapshot
from service.config import Settings
from service.engine.jobs import WorkItem
from service.errors import NotFound, ServiceUnavailable
from tests import sse


def _item() -> WorkItem:
    future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    return WorkItem("m", np.zeros((1, 1, 3), np.uint8), 1, None, time.monotonic() + 60, future)  # type: ignore[arg-type]


class Runner:
    """A job's work: reports ``steps`` passes, one each time the test lets it."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.step = asyncio.Semaphore(0)
        self.started = asyncio.Event()
        self.stopped = False

    async def __call__(self, items: list[WorkItem]) -> bytes:
        self.started.set()
        try:
            for done in range(1, self.steps + 1):
                await self.step.acquire()
                report = items[0].on_progress
                assert report is not None
                report(done, self.steps)
        except asyncio.CancelledError:
            self.stopped = True
            raise
        return json.dumps({"answer": 42}).encode()


def stores(tmp_path: Path, **settings: object) -> tuple[JobStore, JobStore]:
    shared = Settings(**settings)  # type: ignore[arg-type]
    return (JobStore(shared, shared=SharedJobs(tmp_path / "jobs")),
            JobStore(shared, shared=SharedJobs(tmp_path / "jobs")))


async def until(condition: object, what: str) -> None:
    deadline = time.monotonic() + 20
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"gave up waiting for: {what}"
        await asyncio.sleep(0.02)


async def collect(stream: object) -> list[tuple[str, dict[str, object]]]:
    lines: list[str] = []
    async for chunk in stream:  # type: ignore[attr-defined]
        lines.extend(chunk.decode().splitlines())
    return list(sse.events(lines))


def test_another_store_sees_and_follows_a_job_to_its_result(tmp_path: Path) -> None:
    async def scenario() -> None:
        owner, other = stores(tmp_path)
        runner = Runner(steps=4)
        job = owner.create([_item()], ("scorecam",), "r1", runner)
        seen = other.get(job.job_id)
        assert isinstance(seen, Snapshot) and seen.status == "queued"
        assert json.loads(seen.dumps())["job_id"] == job.job_id

        following = asyncio.create_task(collect(other.events(seen)))
        for done in range(1, 5):
            runner.step.release()
            # Each pass is published (at most every 0.2 s), and the follower reads it.
            await until(lambda d=done: json.loads(other.get(job.job_id).dumps())["progress"]["done"] >= d,
                        f"pass {done} seen from the other store")
        events = await asyncio.wait_for(following, 20)
        names = [name for name, _ in events]
        assert names[-1] == "done" and names.count("done") == 1
        progress = [data["done"] for name, data in events if name == "progress"]
        assert progress == sorted(progress) and len(set(progress)) >= 2
        final = events[-1][1]
        assert final["status"] == "succeeded" and final["result"] == {"answer": 42}
        assert json.loads(other.get(job.job_id).dumps()) == json.loads(owner.get(job.job_id).dumps())
        await owner.close()
        await other.close()

    asyncio.run(scenario())


def test_another_store_cancels_a_running_job(tmp_path: Path) -> None:
    async def scenario() -> None:
        owner, other = stores(tmp_path)
        runner = Runner(steps=100)
        job = owner.create([_item()], ("scorecam",), "r1", runner)
        runner.step.release()
        await until(lambda: other.get(job.job_id).status == "running", "the job to run")
        answer = await other.cancel(job.job_id)
        assert answer.status == "cancelled"
        assert json.loads(answer.dumps())["error"]["code"] == "cancelled"
        assert runner.stopped  # the owner stopped its work, not just its record
        assert owner.get(job.job_id).status == "cancelled"
        await owner.close()
        await other.close()

    asyncio.run(scenario())


def test_the_bounds_count_every_stores_jobs_and_expiry_frees_them(tmp_path: Path) -> None:
    async def scenario() -> None:
        first, second = stores(tmp_path, max_jobs=2, job_ttl_s=60)
        quick = Runner(steps=0)
        done = first.create([_item()], ("gradcam",), "r1", quick)
        second.create([_item()], ("gradcam",), "r2", Runner(steps=100))
        for store in (first, second):
            with pytest.raises(ServiceUnavailable) as full:
                store.create([_item()], ("gradcam",), "r3", Runner(steps=1))
            assert "2 of 2 jobs held" in full.value.message and "Retry-After" in (full.value.headers or {})
        await asyncio.wait_for(done.task, 20)  # type: ignore[arg-type]
        assert second.get(done.job_id).status == "succeeded"
        # Past its TTL the finished job is gone for both, and its place is free again.
        done.finished_at = time.time() - 61
        first._publish(done)
        with pytest.raises(NotFound):
            second.get(done.job_id)
        with pytest.raises(NotFound):
            first.get(done.job_id)
        second.create([_item()], ("gradcam",), "r4", Runner(steps=1))
        await first.close()
        await second.close()

    asyncio.run(scenario())


def test_a_job_whose_process_died_is_reported_failed(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    shared = SharedJobs(tmp_path / "jobs")
    job = Job(job_id="ab" * 16, request_id="r1", methods=("scorecam",), status="running", done=3, total=10)
    shared.publish(job.job_id, {"owner": gone.pid, "status": "running", "progress": job.progress(),
                                "eta_s": 1.0, "finished_at": None, "result_bytes": 0}, job.dumps())

    async def scenario() -> None:
        store = JobStore(Settings(), shared=shared)
        seen = store.get(job.job_id)
        body = json.loads(seen.dumps())
        assert seen.status == "failed" and body["status"] == "failed"
        assert body["error"]["code"] == "internal" and "stopped" in body["error"]["message"]
        assert body["finished_at"] is not None and body["progress"]["done"] == 3
        events = await collect(store.events(seen))
        assert [name for name, _ in events] == ["done"] and events[0][1]["status"] == "failed"
        await store.close()

    asyncio.run(scenario())
    # Rewritten for every reader: a plain read now finds it finished.
    again = shared.read(job.job_id)
    assert again is not None and again.finished


def test_names_that_are_not_job_ids_never_reach_the_folder(tmp_path: Path) -> None:
    shared = SharedJobs(tmp_path / "jobs")
    (tmp_path / "secret.json").write_text("{}")
    for name in ("../secret", "..", "x" * 32, "AB" * 16):
        assert shared.read(name) is None
        shared.request_cancel(name)
    assert sorted(p.name for p in (tmp_path / "jobs").iterdir()) == []
