"""Routes: health, metrics, models, completions and chat. They validate, translate, map errors."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.auth import check_key
from server.errors import APIError
from server.protocol import ChatCompletionRequest, CompletionRequest

router = APIRouter()


def state_of(request: Request):
    return request.app.state.loraplex


def require(scope: str):
    def dep(request: Request) -> None:
        check_key(state_of(request).api_keys, request, scope)

    return dep


def serving_of(request: Request):
    st = state_of(request)
    if st.draining:
        raise APIError(503, "the server is shutting down", "server_error", headers={"Retry-After": "5"})
    if not st.ready:
        msg = f"the model failed to load: {st.load_error}" if st.load_error else "the model is still loading"
        raise APIError(503, msg, "server_error", headers={"Retry-After": "5"})
    return st.serving


@router.get("/health/live")
def live(request: Request) -> JSONResponse:
    st = state_of(request)
    engine_dead = st.ready and not st.engine.alive and not st.draining
    if st.load_error or engine_dead:
        return JSONResponse({"status": "dead", "error": st.load_error or "the engine loop stopped"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/health/ready")
def ready(request: Request) -> JSONResponse:
    st = state_of(request)
    if st.ready and not st.draining and st.engine.alive:
        return JSONResponse({"status": "ready"})
    status = "draining" if st.draining else ("failed" if st.load_error else "loading")
    return JSONResponse({"status": status}, status_code=503)


@router.get("/metrics")
def metrics(request: Request) -> Response:
    st = state_of(request)
    if st.settings.metrics_require_key:
        check_key(st.api_keys, request, "inference")
    return Response(generate_latest(st.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", dependencies=[Depends(require("inference"))])
def models(request: Request) -> dict:
    serving = serving_of(request)
    base_id = serving.base.model_id
    data = [{"id": base_id, "object": "model", "created": 0, "owned_by": "loraplex", "root": base_id, "parent": None,
             "max_model_len": serving.max_model_len}]
    for a in serving.registry.list():
        data.append({"id": a.name, "object": "model", "created": a.created_at, "owned_by": "loraplex", "root": base_id,
                     "parent": base_id, "max_model_len": serving.max_model_len})
    return {"object": "list", "data": data}


@router.get("/v1/models/{model_id}", dependencies=[Depends(require("inference"))])
def model(model_id: str, request: Request) -> dict:
    for m in models(request)["data"]:
        if m["id"] == model_id:
            return m
    raise APIError(404, f"The model '{model_id}' does not exist.", "invalid_request_error", "model", "model_not_found")


async def _sse(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    """OpenAI's SSE framing; a failure after the stream started is sent as one error event."""
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
    except APIError as e:
        yield f"data: {json.dumps(e.envelope())}\n\n"
    except Exception:
        yield f"data: {json.dumps(APIError(500, 'internal server error', 'server_error').envelope())}\n\n"
    yield "data: [DONE]\n\n"


async def _unless_disconnected(request: Request, work):
    """Await `work`, cancelling it (which aborts its engine requests) if the client goes away."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise APIError(499, "the client closed the request", "invalid_request_error")


def _count(request: Request, endpoint: str, status: int) -> None:
    state_of(request).metrics.requests.labels(endpoint, str(status)).inc()


async def _generate(request: Request, endpoint: str, body, stream_fn, full_fn):
    serving = serving_of(request)
    try:
        if body.stream:
            chunks = await stream_fn(serving)(body)
            _count(request, endpoint, 200)
            return StreamingResponse(_sse(chunks), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        result = await _unless_disconnected(request, full_fn(serving)(body))
    except APIError as e:
        _count(request, endpoint, e.status)
        raise
    _count(request, endpoint, 200)
    return result


@router.post("/v1/completions", dependencies=[Depends(require("inference"))])
async def completions(body: CompletionRequest, request: Request):
    return await _generate(request, "completions", body, lambda s: s.stream_completion, lambda s: s.complete)


@router.post("/v1/chat/completions", dependencies=[Depends(require("inference"))])
async def chat_completions(body: ChatCompletionRequest, request: Request):
    return await _generate(request, "chat", body, lambda s: s.stream_chat, lambda s: s.chat)
