"""Health and metrics: `/health/live`, `/health/ready` (never need a key), `/metrics` (Prometheus text)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.http.auth import check_key
from server.http.state import State

router = APIRouter()


@router.get("/health/live")
def live(st: State) -> JSONResponse:
    engine_dead = st.ready and not st.engine.alive and not st.draining
    if st.load_error or engine_dead:
        return JSONResponse({"status": "dead", "error": st.load_error or "the engine loop stopped"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/health/ready")
def ready(st: State) -> JSONResponse:
    if st.ready and not st.draining and st.engine.alive:
        body = {"status": "ready"}
        if st.engine.compiling:  # serving eagerly while the compiled backend's graphs are built in the background
            done, total = st.engine.runner.warm_progress
            body["compiling"] = {"done": done, "total": total}
        return JSONResponse(body)
    status = "draining" if st.draining else ("failed" if st.load_error else "loading")
    return JSONResponse({"status": status}, status_code=503)


@router.get("/metrics")
def metrics(st: State, request: Request) -> Response:
    if st.settings.metrics_require_key:
        check_key(st.api_keys, request, "inference")
    return Response(generate_latest(st.metrics.registry), media_type=CONTENT_TYPE_LATEST)
