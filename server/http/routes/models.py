"""`/v1/models`: the base model and every adapter, as OpenAI lists models."""

from __future__ import annotations

from fastapi import APIRouter

from server.http.auth import AuthRoute, Caller, require
from server.http.errors import APIError
from server.http.state import Ready
from server.tenants import Tenant

router = APIRouter(dependencies=[require("inference")], route_class=AuthRoute)


def _models(st: Ready, tenant: Tenant) -> list[dict]:
    base_id, max_len = st.base.model_id, st.serving.max_model_len
    data = [{"id": base_id, "object": "model", "created": 0, "owned_by": "loraplex", "root": base_id, "parent": None,
             "max_model_len": max_len}]  # fmt: skip
    for a in st.catalog.list(tenant):
        data.append({"id": a.name, "object": "model", "created": a.created_at, "owned_by": a.owner or "system", "root": base_id,
                     "parent": base_id, "max_model_len": max_len})  # fmt: skip
    return data


@router.get("/v1/models")
def models(st: Ready, key: Caller) -> dict:
    return {"object": "list", "data": _models(st, key.as_tenant)}


@router.get("/v1/models/{model_id}")
def model(model_id: str, st: Ready, key: Caller) -> dict:
    for m in _models(st, key.as_tenant):
        if m["id"] == model_id:
            return m
    raise APIError(404, f"The model '{model_id}' does not exist.", "invalid_request_error", "model", "model_not_found")
