"""The Python client against a real server on 127.0.0.1."""

from __future__ import annotations

import pytest

from client import AsyncLoraplexClient, LoraplexClient, NotFoundError, UnprocessableEntityError


def test_sync_client_round_trip(live_server):
    with LoraplexClient(live_server.url) as c:
        assert c.health()
        ids = [m.id for m in c.models().data]
        assert ids[0] == "llama" and {"alpha", "beta"} <= set(ids)
        full = c.completions("alpha", "Hello world", max_tokens=6, temperature=0)
        assert full.usage.completion_tokens == 6
        streamed = "".join(ch.choices[0].text for ch in c.stream_completions("alpha", "Hello world", max_tokens=6, temperature=0) if ch.choices)
        assert streamed == full.choices[0].text
        chat = c.chat("beta", [{"role": "user", "content": "hi"}], max_tokens=5, temperature=0)
        assert chat.choices[0].message.role == "assistant"
        with pytest.raises(NotFoundError) as e:
            c.completions("no-such-adapter", "x")
        assert e.value.code == "model_not_found"
        with pytest.raises(UnprocessableEntityError):
            c.completions("alpha", "x", temperature=9)


@pytest.mark.asyncio
async def test_async_client_streams_chat(live_server):
    async with AsyncLoraplexClient(live_server.url) as c:
        chunks = [ch async for ch in c.stream_chat("alpha", [{"role": "user", "content": "hi"}], max_tokens=5, temperature=0)]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].choices[0].finish_reason in ("length", "stop")
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        full = await c.chat("alpha", [{"role": "user", "content": "hi"}], max_tokens=5, temperature=0)
        assert text == full.choices[0].message.content
