"""``POST /jobs``, ``GET /jobs/{id}``, ``GET /jobs/{id}/events``, ``DELETE /jobs/{id}``.

The contract is ``API.md``'s "Jobs"; the store and its states are :mod:`service.api.jobstore`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, Form, Path, Request, Response
from fastapi.responses import StreamingResponse

from service.api import pipeline
from service.api.deps import EngineDep, SettingsDep
from service.api.errors import error_responses, request_id_of
from service.api.jobstore import Job, JobStore
from service.api.options import ExplainForm, plan_explain
from service.api.schemas import JobOut
from service.api.sharedjobs import Snapshot
from service.engine.jobs import WorkItem

router = APIRouter(tags=["jobs"])

JobId = Annotated[str, Path(description="the job's id, as POST /jobs answered it",
                            examples=["9a1c0e5d2b7f4a3c8e6d1f0a2b3c4d5e"])]


def _store(request: Request) -> JobStore:
    store: JobStore = request.app.state.jobs
    return store


def _job(job: Job | Snapshot, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(job.dumps(), status_code=status_code, media_type="application/json", headers=headers)


@router.post(
    "/jobs",
    status_code=202,
    response_model=JobOut,
    summary="Submit an explanation as a job",
    description=(
        "The same multipart form as POST /explain, checked and decoded before the answer (a bad "
        "request gets its 4xx now). The work runs in the heavy lane; follow it with GET /jobs/{id} "
        "or its server-sent events, and stop it with DELETE /jobs/{id}. Answers 202 with the job "
        "and `Location: /jobs/{id}`; 503 with Retry-After when the job store is full."
    ),
    responses=error_responses(400, 401, 404, 413, 415, 422, 500, 503),
)
async def submit_job(
    request: Request,
    engine: EngineDep,
    settings: SettingsDep,
    form: Annotated[ExplainForm, Form(media_type="multipart/form-data")],
) -> Response:
    store = _store(request)
    request_id = request_id_of(request)
    timer = pipeline.Timer()
    plan = plan_explain(form, engine.catalog, engine.methods, settings.default_model)
    prepared = await pipeline.prepare_explain(
        plan, await pipeline.read_files(form.file), settings,
        time.monotonic() + settings.job_timeout_s, engine.admit, timer=timer,
    )
    for item in prepared.items:
        item.heavy = True
    for item in prepared.items:
        item.background = True
    engine.price(prepared.items)  # over the pass budget: 422 now, not a failed job later
    engine.admit_heavy(prepared.items)  # a full heavy lane: 503 now, not a job that fails at once

    async def run(items: Sequence[WorkItem]) -> bytes:
        results = await engine.submit(items)
        payload, _ = await pipeline.finish(prepared, results, request_id, settings)
        return payload

    job = store.create(prepared.items, plan.methods, request_id, run)
    return _job(job, 202, {"Location": f"/jobs/{job.job_id}"})


@router.get(
    "/jobs/{job_id}",
    response_model=JobOut,
    summary="A job: status, progress, ETA, and its result once it has succeeded",
    responses=error_responses(401, 404),
)
async def get_job(request: Request, job_id: JobId) -> Response:
    return _job(_store(request).get(job_id))


@router.get(
    "/jobs/{job_id}/events",
    summary="A job's progress as server-sent events",
    description=(
        "`text/event-stream`: a `progress` event (the progress object and `eta_s`) whenever passes "
        "complete, then one `done` event whose data is the whole job; the stream then closes."
    ),
    responses={200: {"content": {"text/event-stream": {}}, "description": "the event stream"},
               **error_responses(401, 404)},
)
async def job_events(request: Request, job_id: JobId) -> StreamingResponse:
    store = _store(request)
    job = store.get(job_id)
    return StreamingResponse(
        store.events(job), media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.delete(
    "/jobs/{job_id}",
    response_model=JobOut,
    summary="Cancel a job",
    description="No further pass of the job runs. Answers the job: `cancelled`, or its final state "
    "if it had already finished.",
    responses=error_responses(401, 404),
)
async def cancel_job(request: Request, job_id: JobId) -> Response:
    return _job(await _store(request).cancel(job_id))

