"""`/v1/completions` and `/v1/chat/completions`: streamed as SSE or answered whole (OpenAI's shapes, through
`server.http.openai`). Streams are `sse-starlette`'s event-source responses (keep-alive pings, the client's
disconnect noticed and the generation cancelled); a client that goes away is noticed while its request waits in the
queue too (streamed or not): its engine requests are aborted before they are admitted."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from functools import partial

from fastapi import APIRouter, Request, Response

from server.http.auth import AuthRoute, Caller, require
from server.http.errors import APIError
from server.http.protocol import ChatCompletionRequest, CompletionRequest
from server.http.sse import event_stream
from server.http.state import AppState, Ready

log = logging.getLogger(__name__)
router = APIRouter(dependencies=[require("inference")], route_class=AuthRoute)


async def _sse(chunks: AsyncIterator[dict]) -> AsyncIterator[dict]:
    """OpenAI's events (`data: {chunk}`, then `data: [DONE]`); a failure after the stream started is sent as one
    error event."""
    try:
        async for chunk in chunks:
            yield {"data": json.dumps(chunk, ensure_ascii=False, allow_nan=False)}
    except APIError as e:
        yield {"data": json.dumps(e.envelope())}
    except Exception:
        log.exception("a stream failed")
        yield {"data": json.dumps(APIError(500, "internal server error", "server_error").envelope())}
    yield {"data": "[DONE]"}


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


async def _generate(st: AppState, request: Request, key, endpoint: str, body, stream_fn, full_fn):
    count = st.metrics.requests.labels
    limit_headers: dict[str, str] = {}  # x-ratelimit-*-tokens, filled in when the request is admitted
    args = dict(tenant=key.as_tenant, admit=partial(st.rate_limits.admit, key, headers=limit_headers))
    try:
        if body.stream:
            chunks = await _unless_disconnected(request, stream_fn(body, **args))  # queued: still watched
            count(endpoint, "200").inc()
            response = event_stream(_sse(chunks))
            response.headers.update(limit_headers)
            return response
        result = await _unless_disconnected(request, full_fn(body, **args))
    except APIError as e:
        count(endpoint, str(e.status)).inc()
        raise
    count(endpoint, "200").inc()
    content = await asyncio.to_thread(json.dumps, result, ensure_ascii=False, allow_nan=False)
    return Response(content, media_type="application/json", headers=limit_headers)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, st: Ready, request: Request, key: Caller):
    return await _generate(st, request, key, "completions", body, st.serving.stream_completion, st.serving.complete)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, st: Ready, request: Request, key: Caller):
    return await _generate(st, request, key, "chat", body, st.serving.stream_chat, st.serving.chat)
