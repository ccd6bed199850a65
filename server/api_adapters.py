"""Adapter routes: upload (validated, versioned, atomic), list, show, delete, download.

An upload is streamed to a scratch directory under the body cap, extracted if it is an
archive, validated against this base model (every problem reported at once), written to the
store by one rename and registered: it is servable when the 201 arrives. Uploads of one name
are serialised, so concurrent ones cannot leave a mixed state; running requests keep the
version they started with.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import tarfile
from pathlib import Path

from fastapi import APIRouter, Depends, Request, Response
from starlette.datastructures import UploadFile

from adapters.archive import extract_adapter_archive
from adapters.names import is_valid_name
from adapters.peft_io import CONFIG_NAME, WEIGHTS_NAME, AdapterError, load_peft_adapter
from adapters.registry import Adapter, AdapterNotFound
from server.api import require, serving_of, state_of
from server.errors import APIError
from server.threads import in_thread

router = APIRouter()
_ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz")


def adapter_object(a: Adapter, parent: str) -> dict:
    return {
        "id": a.name, "object": "adapter", "parent": parent, "rank": a.rank, "alpha": a.alpha,
        "target_modules": a.target_modules, "size_bytes": a.size_bytes, "sha256": a.sha256,
        "version": a.version, "created_at": a.created_at,
    }


def _role(field: str, upload: UploadFile) -> str:
    """Which file of an upload this part is: by field name, else by file name."""
    for candidate in (field, Path(upload.filename or "").name):
        if candidate in (CONFIG_NAME, WEIGHTS_NAME, "archive"):
            return candidate
        if candidate.endswith(_ARCHIVE_SUFFIXES):
            return "archive"
        if candidate.endswith(".bin") or candidate.endswith((".pt", ".pth", ".pkl")):
            return "pickle"
    return "unknown"


def _not_found(name: str) -> APIError:
    return APIError(404, f"The adapter '{name}' does not exist.", "invalid_request_error", "name", "model_not_found")


def _write(upload: UploadFile, dest: Path) -> None:
    upload.file.seek(0)
    with open(dest, "wb") as out:
        shutil.copyfileobj(upload.file, out, 1 << 20)


@router.post("/v1/adapters", status_code=201, dependencies=[Depends(require("admin"))])
async def upload_adapter(request: Request, overwrite: bool = False) -> dict:
    serving = serving_of(request)
    st = state_of(request)
    form = await request.form(max_files=4, max_fields=8)
    try:
        name = form.get("name")
        if not isinstance(name, str) or not name:
            raise APIError(422, "the form field 'name' is required", "invalid_request_error", "name")
        name_problems = [] if is_valid_name(name) else [
            f"invalid adapter name {name!r}: it must match ^[A-Za-z0-9][A-Za-z0-9._-]{{0,63}}$"]
        file_problems: list[str] = []  # problems that leave nothing to validate
        files: dict[str, UploadFile] = {}
        for field, value in form.multi_items():
            if isinstance(value, UploadFile):
                role = _role(field, value)
                if role == "pickle":
                    name_problems.append(f"pickle weights ({value.filename or field}) are refused: upload {WEIGHTS_NAME}")
                elif role == "unknown" or role in files:
                    file_problems.append(f"unexpected file field {field!r} ({value.filename})")
                else:
                    files[role] = value
        if "archive" in files and len(files) > 1:
            file_problems.append("send either an archive or the two PEFT files, not both")
        elif "archive" not in files:
            for f in (CONFIG_NAME, WEIGHTS_NAME):
                if f not in files:
                    file_problems.append(f"missing file {f} (or send one 'archive' .zip / .tar.gz)")
        if file_problems:
            raise APIError(400, "; ".join(name_problems + file_problems), "invalid_request_error", "file")
        return await _register(st, serving, name, files, overwrite, name_problems)
    finally:
        await form.close()


async def _register(st, serving, name: str, files: dict[str, UploadFile], overwrite: bool, problems: list[str]) -> dict:
    """Validate the files (reporting them together with the form's `problems`), store, register."""
    scratch = st.store.scratch_dir()
    adapter_dir = scratch / "adapter"
    adapter_dir.mkdir()
    try:
        def prepare():
            if "archive" in files:
                _write(files["archive"], scratch / "archive")
                extract_adapter_archive(scratch / "archive", adapter_dir, st.settings.max_upload_bytes)
            else:
                for role, upload in files.items():
                    _write(upload, adapter_dir / role)

        await asyncio.to_thread(prepare)
        adapter = await register_adapter_dir(st, name, adapter_dir, overwrite, problems)
        return adapter_object(adapter, serving.base.model_id)
    except AdapterError as e:
        raise APIError(400, "invalid adapter: " + "; ".join(problems + e.problems), "invalid_request_error", "file") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


async def register_adapter_dir(st, name: str, adapter_dir: Path, overwrite: bool, problems: list[str] = ()) -> Adapter:
    """Validate a PEFT adapter directory against this base model, store it and register it: servable on return.

    Raises AdapterError with every problem (`problems` first), or APIError 409 if the name is taken
    and not `overwrite`. Shared by uploads and training jobs, so a trained adapter passes the same checks.
    """
    serving = st.serving
    try:
        weights = await in_thread(load_peft_adapter, adapter_dir, serving.layer_shapes, st.settings.max_lora_rank)
    except AdapterError as e:
        raise AdapterError(list(problems) + e.problems) from None
    if problems:
        raise AdapterError(list(problems))
    lock = st.name_locks.setdefault(name, asyncio.Lock())
    async with lock:
        if not overwrite:
            try:
                st.registry.get(name)
                raise APIError(409, f"an adapter named '{name}' exists (use ?overwrite=true to replace it)",
                               "invalid_request_error", "name", "adapter_exists")
            except AdapterNotFound:
                pass
        version = st.registry.next_version(name)
        stored = await asyncio.to_thread(st.store.save, name, adapter_dir, version)
        adapter = st.registry.add(name, weights, overwrite=overwrite, path=stored.path, sha256=stored.sha256,
                                  size_bytes=stored.size_bytes, version=version)
        await asyncio.to_thread(st.store.prune, name, version)
    st.engine.drop_retired()
    return adapter


@router.get("/v1/adapters", dependencies=[Depends(require("inference"))])
def list_adapters(request: Request) -> dict:
    serving = serving_of(request)
    return {"object": "list", "data": [adapter_object(a, serving.base.model_id) for a in serving.registry.list()]}


@router.get("/v1/adapters/{name}", dependencies=[Depends(require("inference"))])
def get_adapter(name: str, request: Request) -> dict:
    serving = serving_of(request)
    try:
        return adapter_object(serving.registry.get(name), serving.base.model_id)
    except AdapterNotFound:
        raise _not_found(name) from None


@router.delete("/v1/adapters/{name}", status_code=204, dependencies=[Depends(require("admin"))])
async def delete_adapter(name: str, request: Request) -> Response:
    serving = serving_of(request)
    st = state_of(request)
    async with st.name_locks.setdefault(name, asyncio.Lock()):
        try:
            serving.registry.remove(name)  # running requests keep their version until they finish
        except AdapterNotFound:
            raise _not_found(name) from None
        await asyncio.to_thread(st.store.delete, name)
    st.engine.drop_retired()
    return Response(status_code=204)


@router.get("/v1/adapters/{name}/download", dependencies=[Depends(require("inference"))])
async def download_adapter(name: str, request: Request) -> Response:
    serving = serving_of(request)
    try:
        adapter = serving.registry.get(name)
    except AdapterNotFound:
        raise _not_found(name) from None

    def pack() -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for f in (CONFIG_NAME, WEIGHTS_NAME):
                tar.add(adapter.path / f, arcname=f"{name}/{f}")
        return buf.getvalue()

    data = await asyncio.to_thread(pack)
    return Response(data, media_type="application/gzip",
                    headers={"Content-Disposition": f'attachment; filename="{name}.tar.gz"'})
