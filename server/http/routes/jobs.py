"""`/v1/fine_tuning/jobs`: create (every problem in one answer), list, show, cancel, events (a list or SSE). Jobs
belong to their creator's tenant, train only on its files, and register their adapter as its."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Query

from server.http.auth import AuthRoute, Caller, require
from server.http.errors import APIError
from server.http.protocol import JobCreateRequest
from server.http.sse import event_stream
from server.http.state import AppState, Ready, State
from server.jobs.service import JobRequest
from server.jobs.store import TERMINAL

router = APIRouter(dependencies=[require("train")], route_class=AuthRoute)
_EVENT_POLL = 0.5


@router.post("/v1/fine_tuning/jobs", status_code=201)
def create_job(body: JobCreateRequest, st: Ready, key: Caller) -> dict:  # checked against the loaded base model
    if body.adapter_name and body.suffix and body.adapter_name != body.suffix:
        raise APIError(400, "suffix and adapter_name both name the adapter: give one of them", param="suffix")
    try:
        hp = body.resolved_hyperparameters()
    except ValueError as e:
        raise APIError(400, str(e), param="method") from None
    req = JobRequest(
        training_file=body.training_file, adapter_name=body.adapter_name or body.suffix, method=body.method.type,
        hyperparameters=hp, validation_file=body.validation_file, model=body.model, seed=body.seed,
        max_seconds=body.max_seconds, overwrite=body.overwrite, suffix=body.suffix,
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
async def job_events(job_id: str, st: State, key: Caller, stream: bool = False, after: str = "0",
                     limit: int | None = Query(None, ge=0, le=10_000)):  # fmt: skip
    """The job's events, oldest first (`after`: the last event seen, its id or number, as OpenAI's cursor pages
    send it); `stream=true` follows them as SSE."""
    st.job_service.get_job(job_id, key.as_tenant)
    after = _event_number(after)
    if not stream:
        events = st.jobs.events(job_id, after, None if limit is None else limit + 1)
        more = limit is not None and len(events) > limit
        return {"object": "list", "data": [e.to_api() for e in events[:limit]], "has_more": more}
    return event_stream(_follow(st, job_id, after))


def _event_number(after: str) -> int:
    number = after.removeprefix("ftevent-")
    if not number.isdigit():
        raise APIError(422, "after must be an event id (ftevent-N) or number", param="after")
    return int(number)


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
def job_checkpoints(job_id: str, st: State, key: Caller, limit: int = Query(10, ge=1, le=100)) -> dict:
    """The job's checkpoints, newest first (OpenAI's order), each with its step and metrics."""
    job = st.job_service.get_job(job_id, key.as_tenant)
    checkpoints = [c.to_checkpoint(job) for c in reversed(st.jobs.checkpoints(job_id))]
    return {"object": "list", "data": checkpoints[:limit], "has_more": len(checkpoints) > limit,
            "first_id": checkpoints[0]["id"] if checkpoints else None,
            "last_id": checkpoints[min(limit, len(checkpoints)) - 1]["id"] if checkpoints else None}  # fmt: skip


async def _follow(st: AppState, job_id: str, after: int) -> AsyncIterator[dict]:
    """Every event after `after`, then new ones as they come, until the job has finished (then [DONE]); a client
    that goes away ends it (sse-starlette cancels it)."""
    while True:
        finished = st.jobs.get_job(job_id).status in TERMINAL  # read before the events: none is missed
        for e in st.jobs.events(job_id, after):
            after = e.seq
            yield {"data": json.dumps(e.to_api())}
        if finished:
            break
        if st.stopping:  # the end of a drain
            yield {"data": json.dumps(APIError(503, "the server is shutting down").envelope())}
            break
        await asyncio.sleep(_EVENT_POLL)
    yield {"data": "[DONE]"}
