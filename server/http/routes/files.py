"""`/v1/files`: training files (JSONL), checked line by line on upload (`server.jobs.service`)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from starlette.datastructures import UploadFile

from server.http.errors import APIError
from server.http.state import State, require
from server.jobs.service import Conflict, JobRefused, NotFound

router = APIRouter(dependencies=[require("admin")])


def not_found(e: NotFound) -> APIError:
    """The 404 of a missing job, file or model (OpenAI's messages and params)."""
    if e.what == "model":
        return APIError(404, f"The model '{e.id}' does not exist.", "invalid_request_error", "model", "model_not_found")
    if e.what == "job":
        return APIError(404, f"No fine-tuning job with id '{e.id}'.", "invalid_request_error", "fine_tuning_job_id")
    return APIError(404, f"No file with id '{e.id}'.", "invalid_request_error", "file_id")


def conflict(e: Conflict) -> APIError:
    return APIError(409, e.message, "invalid_request_error", e.param, e.code)


@router.post("/v1/files")
async def upload_file(st: State, request: Request) -> dict:
    form = await request.form(max_files=1, max_fields=4)
    try:
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise APIError(422, "the form field 'file' (a JSONL file) is required", "invalid_request_error", "file")
        if purpose != "fine-tune":
            raise APIError(400, "purpose must be 'fine-tune'", "invalid_request_error", "purpose")
        upload.file.seek(0)
        try:
            record = await asyncio.to_thread(st.job_service.add_file, upload.file, upload.filename or "train.jsonl",
                                             purpose)  # fmt: skip
            return record.to_api()
        except JobRefused as e:
            raise APIError(400, "; ".join(e.problems), "invalid_request_error", "file") from None
    finally:
        await form.close()


@router.get("/v1/files")
def list_files(st: State) -> dict:
    return {"object": "list", "data": [f.to_api() for f in st.jobs.list_files()]}


@router.get("/v1/files/{file_id}")
def get_file(file_id: str, st: State) -> dict:
    try:
        return st.job_service.get_file(file_id).to_api()
    except NotFound as e:
        raise not_found(e) from None


@router.get("/v1/files/{file_id}/content")
def file_content(file_id: str, st: State) -> FileResponse:
    try:
        record = st.job_service.get_file(file_id)
    except NotFound as e:
        raise not_found(e) from None
    return FileResponse(st.job_service.file_path(file_id), media_type="application/jsonl", filename=record.filename)


@router.delete("/v1/files/{file_id}")
def delete_file(file_id: str, st: State) -> dict:
    try:
        st.job_service.delete_file(file_id)
    except NotFound as e:
        raise not_found(e) from None
    except Conflict as e:
        raise conflict(e) from None
    return {"id": file_id, "object": "file", "deleted": True}
