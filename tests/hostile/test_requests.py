"""Hostile generation requests (issue #16, findings 3, 5 and 9): bounded before tokenization, tokenized off the event
loop, every bad input a 4xx that keeps the connection, the queue's cap held, and a client that leaves while queued
removed before admission."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.hostile.support import body, envelope, live_latency, same_connection

# two rows, a queue of four: overload is easy to reach; long sequences keep rows busy; the JSON body cap as in the
# issue (16 MiB)
SERVER_SETTINGS = dict(max_num_seqs=2, max_waiting=4, max_request_bytes=16 * 2**20, max_model_len=2048)
BASE = "llama"


@pytest.fixture(scope="module")
def llama_dir(tiny_models, tmp_path_factory) -> Path:
    """The tiny Llama with a 4096-position context (RoPE: the weights do not change), so a request can run long."""
    d = tmp_path_factory.mktemp("long") / "llama"
    shutil.copytree(tiny_models["llama"], d)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 4096}))
    return d


def timed(client: httpx.Client, server, path: str, payload: dict) -> tuple[httpx.Response, float, float]:
    """(response, seconds it took, slowest /health/live answer meanwhile)."""
    with live_latency(server.url) as worst:
        t = time.perf_counter()
        r = client.post(path, json=payload, timeout=120)
        took = time.perf_counter() - t
    return r, took, worst[0]


# ---- 3. size and count checks before tokenization; tokenization off the loop -----------------------------------


@pytest.mark.parametrize(
    ("path", "payload", "param"),
    [
        ("/v1/completions", {"model": BASE, "prompt": "Hello world " * 700_000}, "prompt"),  # 8.4 MB of text
        ("/v1/completions", {"model": BASE, "prompt": ["Hello world"] * 20_000}, "prompt"),
        ("/v1/chat/completions", {"model": BASE, "messages": [{"role": "user", "content": "hi"}] * 4000}, "messages"),
        (
            "/v1/chat/completions",
            {"model": BASE, "messages": [{"role": "user", "content": "Hello " * 1_000_000}]},
            "messages",
        ),  # fmt: skip
    ],
    ids=["8MB-prompt", "20000-prompts", "4000-messages", "6MB-message"],
)
def test_oversized_prompts_are_refused_before_tokenization_and_the_server_stays_live(client, server, path, payload,
                                                                                       param):  # fmt: skip
    r, took, worst = timed(client, server, path, payload)
    err = envelope(r, 400)
    assert err["param"] == param
    assert took < 1.0 and worst < 0.1, (took, worst)


def test_health_live_answers_within_100ms_while_a_large_valid_request_is_processed(client, server):
    """A prompt near the context's limit, n=4, top-20 logprobs: tokenizing, rendering and decoding its answer all
    run off the event loop."""
    payload = {"model": BASE, "prompt": "Hello world " * 10, "max_tokens": 40, "n": 2, "logprobs": 20,
               "ignore_eos": True, "echo": True}  # fmt: skip
    r, _, worst = timed(client, server, "/v1/completions", payload)
    assert r.status_code == 200, r.text
    assert worst < 0.1, worst


# ---- 9. every bad input a 4xx, and the connection stays usable ---------------------------------------------------

GOOD = ("POST", "/v1/completions", body(model=BASE, prompt="Hello", max_tokens=2))


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b'{"model": "llama", "prompt": "caf\\ud800", "max_tokens": 2}', 422),  # a lone UTF-16 surrogate
        (b'{"model": "\\udc00", "prompt": "x", "max_tokens": 2}', 422),
        (b'{"model": "llama", "messages": [{"role": "user", "content": "\\ud83d"}]}', 422),
        (body(model=BASE, prompt="x", max_tokens=2, seed=2**64), 422),
        (body(model=BASE, prompt="x", max_tokens=2, seed=-(2**70)), 422),
        (b'{"model": "llama", "prompt": "x", "temperature": NaN}', 422),
        (b'{"model": "llama", "prompt": "x", "adapters": [{"name": "a", "weight": Infinity}]}', 422),
        (b'{"model": "llama", "prompt": "x", "tools": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400),
        (body(model=BASE, prompt="x", stop_token_ids=list(range(1_000_000))), 422),
        (body(model=BASE, prompt="x", stop_token_ids=[2**40]), 422),
        (body(model=BASE, prompt="x", stop_token_ids=[100_000]), 400),  # outside the vocabulary
        (body(model=BASE, prompt="x", stop=["y" * 5000]), 422),
        (body(model=BASE, prompt=[[1, 2], [3, 10**6]]), 400),
    ],
    ids=["surrogate-prompt", "surrogate-model", "surrogate-chat", "seed-2^64", "seed-minus", "nan", "inf-weight",
         "deep-json", "stop-ids-1M", "stop-id-huge", "stop-id-vocab", "stop-5000-chars", "prompt-id-vocab"],
)  # fmt: skip
def test_bad_inputs_are_4xx_and_keep_the_connection(server, raw, status):
    path = "/v1/chat/completions" if b'"messages"' in raw else "/v1/completions"
    first, then = same_connection(server.url, ("POST", path, raw), GOOD)
    assert (first, then) == (status, 200)


def test_seed_at_the_top_of_its_range_works_for_every_choice(client):
    r = client.post("/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 2, "n": 2, "seed": 2**63 - 1})
    assert r.status_code == 200, r.text


def test_a_chunked_body_over_the_cap_is_413(server):
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
        chunk = b"x" * (1 << 20)
        try:
            for _ in range(20):
                s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        except OSError:
            pass  # the server answered and closed before the whole body was sent
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_an_unexpected_500_keeps_the_connection(server, monkeypatch):
    async def boom(req):
        raise RuntimeError("a bug")

    monkeypatch.setattr(server.state.serving.prompts, "completion_prompts", boom)
    first, then = same_connection(server.url, GOOD, ("GET", "/v1/models", b""))
    assert (first, then) == (500, 200)


# ---- 9. the waiting queue's cap is never overshot; 5. a queued client that leaves is removed ----------------------


def _long(stream: bool = True, max_tokens: int = 100) -> dict:
    return {"model": BASE, "prompt": "Hello", "max_tokens": max_tokens, "ignore_eos": True, "stream": stream}


def test_the_waiting_queue_cap_holds_under_a_burst(server):
    engine = server.state.engine
    most = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            most[0] = max(most[0], engine.num_waiting)

    statuses: list[int] = []

    def fire() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            statuses.append(c.post("/v1/completions", json=_long(stream=False, max_tokens=30)).status_code)

    w = threading.Thread(target=watch)
    w.start()
    threads = [threading.Thread(target=fire) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    stop.set()
    w.join()
    assert set(statuses) <= {200, 503} and 503 in statuses, statuses
    assert most[0] <= 4, most[0]


def test_a_streaming_client_that_leaves_while_queued_is_never_admitted(server):
    engine = server.state.engine
    with httpx.Client(base_url=server.url, timeout=120) as c:
        running = [threading.Thread(target=c.post, args=("/v1/completions",), kwargs={"json": _long(False, 2000)})
                   for _ in range(2)]  # fmt: skip
        for t in running:
            t.start()
        deadline = time.monotonic() + 30
        while engine.num_running < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.5)  # both prefilled (their prompt tokens counted)
        before = engine.prompt_tokens
        payload = json.dumps(_long() | {"prompt": "The capital of France is Paris. " * 3}).encode()
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as s:  # a streaming client...
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(payload) + payload)  # fmt: skip
            deadline = time.monotonic() + 5
            while engine.num_waiting < 1:  # ...whose request waits for a row
                assert time.monotonic() < deadline
                time.sleep(0.01)
        # ...leaves: its request leaves the queue before a row frees
        deadline = time.monotonic() + 2
        while engine.num_waiting:
            assert time.monotonic() < deadline, "the abandoned request is still queued"
            time.sleep(0.02)
        assert engine.num_running == 2
        for t in running:
            t.join(120)
        assert engine.prompt_tokens == before  # it was never prefilled
