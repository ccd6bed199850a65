"""`/v1/files`: training files (JSONL), checked line by line on upload (`server.jobs.service`); each belongs to the
uploader's tenant (another tenant finds no such id; an admin finds all)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from starlette.datastructures import UploadFile

from server.http.auth import AuthRoute, Caller, require
from server.http.errors import APIError
from server.http.state import State

router = APIRouter(dependencies=[require("train")], route_class=AuthRoute)


@router.post("/v1/files")
async def upload_file(st: State, request: Request, key: Caller) -> dict:
    form = await request.form(max_files=1, max_fields=4)
    try:
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise APIError(422, "the form field 'file' (a JSONL file) is required", "invalid_request_error", "file")
        if purpose != "fine-tune":
            raise APIError(400, "purpose must be 'fine-tune'", "invalid_request_error", "purpose")
        upload.file.seek(0)
        record = await asyncio.to_thread(st.job_service.add_file, upload.file, upload.filename or "train.jsonl",
                                         purpose, key.as_tenant)  # fmt: skip
        return record.to_api()
    finally:
        await form.close()


@router.get("/v1/files")
def list_files(st: State, key: Caller) -> dict:
    return {"object": "list", "data": [f.to_api() for f in st.job_service.list_files(key.as_tenant)]}


@router.get("/v1/files/{file_id}")
def get_file(file_id: str, st: State, key: Caller) -> dict:
    return st.job_service.get_file(file_id, key.as_tenant).to_api()


@router.get("/v1/files/{file_id}/content")
def file_content(file_id: str, st: State, key: Caller) -> FileResponse:
    record = st.job_service.get_file(file_id, key.as_tenant)
    return FileResponse(st.job_service.file_path(file_id), media_type="application/jsonl", filename=record.filename)


@router.delete("/v1/files/{file_id}")
def delete_file(file_id: str, st: State, key: Caller) -> dict:
    st.job_service.delete_file(file_id, key.as_tenant)
    return {"id": file_id, "object": "file", "deleted": True}
