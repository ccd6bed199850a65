"""`/v1/fine_tuning/jobs`: create (every problem in one answer), list, show, cancel, events (a list or SSE). Jobs
belong to their creator's tenant, train only on its files, and register their adapter as its."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from server.http.auth import AuthRoute, Caller, require
from server.http.errors import APIError
from server.http.protocol import JobCreateRequest
from server.http.state import AppState, Ready, State
from server.jobs.service import JobRequest
from server.jobs.store import TERMINAL

router = APIRouter(dependencies=[require("train")], route_class=AuthRoute)
_EVENT_POLL = 0.5


@router.post("/v1/fine_tuning/jobs", status_code=201)
def create_job(body: JobCreateRequest, st: Ready, key: Caller) -> dict:  # checked against the loaded base model
    req = JobRequest(
        training_file=body.training_file, adapter_name=body.adapter_name, method=body.method.type,
        hyperparameters=body.method.hyperparameters.resolved(), validation_file=body.validation_file, model=body.model,
        seed=body.seed, max_seconds=body.max_seconds, overwrite=body.overwrite,
    )  # fmt: skip
    return st.job_service.create(req, key.as_tenant).to_api()


@router.get("/v1/fine_tuning/jobs")
def list_jobs(st: State, key: Caller) -> dict:
    return {"object": "list", "data": [j.to_api() for j in st.job_service.list_jobs(key.as_tenant)], "has_more": False}


@router.get("/v1/fine_tuning/jobs/{job_id}")
def get_job(job_id: str, st: State, key: Caller) -> dict:
    return st.job_service.get_job(job_id, key.as_tenant).to_api()


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, st: State, key: Caller) -> dict:
    return (await st.job_service.cancel(job_id, key.as_tenant)).to_api()


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
async def job_events(job_id: str, st: State, request: Request, key: Caller, stream: bool = False, after: int = 0,
                     limit: int | None = Query(None, ge=0, le=10_000)):  # fmt: skip
    """The job's events, oldest first (`after`: the last event number seen); `stream=true` follows them as SSE."""
    st.job_service.get_job(job_id, key.as_tenant)
    if not stream:
        events = st.jobs.events(job_id, after, None if limit is None else limit + 1)
        more = limit is not None and len(events) > limit
        return {"object": "list", "data": [e.to_api() for e in events[:limit]], "has_more": more}
    return StreamingResponse(_follow(st, request, job_id, after), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})  # fmt: skip


async def _follow(st: AppState, request: Request, job_id: str, after: int) -> AsyncIterator[str]:
    """Every event after `after`, then new ones as they come, until the job has finished (then [DONE])."""
    while True:
        finished = st.jobs.get_job(job_id).status in TERMINAL  # read before the events: none is missed
        for e in st.jobs.events(job_id, after):
            after = e.seq
            yield f"data: {json.dumps(e.to_api())}\n\n"
        if finished:
            break
        if st.stopping:  # the end of a drain
            yield f"data: {json.dumps(APIError(503, 'the server is shutting down').envelope())}\n\n"
            break
        if await request.is_disconnected():
            return
        await asyncio.sleep(_EVENT_POLL)
    yield "data: [DONE]\n\n"
