"""`/v1/completions` and `/v1/chat/completions`: streamed as SSE or answered whole (OpenAI's shapes, through
`server.http.openai`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from server.http.errors import APIError
from server.http.protocol import ChatCompletionRequest, CompletionRequest
from server.http.state import AppState, Ready, require

router = APIRouter(dependencies=[require("inference")])


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


async def _generate(st: AppState, request: Request, endpoint: str, body, stream_fn, full_fn):
    count = st.metrics.requests.labels
    try:
        if body.stream:
            chunks = await stream_fn(body)
            count(endpoint, "200").inc()
            return StreamingResponse(_sse(chunks), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        result = await _unless_disconnected(request, full_fn(body))
    except APIError as e:
        count(endpoint, str(e.status)).inc()
        raise
    count(endpoint, "200").inc()
    return result


@router.post("/v1/completions")
async def completions(body: CompletionRequest, st: Ready, request: Request):
    return await _generate(st, request, "completions", body, st.serving.stream_completion, st.serving.complete)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, st: Ready, request: Request):
    return await _generate(st, request, "chat", body, st.serving.stream_chat, st.serving.chat)
