"""`/v1/adapters`: upload (validated, versioned, atomic), list, show, publish, delete, download.

An upload is streamed to a scratch directory under the body cap, extracted if it is an archive, and handed to
the adapter catalog (`server.catalog`), which validates it against this base model (every problem reported at
once), stores and registers it: it is servable when the 201 arrives. Each adapter belongs to the uploader's
tenant: a key lists and shows its own and the published ones; only the owner (or an admin) replaces, publishes,
deletes or downloads it (an `inference` key never downloads weights).
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict
from starlette.datastructures import UploadFile

from adapters.archive import extract_adapter_archive
from adapters.names import name_problem
from adapters.peft_io import CONFIG_NAME, WEIGHTS_NAME, AdapterError
from adapters.tiers.registry import Adapter
from server.catalog import AdapterCatalog
from server.http.auth import AuthRoute, Caller, require
from server.http.errors import APIError
from server.http.state import Ready
from server.tenants import Tenant

router = APIRouter(route_class=AuthRoute)
_ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz")
SYSTEM_OWNER = "system"  # owned_by of the operator's adapters (--adapter-dir, stores from before tenants)


def adapter_object(a: Adapter, parent: str) -> dict:
    return {
        "id": a.name, "object": "adapter", "parent": parent, "rank": a.rank, "alpha": a.alpha,
        "target_modules": a.target_modules, "size_bytes": a.size_bytes, "sha256": a.sha256,
        "version": a.version, "created_at": a.created_at, "owned_by": a.owner or SYSTEM_OWNER, "public": a.public,
    }  # fmt: skip


class AdapterUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    public: bool


def _flag(value: object) -> bool | None:
    """A form field's boolean (true/false, 1/0, yes/no); None when absent."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise APIError(422, "the form field 'public' must be true or false", "invalid_request_error", "public")


def _role(field: str, upload: UploadFile) -> str:
    """Which file of an upload this part is: by field name, else by file name."""
    for candidate in (field, Path(upload.filename or "").name):
        if candidate in (CONFIG_NAME, WEIGHTS_NAME, "archive"):
            return candidate
        if candidate.endswith(_ARCHIVE_SUFFIXES):
            return "archive"
        if candidate.endswith((".bin", ".pt", ".pth", ".pkl")):
            return "pickle"
    return "unknown"


def _write(upload: UploadFile, dest: Path) -> None:
    upload.file.seek(0)
    with open(dest, "wb") as out:
        shutil.copyfileobj(upload.file, out, 1 << 20)


@router.post("/v1/adapters", status_code=201, dependencies=[require("train")])
async def upload_adapter(st: Ready, request: Request, key: Caller, overwrite: bool = False) -> dict:
    form = await request.form(max_files=4, max_fields=8)
    try:
        name = form.get("name")
        if not isinstance(name, str) or not name:
            raise APIError(422, "the form field 'name' is required", "invalid_request_error", "name")
        public = _flag(form.get("public"))
        problems: list[str] = []  # reported with the validation's own
        file_problems: list[str] = []  # problems that leave nothing to validate
        files: dict[str, UploadFile] = {}
        for field, value in form.multi_items():
            if isinstance(value, UploadFile):
                role = _role(field, value)
                if role == "pickle":
                    problems.append(f"pickle weights ({value.filename or field}) are refused: upload {WEIGHTS_NAME}")
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
            named = [p for p in [name_problem(name)] if p]
            raise APIError(400, "; ".join(named + problems + file_problems), "invalid_request_error", "file")
        adapter = await _add(st.catalog, name, files, overwrite, problems, st.settings.max_upload_bytes,
                             key.as_tenant, public)  # fmt: skip
        return adapter_object(adapter, st.base.model_id)
    finally:
        await form.close()


async def _add(catalog: AdapterCatalog, name: str, files: dict[str, UploadFile], overwrite: bool,
               problems: list[str], max_bytes: int, tenant: Tenant, public: bool | None) -> Adapter:  # fmt: skip
    """Assemble the PEFT directory from the form's files in a scratch directory, then `catalog.add` it."""
    scratch = catalog.scratch_dir()
    adapter_dir = scratch / "adapter"
    adapter_dir.mkdir()
    try:

        def prepare() -> None:
            if "archive" in files:
                _write(files["archive"], scratch / "archive")
                extract_adapter_archive(scratch / "archive", adapter_dir, max_bytes)
            else:
                for role, upload in files.items():
                    _write(upload, adapter_dir / role)

        try:
            await asyncio.to_thread(prepare)
        except AdapterError as e:  # the archive itself: nothing to validate
            raise AdapterError([p for p in [catalog.name_problem(name)] if p] + problems + e.problems) from None
        return await catalog.add(name, adapter_dir, overwrite, problems, tenant, public)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@router.get("/v1/adapters", dependencies=[require("inference", "train")])
def list_adapters(st: Ready, key: Caller) -> dict:
    return {"object": "list", "data": [adapter_object(a, st.base.model_id) for a in st.catalog.list(key.as_tenant)]}


@router.get("/v1/adapters/{name}", dependencies=[require("inference", "train")])
def get_adapter(name: str, st: Ready, key: Caller) -> dict:
    return adapter_object(st.catalog.get(name, key.as_tenant), st.base.model_id)


@router.patch("/v1/adapters/{name}", dependencies=[require("train")])
async def update_adapter(name: str, body: AdapterUpdate, st: Ready, key: Caller) -> dict:
    """Publish (`{"public": true}`) or withdraw an adapter: its owner's or an admin's decision."""
    return adapter_object(await st.catalog.publish(name, body.public, key.as_tenant), st.base.model_id)


@router.delete("/v1/adapters/{name}", status_code=204, dependencies=[require("train")])
async def delete_adapter(name: str, st: Ready, key: Caller) -> Response:
    await st.catalog.delete(name, key.as_tenant)  # running requests keep their version until they finish
    return Response(status_code=204)


@router.get("/v1/adapters/{name}/download", dependencies=[require("train")])
async def download_adapter(name: str, st: Ready, key: Caller) -> Response:
    adapter = st.catalog.get_owned(name, key.as_tenant)
    return Response(await st.catalog.archive(adapter), media_type="application/gzip",
                    headers={"Content-Disposition": f'attachment; filename="{name}.tar.gz"'})  # fmt: skip
