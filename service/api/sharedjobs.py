"""Jobs shared by the front-end processes (:mod:`service.frontends`) through one folder.

A job runs in the process that accepted it (its owner); a client's next request may land on
any other. So the owner publishes each job's state as one file, ``<job_id>.json``, written to a
temporary name and renamed over the old one (readers see a whole snapshot or the previous
one): a header line (owner pid, status, progress, when it finished, the result's size), then
the job object exactly as ``GET /jobs/{id}`` answers it. Progress is published at most every
:data:`PUBLISH_EVERY_S`, every change of status at once.

Other processes answer ``GET /jobs/{id}`` from the file, follow it for ``/events`` by polling
it, and cancel with a marker file ``<job_id>.cancel`` that the owner looks for every
:data:`CANCEL_POLL_S`. A job whose owner has died unfinished is reported ``failed`` (and the
file rewritten so), never left running. The store's bounds (``CAMSERVE_MAX_JOBS``,
``CAMSERVE_JOB_STORE_MB``) and the TTL count every process's jobs: the files are counted under
a lock (``flock``) when a job is created, and any process removes expired ones.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

PUBLISH_EVERY_S = 0.2  # progress files written at most this often per job
CANCEL_POLL_S = 0.2  # how often an owner looks for cancel markers
FOLLOW_POLL_S = 0.1  # how often another process re-reads a job it follows
FINAL = ("succeeded", "failed", "cancelled")
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")  # uuid4().hex: nothing else names a file here


@dataclass(frozen=True)
class Snapshot:
    """A job as its owner last published it."""

    job_id: str
    owner: int
    status: str
    progress: dict[str, Any]
    eta_s: float | None
    finished_at: float | None
    result_bytes: int
    body: bytes  # the job object, JSON

    @property
    def finished(self) -> bool:
        return self.status in FINAL

    def dumps(self) -> bytes:
        return self.body


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SharedJobs:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._lock_path = directory / ".lock"

    def _path(self, job_id: str, suffix: str = ".json") -> Path | None:
        return self.directory / f"{job_id}{suffix}" if _JOB_ID.match(job_id) else None

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Held while the jobs are counted and a new one is added, across processes."""
        with self._lock_path.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def publish(self, job_id: str, header: dict[str, Any], body: bytes) -> None:
        """Write the job's snapshot atomically (rename over the previous one)."""
        path = self._path(job_id)
        assert path is not None, job_id
        fd, temporary = tempfile.mkstemp(dir=self.directory, prefix=f".{job_id}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(orjson.dumps({"owner": os.getpid(), **header}))
                handle.write(b"\n")
                handle.write(body)
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise

    def read(self, job_id: str, whole: bool = True) -> Snapshot | None:
        """The job's last snapshot (``whole=False``: its header only, ``body`` empty); None when
        no process holds it. A job whose owner died before it finished is marked failed here,
        for every reader."""
        path = self._path(job_id)
        if path is None:
            return None
        try:
            with path.open("rb") as handle:
                first = handle.readline()
                body = handle.read() if whole else b""
        except FileNotFoundError:
            return None
        header = orjson.loads(first)
        snapshot = Snapshot(job_id, int(header["owner"]), header["status"], header["progress"],
                            header.get("eta_s"), header.get("finished_at"),
                            int(header.get("result_bytes", 0)), body)
        if not snapshot.finished and not process_alive(snapshot.owner):
            return self._owner_gone(snapshot) if whole else self.read(job_id)
        return snapshot

    def _owner_gone(self, snapshot: Snapshot) -> Snapshot:
        view = orjson.loads(snapshot.body)
        now = time.time()
        view["status"] = "failed"
        view["eta_s"] = 0.0
        view["finished_at"] = _iso(now)
        view["error"] = {"code": "internal", "message": "the process running this job stopped before "
                         "it finished; please submit it again",
                         "request_id": (view.get("error") or {}).get("request_id", "")}
        header = {"status": "failed", "progress": snapshot.progress, "eta_s": 0.0, "finished_at": now,
                  "result_bytes": 0}
        body = orjson.dumps(view)
        self.publish(snapshot.job_id, {**header, "dead_owner": snapshot.owner}, body)
        return Snapshot(snapshot.job_id, os.getpid(), "failed", snapshot.progress, 0.0, now, 0, body)

    def request_cancel(self, job_id: str) -> None:
        path = self._path(job_id, ".cancel")
        if path is not None:
            path.touch()

    def cancel_requested(self, job_id: str) -> bool:
        path = self._path(job_id, ".cancel")
        return path is not None and path.exists()

    def remove(self, job_id: str) -> None:
        for suffix in (".json", ".cancel"):
            path = self._path(job_id, suffix)
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def census(self, ttl_s: float) -> tuple[int, int, float | None]:
        """Remove expired finished jobs; then (jobs held, bytes of finished results, when the
        earliest finished job finished). Call under :meth:`lock`."""
        held, stored, earliest = 0, 0, None
        cutoff = time.time() - ttl_s
        for path in self.directory.glob("*.json"):
            snapshot = self.read(path.stem, whole=False)
            if snapshot is None:
                continue
            if snapshot.finished_at is not None and snapshot.finished_at < cutoff:
                self.remove(snapshot.job_id)
                continue
            held += 1
            stored += snapshot.result_bytes
            if snapshot.finished_at is not None:
                earliest = snapshot.finished_at if earliest is None else min(earliest, snapshot.finished_at)
        return held, stored, earliest


def _iso(epoch: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
