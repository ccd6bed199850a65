"""`/v1/fine_tuning/jobs`: create (every problem in one answer), list, show, cancel, events (a list or SSE)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from server.http.protocol import JobCreateRequest
from server.http.state import AppState, Ready, State, require
from server.jobs.service import JobRequest
from server.jobs.store import TERMINAL

router = APIRouter(dependencies=[require("admin")])
_EVENT_POLL = 0.5


@router.post("/v1/fine_tuning/jobs", status_code=201)
def create_job(body: JobCreateRequest, st: Ready) -> dict:  # checked against the loaded base model
    req = JobRequest(
        training_file=body.training_file, adapter_name=body.adapter_name, method=body.method.type,
        hyperparameters=body.method.hyperparameters.resolved(), validation_file=body.validation_file, model=body.model,
        seed=body.seed, max_seconds=body.max_seconds, overwrite=body.overwrite,
    )  # fmt: skip
    return st.job_service.create(req).to_api()


@router.get("/v1/fine_tuning/jobs")
def list_jobs(st: State) -> dict:
    return {"object": "list", "data": [j.to_api() for j in st.jobs.list_jobs()], "has_more": False}


@router.get("/v1/fine_tuning/jobs/{job_id}")
def get_job(job_id: str, st: State) -> dict:
    return st.job_service.get_job(job_id).to_api()


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, st: State) -> dict:
    return (await st.job_service.cancel(job_id)).to_api()


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
async def job_events(job_id: str, st: State, request: Request, stream: bool = False, after: int = 0,
                     limit: int | None = None):  # fmt: skip
    """The job's events, oldest first (`after`: the last event number seen); `stream=true` follows them as SSE."""
    st.job_service.get_job(job_id)
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
        if await request.is_disconnected():
            return
        await asyncio.sleep(_EVENT_POLL)
    yield "data: [DONE]\n\n"
