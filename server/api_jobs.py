"""Routes for training: `/v1/files` and `/v1/fine_tuning/jobs` (API.md, Training jobs; OpenAI-shaped).

A training file is checked line by line when it is uploaded (every bad line named, with its
number) and kept under an id. A job is checked whole at creation — files, adapter name, rank,
target modules, steps and wall-clock budget against the server's limits, every problem in one
answer — then queued for the runner (`server.jobs`). Events come as a list or as SSE.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, StreamingResponse
from starlette.datastructures import UploadFile

from adapters.data import DataError, read_jsonl
from adapters.names import is_valid_name
from adapters.peft_io import CONFIG_NAME, WEIGHTS_NAME, AdapterError
from adapters.registry import AdapterNotFound
from adapters.trainer import TrainConfig, count_steps
from server.api import require, serving_of, state_of
from server.api_adapters import register_adapter_dir
from server.errors import APIError
from server.job_store import TERMINAL, FileRecord, IllegalTransition, new_id
from server.protocol import JobCreateRequest

router = APIRouter()
_EVENT_POLL = 0.5


def _job_not_found(job_id: str) -> APIError:
    return APIError(404, f"No fine-tuning job with id '{job_id}'.", "invalid_request_error", "fine_tuning_job_id")


def _file_not_found(file_id: str) -> APIError:
    return APIError(404, f"No file with id '{file_id}'.", "invalid_request_error", "file_id")


# --- files -------------------------------------------------------------------------------


@router.post("/v1/files", dependencies=[Depends(require("admin"))])
async def upload_file(request: Request) -> dict:
    st = state_of(request)
    form = await request.form(max_files=1, max_fields=4)
    try:
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise APIError(422, "the form field 'file' (a JSONL file) is required", "invalid_request_error", "file")
        if purpose != "fine-tune":
            raise APIError(400, "purpose must be 'fine-tune'", "invalid_request_error", "purpose")
        file_id = new_id("file")
        dest = st.runner.file_path(file_id)
        dest.parent.mkdir(parents=True, exist_ok=True)

        def keep() -> int:
            fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
            try:
                upload.file.seek(0)
                with os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(upload.file, out, 1 << 20)
                n = len(read_jsonl(Path(tmp), max_examples=st.settings.max_training_examples))
                os.replace(tmp, dest)
                return n
            finally:
                Path(tmp).unlink(missing_ok=True)

        try:
            examples = await asyncio.to_thread(keep)
        except DataError as e:
            raise APIError(400, "invalid training file: " + "; ".join(e.problems), "invalid_request_error", "file") from None
        record = FileRecord(id=file_id, filename=Path(upload.filename or "train.jsonl").name, bytes=dest.stat().st_size,
                            purpose=purpose, examples=examples, created_at=int(time.time()))
        st.jobs.add_file(record)
        return record.to_api()
    finally:
        await form.close()


@router.get("/v1/files", dependencies=[Depends(require("admin"))])
def list_files(request: Request) -> dict:
    return {"object": "list", "data": [f.to_api() for f in state_of(request).jobs.list_files()]}


@router.get("/v1/files/{file_id}", dependencies=[Depends(require("admin"))])
def get_file(file_id: str, request: Request) -> dict:
    record = state_of(request).jobs.get_file(file_id)
    if record is None:
        raise _file_not_found(file_id)
    return record.to_api()


@router.get("/v1/files/{file_id}/content", dependencies=[Depends(require("admin"))])
def file_content(file_id: str, request: Request) -> FileResponse:
    st = state_of(request)
    record = st.jobs.get_file(file_id)
    if record is None:
        raise _file_not_found(file_id)
    return FileResponse(st.runner.file_path(file_id), media_type="application/jsonl", filename=record.filename)


@router.delete("/v1/files/{file_id}", dependencies=[Depends(require("admin"))])
def delete_file(file_id: str, request: Request) -> dict:
    st = state_of(request)
    if st.jobs.get_file(file_id) is None:
        raise _file_not_found(file_id)
    if st.jobs.file_in_use(file_id):
        raise APIError(409, f"the file '{file_id}' is used by a job that has not finished", "invalid_request_error", "file_id")
    st.jobs.delete_file(file_id)
    st.runner.file_path(file_id).unlink(missing_ok=True)
    return {"id": file_id, "object": "file", "deleted": True}


# --- jobs --------------------------------------------------------------------------------


@router.post("/v1/fine_tuning/jobs", status_code=201, dependencies=[Depends(require("admin"))])
def create_job(body: JobCreateRequest, request: Request) -> dict:
    st = state_of(request)
    serving = serving_of(request)  # checks are against the loaded base model
    s = st.settings
    if body.model is not None and body.model != serving.base.model_id:
        raise APIError(404, f"The model '{body.model}' does not exist; jobs train adapters of '{serving.base.model_id}'.",
                       "invalid_request_error", "model", "model_not_found")
    hp = {k: (None if v == "auto" else v) for k, v in body.method.hyperparameters.model_dump().items()}
    hp["alpha"] = hp["alpha"] or 2.0 * hp["rank"]
    problems: list[str] = []
    if not is_valid_name(body.adapter_name):
        problems.append(f"invalid adapter_name {body.adapter_name!r}: it must match ^[A-Za-z0-9][A-Za-z0-9._-]{{0,63}}$")
    files = {}
    for param in ("training_file", "validation_file"):
        file_id = getattr(body, param)
        if file_id is not None:
            files[param] = st.jobs.get_file(file_id)
            if files[param] is None:
                problems.append(f"{param}: no file with id '{file_id}'")
    for key in ("rank", "export_rank"):
        if hp[key] is not None and hp[key] > s.max_lora_rank:
            problems.append(f"{key} {hp[key]} is over this server's maximum of {s.max_lora_rank}")
    known = {name.rsplit(".", 1)[-1] for name in serving.layer_shapes}
    unknown = sorted(set(hp["target_modules"] or []) - known)
    if unknown:
        problems.append(f"target_modules {unknown} are not linear layers of this model (it has {sorted(known)})")
    if hp["target_modules"] == []:
        problems.append("target_modules must name at least one module (or be left out for all linear layers)")
    max_seconds = body.max_seconds or s.max_job_seconds
    if max_seconds > s.max_job_seconds:
        problems.append(f"max_seconds {max_seconds:g} is over this server's limit of {s.max_job_seconds:g}")
    try:
        cfg = TrainConfig(model="", train_file=Path(), out_dir=Path(), method=body.method.type,
                          **{k: v for k, v in hp.items() if v is not None and k in TrainConfig.__dataclass_fields__})
    except ValueError as e:  # the trainer's own cross-field checks
        problems.append(str(e))
        cfg = None
    total_steps = 0
    if cfg is not None and files.get("training_file"):
        total_steps = count_steps(cfg, files["training_file"].examples)
        if total_steps > s.max_train_steps:
            problems.append(f"this job would take {total_steps} optimizer steps, over this server's limit of "
                            f"{s.max_train_steps} (lower n_epochs or set max_steps)")
    if problems:
        raise APIError(400, "; ".join(problems), "invalid_request_error")
    if not body.overwrite:
        try:
            serving.registry.get(body.adapter_name)
            raise APIError(409, f"an adapter named '{body.adapter_name}' exists (set \"overwrite\": true to replace it "
                           "when the job succeeds)", "invalid_request_error", "adapter_name", "adapter_exists")
        except AdapterNotFound:
            pass
    if any(j.adapter_name == body.adapter_name for j in st.jobs.list_jobs() if j.status not in TERMINAL):
        raise APIError(409, f"a job that has not finished already trains '{body.adapter_name}'", "invalid_request_error",
                       "adapter_name", "adapter_exists")
    method = {"type": body.method.type, "hyperparameters": hp, "overwrite": body.overwrite}
    seed = body.seed if body.seed is not None else int.from_bytes(os.urandom(4), "little") >> 1
    job = st.jobs.add_job(adapter_name=body.adapter_name, method=method, training_file=body.training_file,
                          validation_file=body.validation_file, seed=seed, total_steps=total_steps, max_seconds=max_seconds)
    st.runner.notify()
    return job.to_api()


@router.get("/v1/fine_tuning/jobs", dependencies=[Depends(require("admin"))])
def list_jobs(request: Request) -> dict:
    return {"object": "list", "data": [j.to_api() for j in state_of(request).jobs.list_jobs()], "has_more": False}


@router.get("/v1/fine_tuning/jobs/{job_id}", dependencies=[Depends(require("admin"))])
def get_job(job_id: str, request: Request) -> dict:
    job = state_of(request).jobs.get_job(job_id)
    if job is None:
        raise _job_not_found(job_id)
    return job.to_api()


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel", dependencies=[Depends(require("admin"))])
async def cancel_job(job_id: str, request: Request) -> dict:
    st = state_of(request)
    if st.jobs.get_job(job_id) is None:
        raise _job_not_found(job_id)
    try:
        job = await st.runner.cancel(job_id)
    except IllegalTransition as e:
        raise APIError(409, f"the job is {e.status}; only a queued or running job can be cancelled",
                       "invalid_request_error", "fine_tuning_job_id") from None
    return job.to_api()


@router.get("/v1/fine_tuning/jobs/{job_id}/events", dependencies=[Depends(require("admin"))])
async def job_events(job_id: str, request: Request, stream: bool = False, after: int = 0, limit: int | None = None):
    """The job's events, oldest first (`after`: the last event number seen); `stream=true` follows them as SSE."""
    st = state_of(request)
    if st.jobs.get_job(job_id) is None:
        raise _job_not_found(job_id)
    if not stream:
        events = st.jobs.events(job_id, after, None if limit is None else limit + 1)
        more = limit is not None and len(events) > limit
        return {"object": "list", "data": [e.to_api() for e in events[:limit]], "has_more": more}
    return StreamingResponse(_follow(st, request, job_id, after), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def _follow(st, request: Request, job_id: str, after: int) -> AsyncIterator[str]:
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


async def register_trained(st, job, adapter_dir: Path) -> str | None:
    """The runner's `register`: a trained adapter passes an upload's validation, then serves at once."""
    scratch = st.store.scratch_dir()
    try:
        for f in (CONFIG_NAME, WEIGHTS_NAME):
            await asyncio.to_thread(shutil.copyfile, adapter_dir / f, scratch / f)
        await register_adapter_dir(st, job.adapter_name, scratch, bool(job.method.get("overwrite")))
        return None
    except AdapterError as e:
        return "; ".join(e.problems)
    except APIError as e:
        return e.message
    except FileNotFoundError:
        return "the trainer wrote no adapter"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

