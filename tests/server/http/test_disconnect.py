"""A client that goes away frees its batch row, streaming or not."""

from __future__ import annotations

import time

import httpx
import pytest


def wait_idle(live_server, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while live_server.state.engine.num_running or live_server.state.engine.num_waiting:
        assert time.monotonic() < deadline, "the engine kept generating for a client that left"
        time.sleep(0.05)


def test_non_streaming_client_that_times_out_frees_its_row(live_server):
    body = {"model": "alpha", "prompt": "Hello world", "max_tokens": 100, "ignore_eos": True, "n": 2}
    slow = live_server.state.engine._step

    def slowed():  # 50 ms a step: 100 tokens take 5 s, far beyond the client's patience
        time.sleep(0.05)
        slow()

    engine = live_server.state.engine
    before = engine.tokens_generated
    engine._step = slowed
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{live_server.url}/v1/completions", json=body, timeout=0.5)
        wait_idle(live_server, seconds=2)  # long before 100 tokens × 50 ms
        assert 0 < engine.tokens_generated - before < 100  # both choices were cut short
    finally:
        live_server.state.engine._step = slow
    r = httpx.post(f"{live_server.url}/v1/completions", json=dict(body, max_tokens=3), timeout=30)
    assert r.status_code == 200
