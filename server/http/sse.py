"""Server-sent events as OpenAI frames them, for every streaming route (completions, a job's events)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from sse_starlette import EventSourceResponse


def event_stream(events: AsyncIterator[dict]) -> EventSourceResponse:
    """An SSE response as OpenAI frames one (LF line ends), with a keep-alive comment every 15 s; `sse-starlette`
    notices a client that goes away and cancels `events`."""
    return EventSourceResponse(events, sep="\n", ping=15, headers={"Cache-Control": "no-cache"})
