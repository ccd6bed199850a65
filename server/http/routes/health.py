"""Health, metrics and the API's own description: `/health/live`, `/health/ready` (never need a key), `/metrics`
(Prometheus text), `/openapi.json`, `/docs` and `/redoc` (each behind its access setting: open, key or admin)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.http.auth import authenticate
from server.http.errors import APIError
from server.http.state import AppState, State

router = APIRouter()


@router.get("/health/live")
def live(st: State) -> JSONResponse:
    engine_dead = st.ready and not st.engine.alive and not st.draining
    if st.load_error or engine_dead:
        return JSONResponse({"status": "dead", "error": st.load_error or "the engine loop stopped"}, status_code=503)
    return JSONResponse({"status": "ok"})


def readiness(st: AppState) -> dict:
    """`/health/ready`'s body: `status` (= `phase`: converting, loading, compiling, ready, draining or failed), the
    failure's `reason`, `compiling` {done, total} graphs while they are built, and `skipped` (what start-up left out,
    each with why)."""
    if st.draining:
        phase = "draining"
    elif st.load_error or (st.ready and not st.engine.alive):
        phase = "failed"
    else:
        phase = "ready" if st.ready else st.phase
    body: dict = {"status": phase, "phase": phase}
    if phase == "failed":
        body["reason"] = st.load_error or "the engine loop stopped"
    body["skipped"] = [{"name": name, "reason": why} for name, why in sorted(st.skipped.items())]
    compiling = phase == "compiling" or (phase == "ready" and st.engine.compiling)  # the latter: serving eagerly
    if compiling and st.engine is not None:
        done, total = st.engine.runner.warm_progress
        body["compiling"] = {"done": done, "total": total}
    return body


@router.get("/health/ready")
def ready(st: State) -> JSONResponse:
    body = readiness(st)
    return JSONResponse(body, status_code=200 if body["phase"] == "ready" else 503)


def _check_access(st: AppState, request: Request, access: str) -> None:
    """`access` (open, key, admin) for a route outside /v1, when keys are configured."""
    if access == "open" or st.api_keys is None:
        return
    key = authenticate(st.api_keys, request)
    if access == "admin" and not key.admin:
        raise APIError(403, "This API key lacks the 'admin' scope.", "permission_error", code="insufficient_scope")


@router.get("/metrics")
def metrics(st: State, request: Request) -> Response:
    _check_access(st, request, st.settings.metrics_access)
    return Response(generate_latest(st.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/openapi.json", include_in_schema=False)
def openapi(st: State, request: Request) -> JSONResponse:
    _check_access(st, request, st.settings.docs_access)
    return JSONResponse(request.app.openapi())


@router.get("/docs", include_in_schema=False)
def docs(st: State, request: Request) -> HTMLResponse:
    _check_access(st, request, st.settings.docs_access)
    return get_swagger_ui_html(openapi_url="/openapi.json", title="loraplex")


@router.get("/redoc", include_in_schema=False)
def redoc(st: State, request: Request) -> HTMLResponse:
    _check_access(st, request, st.settings.docs_access)
    return get_redoc_html(openapi_url="/openapi.json", title="loraplex")
