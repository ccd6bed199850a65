"""The HTTP API (API.md) through a real uvicorn server: health, metrics, models, completions, chat,
streaming, adapters and their composition, errors, disconnects, overload and auth.

The tiny random Llama emits junk (control characters, U+FFFD for cut UTF-8), so tests compare
outputs with each other, never with expected words.
"""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from server.settings import Settings
from tests.live import LiveServer, start_server, tiny_settings

BASE = "llama"  # the tiny model directory's name is the base model id
PROMPT = "LoRA adapters are"
CHAT = [{"role": "user", "content": "Hello world! How are you today?"}]


# ---- helpers -------------------------------------------------------------------------------------


def post_ok(http: httpx.Client, path: str, body: dict) -> dict:
    r = http.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def complete(http: httpx.Client, **body) -> dict:
    return post_ok(http, "/v1/completions", {"model": BASE, "prompt": PROMPT, "temperature": 0} | body)


def text_of(http: httpx.Client, **body) -> str:
    return complete(http, **body)["choices"][0]["text"]


def chat(http: httpx.Client, **body) -> dict:
    return post_ok(http, "/v1/chat/completions", {"model": BASE, "messages": CHAT, "temperature": 0} | body)


def sse(http: httpx.Client, path: str, body: dict) -> list[dict]:
    """The JSON events of one SSE answer, checking the framing: `data: ...` + blank line, `[DONE]` last."""
    with http.stream("POST", path, json=body | {"stream": True}) as r:
        assert r.status_code == 200, r.read().decode()
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    blocks = raw.split("\n\n")
    assert blocks[-1] == "", "the stream must end with a blank line"
    events = blocks[:-1]
    assert events and all(e.startswith("data: ") and "\n" not in e for e in events), raw
    assert events[-1] == "data: [DONE]"
    assert events.count("data: [DONE]") == 1
    return [json.loads(e[len("data: ") :]) for e in events[:-1]]


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    """The OpenAI error envelope, with a human message free of tracebacks, paths and addresses."""
    assert r.status_code == status, r.text
    body = r.json()
    assert list(body) == ["error"], body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    assert err["param"] is None or isinstance(err["param"], str)
    assert err["code"] is None or isinstance(err["code"], str)
    msg = err["message"]
    assert "Traceback" not in msg and 'File "' not in msg and not re.search(r"0x[0-9a-fA-F]{6,}", msg), msg
    assert not re.search(r"/(work|tmp|home|usr)/", msg), msg
    if code is not None:
        assert err["code"] == code, err
    return err


def stop_string_from(text: str) -> tuple[str, int]:
    """A 3-character stop string from `text` (index >= 2, first occurrence, no U+FFFD near it)."""
    for i in range(2, len(text) - 3):
        s = text[i : i + 3]
        if "\ufffd" not in text[i - 1 : i + 4] and text.find(s) == i:
            return s, i
    raise AssertionError(f"no usable stop string in {text!r}")


def n_tokens(live_server: LiveServer, text: str) -> int:
    return len(live_server.state.base.tokenizer(text)["input_ids"])


def small_settings(tmp_path, **overrides) -> Settings:
    """The live_server fixture's settings, for servers of their own."""
    model = overrides.pop("model")
    return tiny_settings(model, tmp_path / "data", **({"max_waiting": 64} | overrides))


def stop_now(live: LiveServer) -> None:
    """Stop a server without waiting out uvicorn's graceful timeout for requests a bug left hanging."""
    live.server.force_exit = True
    live.stop()


# ---- health, metrics, models ---------------------------------------------------------------------


def test_health(http):
    assert http.get("/health/live").status_code == 200
    r = http.get("/health/ready")
    assert r.status_code == 200
    assert r.json()["status"] == "ready"


def test_metrics_is_prometheus_text(http):
    complete(http, max_tokens=2)
    r = http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in (
        "loraplex_requests",
        "loraplex_time_to_first_token_seconds",
        "loraplex_queue_depth",
        "loraplex_adapters_loaded",
    ):
        assert f"# TYPE {name}" in text, name
    assert re.search(r'^loraplex_requests_total\{endpoint="completions",status="200"\} [1-9]', text, re.M)
    assert re.search(r"^loraplex_time_to_first_token_seconds_count [1-9]", text, re.M)
    # the engine's sizes, and the prefix cache's use (the same prompt twice: the second finds its blocks)
    assert re.search(r"^loraplex_kv_cache_rows 8", text, re.M) and re.search(r"^loraplex_lora_pool_pages 16", text, re.M)
    prompt = " ".join(["The capital of France is Paris."] * 6)
    complete(http, prompt=prompt, max_tokens=2)
    complete(http, prompt=prompt, max_tokens=2)
    hits = re.search(r"^loraplex_prefix_cache_hit_tokens_total (\S+)", http.get("/metrics").text, re.M)
    assert hits and float(hits.group(1)) >= 16


def test_models_lists_base_and_adapters(http):
    body = http.get("/v1/models").json()
    assert body["object"] == "list"
    models = {m["id"]: m for m in body["data"]}
    assert set(models) == {BASE, "alpha", "beta"}
    assert models[BASE]["parent"] is None
    assert models["alpha"]["parent"] == BASE and models["beta"]["parent"] == BASE
    assert all(m["object"] == "model" for m in models.values())
    assert http.get("/v1/models/alpha").json()["id"] == "alpha"
    assert_error(http.get("/v1/models/nope"), 404, "model_not_found")


# ---- completions -----------------------------------------------------------------------------------


def test_completion_shape_and_usage(http, live_server):
    body = complete(http, max_tokens=5, ignore_eos=True)
    assert body["id"].startswith("cmpl-")
    assert body["object"] == "text_completion"
    assert isinstance(body["created"], int) and abs(body["created"] - time.time()) < 600
    assert body["model"] == BASE
    [choice] = body["choices"]
    assert set(choice) >= {"index", "text", "logprobs", "finish_reason"}
    assert choice["index"] == 0 and isinstance(choice["text"], str) and choice["logprobs"] is None
    assert choice["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["prompt_tokens"] == n_tokens(live_server, PROMPT)
    assert usage["completion_tokens"] == 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_completion_max_tokens_default_is_16(http):
    body = complete(http, ignore_eos=True)
    assert body["usage"]["completion_tokens"] == 16
    assert body["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("max_tokens", [1, 7])
def test_max_tokens_respected(http, max_tokens):
    body = complete(http, model="alpha", max_tokens=max_tokens, ignore_eos=True)
    assert body["usage"]["completion_tokens"] == max_tokens
    assert body["choices"][0]["finish_reason"] == "length"


def test_greedy_is_deterministic(http):
    a = complete(http, model="alpha", max_tokens=16)
    b = complete(http, model="alpha", max_tokens=16)
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    assert a["usage"] == b["usage"]


def test_tiny_top_p_is_greedy(http):
    greedy = text_of(http, model="alpha", max_tokens=12, ignore_eos=True)
    assert text_of(http, model="alpha", max_tokens=12, ignore_eos=True, temperature=1.0, top_p=1e-6) == greedy


def test_n_choices(http):
    body = complete(http, model="alpha", max_tokens=6, n=2, ignore_eos=True)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["choices"][0]["text"] == body["choices"][1]["text"]  # greedy
    assert body["usage"]["completion_tokens"] == 12


def test_prompt_list_times_n(http):
    prompts = ["Hello world", "The capital of France is", "0 1 2 3"]
    solo = [text_of(http, model="alpha", prompt=p, max_tokens=6, ignore_eos=True) for p in prompts]
    body = complete(http, model="alpha", prompt=prompts, n=2, max_tokens=6, ignore_eos=True)
    assert [c["index"] for c in body["choices"]] == list(range(len(prompts) * 2))
    for c in body["choices"]:
        assert c["text"] == solo[c["index"] // 2]
    assert body["usage"]["completion_tokens"] == len(prompts) * 2 * 6


def test_token_id_prompts(http, live_server):
    ids = live_server.state.base.tokenizer(PROMPT)["input_ids"]
    expected = text_of(http, model="alpha", max_tokens=8, ignore_eos=True)
    body = complete(http, model="alpha", prompt=ids, max_tokens=8, ignore_eos=True)
    assert body["choices"][0]["text"] == expected
    assert body["usage"]["prompt_tokens"] == len(ids)
    body = complete(http, model="alpha", prompt=[ids, ids[:2]], max_tokens=8, ignore_eos=True)
    assert body["choices"][0]["text"] == expected
    assert body["usage"]["prompt_tokens"] == len(ids) + 2


def test_out_of_vocab_token_ids_are_400_and_harm_no_one(tmp_path, llama_dir):
    live = start_server(small_settings(tmp_path, model=str(llama_dir)))
    try:
        with ThreadPoolExecutor(2) as pool:
            bystander = pool.submit(
                httpx.post,
                f"{live.url}/v1/completions",
                json={"model": BASE, "prompt": PROMPT, "max_tokens": 120, "ignore_eos": True},
                timeout=10,
            )
            deadline = time.monotonic() + 5
            while live.state.engine.num_running == 0 and time.monotonic() < deadline:
                time.sleep(0.002)
            try:
                r = httpx.post(
                    f"{live.url}/v1/completions", json={"model": BASE, "prompt": [5, 10**6], "max_tokens": 4}, timeout=5
                )
            except httpx.ReadTimeout:
                raise AssertionError("no answer for a prompt with a token id outside the vocabulary") from None
            assert_error(r, 400)
            assert bystander.result().status_code == 200
    finally:
        stop_now(live)


def test_logprobs(http, live_server):
    body = complete(http, model="alpha", max_tokens=8, ignore_eos=True, logprobs=2)
    lp = body["choices"][0]["logprobs"]
    n = body["usage"]["completion_tokens"]
    assert n == 8
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    for tok, chosen, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert isinstance(tok, str)
        assert chosen <= 0
        assert 1 <= len(top) <= 2  # two token ids may decode to the same text
        assert all(v <= 0 for v in top.values())
        assert chosen == pytest.approx(max(top.values()), abs=1e-4)  # greedy picks the top token
    offsets = lp["text_offset"]
    assert offsets[0] == 0
    assert all(offsets[i + 1] == offsets[i] + len(lp["tokens"][i]) for i in range(n - 1))


def test_echo(http):
    plain = text_of(http, model="alpha", max_tokens=6)
    assert text_of(http, model="alpha", max_tokens=6, echo=True) == PROMPT + plain


def test_seeded_sampling(http):
    def sample(seed: int, **extra) -> dict:
        return complete(http, model="alpha", temperature=1.0, seed=seed, max_tokens=16, ignore_eos=True, **extra)

    first = sample(7)["choices"][0]["text"]
    assert sample(7)["choices"][0]["text"] == first
    assert sample(8)["choices"][0]["text"] != first
    assert sample(7)["choices"][0]["text"] != text_of(http, model="alpha", max_tokens=16, ignore_eos=True)
    pair = [c["text"] for c in sample(7, n=2)["choices"]]
    assert pair[0] != pair[1]  # each choice samples on its own
    assert [c["text"] for c in sample(7, n=2)["choices"]] == pair


# ---- adapters ---------------------------------------------------------------------------------------


def test_adapter_changes_output(http):
    base = text_of(http, max_tokens=16, ignore_eos=True)
    alpha = text_of(http, model="alpha", max_tokens=16, ignore_eos=True)
    beta = text_of(http, model="beta", max_tokens=16, ignore_eos=True)
    assert len({base, alpha, beta}) == 3


def test_batching_invariance(live_server, http):
    """Each request gets what it gets alone, whatever shares its batch (API.md)."""
    requests = [
        {"model": "alpha", "prompt": PROMPT, "max_tokens": 40},
        {"model": BASE, "prompt": "Hello world", "max_tokens": 30},
        {"model": "beta", "prompt": "The capital of France is Paris.", "max_tokens": 36},
        {"model": "alpha", "prompt": "0 1", "max_tokens": 24},
        {
            "model": BASE,
            "prompt": PROMPT,
            "adapters": [{"name": "alpha", "weight": 0.5}, {"name": "beta", "weight": 0.5}],
        },
        {"model": "beta", "prompt": "How are you today? I am fine, thank you.", "max_tokens": 40},
    ]
    requests = [{"temperature": 0, "ignore_eos": True, "max_tokens": 32} | r for r in requests]
    solo = [post_ok(http, "/v1/completions", r)["choices"][0]["text"] for r in requests]

    engine = live_server.state.engine
    most_running = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal most_running
        while not done.is_set():
            most_running = max(most_running, engine.num_running)
            time.sleep(0.0005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    barrier = threading.Barrier(len(requests))

    def fire(body: dict) -> str:
        barrier.wait()
        r = httpx.post(f"{live_server.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    try:
        with ThreadPoolExecutor(len(requests)) as pool:
            together = list(pool.map(fire, requests))
    finally:
        done.set()
        watcher.join()
    assert most_running >= 2, "the requests never shared a batch"
    for body, alone, batched in zip(requests, solo, together, strict=True):
        assert batched == alone, body


def test_composition_of_one_adapter_equals_the_adapter(http):
    alpha = text_of(http, model="alpha", max_tokens=16, ignore_eos=True)
    composed = text_of(http, adapters=[{"name": "alpha", "weight": 1.0}], max_tokens=16, ignore_eos=True)
    assert composed == alpha


def test_weighted_composition(http):
    alpha = text_of(http, model="alpha", max_tokens=16, ignore_eos=True)
    beta = text_of(http, model="beta", max_tokens=16, ignore_eos=True)
    mix = [{"name": "alpha", "weight": 0.5}, {"name": "beta", "weight": 0.5}]
    mixed = text_of(http, adapters=mix, max_tokens=16, ignore_eos=True)
    assert mixed not in (alpha, beta)
    assert text_of(http, adapters=mix, max_tokens=16, ignore_eos=True) == mixed


def test_unknown_adapter_in_composition_is_404(http):
    r = http.post(
        "/v1/completions", json={"model": BASE, "prompt": PROMPT, "adapters": [{"name": "alpha"}, {"name": "nope"}]}
    )
    assert_error(r, 404)
    r = http.post("/v1/completions", json={"model": BASE, "prompt": PROMPT, "adapters": [{"name": "../etc"}]})
    assert_error(r, 422)


# ---- chat -------------------------------------------------------------------------------------------


def test_chat_shape(http, live_server):
    body = chat(http, max_tokens=6, ignore_eos=True)
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert body["model"] == BASE and isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    tok = live_server.state.base.tokenizer
    prompt = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert usage["completion_tokens"] == 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + 6


def test_chat_max_completion_tokens(http):
    body = chat(http, max_completion_tokens=3, ignore_eos=True)
    assert body["usage"]["completion_tokens"] == 3
    body = chat(http, max_tokens=9, max_completion_tokens=4, ignore_eos=True)
    assert body["usage"]["completion_tokens"] == 4
    assert body["choices"][0]["finish_reason"] == "length"


def test_chat_adapter_changes_output(http):
    base = chat(http, max_tokens=12, ignore_eos=True)["choices"][0]["message"]["content"]
    alpha = chat(http, model="alpha", max_tokens=12, ignore_eos=True)["choices"][0]["message"]["content"]
    assert base != alpha


def test_chat_logprobs(http):
    body = chat(http, model="alpha", max_tokens=5, ignore_eos=True, logprobs=True, top_logprobs=2)
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 5
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert isinstance(entry["token"], str) and entry["logprob"] <= 0
        assert all(isinstance(b, int) and 0 <= b < 256 for b in entry["bytes"])
        assert len(entry["top_logprobs"]) == 2
        for alt in entry["top_logprobs"]:
            assert set(alt) == {"token", "logprob", "bytes"} and alt["logprob"] <= 0
        assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"], abs=1e-4)  # greedy


def test_chat_stream(http):
    body = {"model": "alpha", "messages": CHAT, "temperature": 0, "max_tokens": 10, "ignore_eos": True}
    full = post_ok(http, "/v1/chat/completions", body)
    events = sse(http, "/v1/chat/completions", body | {"stream_options": {"include_usage": True}})
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert len({e["id"] for e in events}) == 1 and events[0]["id"].startswith("chatcmpl-")
    first, *middle, finish, usage = events
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert first["choices"][0]["finish_reason"] is None
    assert all(c["choices"][0]["finish_reason"] is None for c in middle)
    assert finish["choices"][0]["finish_reason"] == "length"
    assert all(e["usage"] is None for e in events[:-1])
    assert usage["choices"] == [] and usage["usage"] == full["usage"]
    content = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert content == full["choices"][0]["message"]["content"]
    assert any(c["choices"][0]["delta"].get("content") for c in middle + [finish])


def test_chat_stream_without_usage(http):
    events = sse(http, "/v1/chat/completions", {"model": BASE, "messages": CHAT, "max_tokens": 3})
    assert events[-1]["choices"][0]["finish_reason"] is not None
    assert all("usage" not in e or e["usage"] is None for e in events)


# ---- completions stream ---------------------------------------------------------------------------


def test_completion_stream_equals_non_stream(http):
    body = {"model": "alpha", "prompt": PROMPT, "temperature": 0, "max_tokens": 16}
    full = post_ok(http, "/v1/completions", body)
    events = sse(http, "/v1/completions", body | {"stream_options": {"include_usage": True}})
    *chunks, usage = events
    assert all(e["object"] == "text_completion" for e in events)
    assert all(len(c["choices"]) == 1 and c["choices"][0]["index"] == 0 for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == full["choices"][0]["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]
    assert usage["choices"] == [] and usage["usage"] == full["usage"]


def test_completion_stream_many_choices(http):
    prompts = ["Hello world", PROMPT]
    body = {"model": "beta", "prompt": prompts, "n": 2, "temperature": 0, "max_tokens": 8, "ignore_eos": True}
    full = post_ok(http, "/v1/completions", body)
    texts = ["", "", "", ""]
    finishes = [None] * 4
    for c in sse(http, "/v1/completions", body):
        [choice] = c["choices"]
        assert finishes[choice["index"]] is None, "text after the finish chunk"
        texts[choice["index"]] += choice["text"]
        finishes[choice["index"]] = choice["finish_reason"]
    assert texts == [c["text"] for c in full["choices"]]
    assert finishes == ["length"] * 4


def test_stream_error_before_start_is_an_http_error(http):
    r = http.post("/v1/completions", json={"model": "nope", "prompt": PROMPT, "stream": True})
    assert_error(r, 404, "model_not_found")
    r = http.post("/v1/chat/completions", json={"model": BASE, "messages": CHAT, "stream": True, "max_tokens": 500})
    assert_error(r, 400)


# ---- stop, min_tokens, ignore_eos -------------------------------------------------------------------


def test_stop_string(http):
    full = text_of(http, model="alpha", max_tokens=24, ignore_eos=True)
    stop, at = stop_string_from(full)
    body = {"model": "alpha", "prompt": PROMPT, "temperature": 0, "max_tokens": 24, "ignore_eos": True}
    for stops in (stop, [stop], ["\x00never\x00", stop]):
        out = post_ok(http, "/v1/completions", body | {"stop": stops})["choices"][0]
        assert out["text"] == full[:at], stops
        assert out["finish_reason"] == "stop"
    chunks = sse(http, "/v1/completions", body | {"stop": [stop]})
    assert "".join(c["choices"][0]["text"] for c in chunks) == full[:at]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_chat_stop_string(http):
    body = {"model": "alpha", "messages": CHAT, "temperature": 0, "max_tokens": 24, "ignore_eos": True}
    full = post_ok(http, "/v1/chat/completions", body)["choices"][0]["message"]["content"]
    stop, at = stop_string_from(full)
    out = post_ok(http, "/v1/chat/completions", body | {"stop": stop})["choices"][0]
    assert out["message"]["content"] == full[:at] and out["finish_reason"] == "stop"
    events = sse(http, "/v1/chat/completions", body | {"stop": stop})
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == full[:at]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_ignore_eos(http):
    body = complete(http, ignore_eos=True, max_tokens=20)
    assert body["usage"]["completion_tokens"] == 20
    assert body["choices"][0]["finish_reason"] == "length"


def test_min_tokens(http, live_server):
    """A stop token id that ends the output at once is held back until min_tokens."""
    first = complete(http, max_tokens=1, logprobs=0)["choices"][0]["logprobs"]["tokens"][0]
    [stop_id] = live_server.state.base.tokenizer(first, add_special_tokens=False)["input_ids"]
    body = complete(http, max_tokens=20, stop_token_ids=[stop_id])
    assert body["usage"]["completion_tokens"] == 1 and body["choices"][0]["finish_reason"] == "stop"
    body = complete(http, max_tokens=20, stop_token_ids=[stop_id], min_tokens=5)
    assert body["usage"]["completion_tokens"] >= 5


# ---- errors -----------------------------------------------------------------------------------------


def test_unknown_model_is_404(http):
    for path, body in (("/v1/completions", {"prompt": PROMPT}), ("/v1/chat/completions", {"messages": CHAT})):
        err = assert_error(http.post(path, json={"model": "nope"} | body), 404, "model_not_found")
        assert err["param"] == "model"


def test_over_the_context_is_400(http):
    assert_error(http.post("/v1/completions", json={"model": BASE, "prompt": PROMPT, "max_tokens": 200}), 400)
    long_prompt = "Hello world! " * 100
    assert_error(http.post("/v1/completions", json={"model": BASE, "prompt": long_prompt}), 400)
    assert_error(http.post("/v1/chat/completions", json={"model": BASE, "messages": CHAT, "max_tokens": 200}), 400)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": BASE}, "prompt"),
        ({"prompt": PROMPT}, "model"),
        ({"model": BASE, "prompt": PROMPT, "max_tokens": "many"}, "max_tokens"),
        ({"model": BASE, "prompt": {"text": PROMPT}}, None),
        ({"model": BASE, "prompt": PROMPT, "temperature": 5}, "temperature"),
        ({"model": BASE, "prompt": PROMPT, "n": 0}, "n"),
        ({"model": BASE, "prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
    ],
)
def test_schema_violation_is_422(http, body, param):
    err = assert_error(http.post("/v1/completions", json=body), 422)
    if param is not None:
        assert err["param"] == param


def test_chat_schema_violation_is_422(http):
    assert_error(http.post("/v1/chat/completions", json={"model": BASE, "messages": []}), 422)
    assert_error(http.post("/v1/chat/completions", json={"model": BASE, "messages": [{"role": "wizard"}]}), 422)


def test_unsupported_features_are_400(http):
    r = http.post("/v1/completions", json={"model": BASE, "prompt": PROMPT, "presence_penalty": 1.0})
    assert_error(r, 400)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert_error(http.post("/v1/chat/completions", json={"model": BASE, "messages": CHAT, "tools": tools}), 400)


def test_unknown_route_is_404_envelope(http):
    assert_error(http.get("/v1/nope"), 404)
    assert_error(http.post("/v1/engines/llama/completions", json={}), 404)


def test_wrong_method_is_405_envelope(http):
    assert_error(http.post("/v1/models", json={}), 405)


def test_invalid_json_is_422(http):
    r = http.post(
        "/v1/completions", content=b'{"model": "llama", "prompt": ', headers={"content-type": "application/json"}
    )
    assert_error(r, 422)
    assert_error(http.post("/v1/completions", json=[1, 2]), 422)


# ---- disconnect ---------------------------------------------------------------------------------------


def test_disconnect_frees_the_slot(http, live_server):
    engine = live_server.state.engine
    assert engine.num_running == 0
    before = engine.tokens_generated
    body = {"model": "alpha", "prompt": PROMPT, "max_tokens": 100, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        events = 0
        while events < 2:
            events += next(lines).startswith("data: ")
    deadline = time.monotonic() + 5
    while engine.num_running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.num_running == 0
    assert engine.tokens_generated - before < 100, "the request ran to its end instead of being aborted"
    assert complete(http, max_tokens=2)["usage"]["completion_tokens"] == 2


# ---- overload -------------------------------------------------------------------------------------------


def test_one_sequence_slot(tmp_path, llama_dir):
    live = start_server(small_settings(tmp_path, model=str(llama_dir), max_num_seqs=1))
    try:
        body = {"model": BASE, "prompt": PROMPT, "max_tokens": 4, "ignore_eos": True}
        r = httpx.post(f"{live.url}/v1/completions", json=body, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    finally:
        live.stop()


def test_overload_is_503_with_retry_after(tmp_path, llama_dir):
    # two rows and one queue place: of sixteen long requests at once, some must be refused (eight were too few once
    # the tiny model's 100 tokens took only tens of ms: arrivals spread that thin could all find a row)
    live = start_server(small_settings(tmp_path, model=str(llama_dir), max_num_seqs=2, max_waiting=1))
    barrier = threading.Barrier(16)

    def fire(_: int) -> httpx.Response | str:
        barrier.wait()
        body = {"model": BASE, "prompt": PROMPT, "max_tokens": 120, "ignore_eos": True}
        try:
            return httpx.post(f"{live.url}/v1/completions", json=body, timeout=8)
        except httpx.TimeoutException:
            return "timeout"

    try:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(fire, range(16)))
        statuses = [a if isinstance(a, str) else a.status_code for a in answers]
        assert set(statuses) <= {200, 503}, statuses
        assert 200 in statuses and 503 in statuses, statuses
        for a in answers:
            if a.status_code == 503:
                assert_error(a, 503)
                assert int(a.headers["retry-after"]) >= 1
    finally:
        stop_now(live)


# ---- auth -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory, llama_dir):
    root = tmp_path_factory.mktemp("auth")
    keys = root / "keys"
    keys.write_text("# key scopes\nk-inf inference\nk-admin admin,inference\nk-train-only train\n")
    live = start_server(small_settings(root, model=str(llama_dir), api_keys_file=keys))
    yield live
    live.stop()


def test_auth_required_on_v1(auth_server):
    url = auth_server.url
    r = httpx.get(f"{url}/v1/models")
    assert_error(r, 401)
    assert r.headers.get("www-authenticate", "").lower().startswith("bearer")
    assert_error(httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(httpx.get(f"{url}/v1/models", headers={"Authorization": "k-inf"}), 401)
    body = {"model": BASE, "prompt": PROMPT, "max_tokens": 2}
    assert_error(httpx.post(f"{url}/v1/completions", json=body), 401)


def test_auth_accepts_keys_with_inference_scope(auth_server):
    url = auth_server.url
    for key in ("k-inf", "k-admin"):
        headers = {"Authorization": f"Bearer {key}"}
        assert httpx.get(f"{url}/v1/models", headers=headers).status_code == 200
        body = {"model": BASE, "prompt": PROMPT, "max_tokens": 2}
        assert httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=30).status_code == 200


def test_auth_key_without_the_scope_is_403(auth_server):
    r = httpx.get(f"{auth_server.url}/v1/models", headers={"Authorization": "Bearer k-train-only"})
    assert_error(r, 403)


def test_health_needs_no_key(auth_server):
    assert httpx.get(f"{auth_server.url}/health/live").status_code == 200
    assert httpx.get(f"{auth_server.url}/health/ready").status_code == 200
    assert httpx.get(f"{auth_server.url}/metrics").status_code == 401  # metrics_access is "key" by default
    assert httpx.get(f"{auth_server.url}/metrics", headers={"Authorization": "Bearer k-inf"}).status_code == 200
