"""Tenants (issue #16, finding 6): keys own what they create, see their own and the published, an inference key never
downloads weights; per-key limits answer 429 with Retry-After and x-ratelimit-*; docs, OpenAPI and metrics need a
key; unknown Host headers are refused; the key is checked before the body is read."""

from __future__ import annotations

import io
import json
import re
import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.hostile.support import envelope
from tests.live import start_server, tiny_settings
from tests.tiny import make_peft_adapter

KEYS = """
a-train   train,inference tenant=acme
a-infer   inference       tenant=acme
b-train   train,inference
root      admin
slow      inference rpm=3
thrifty   inference tpm=40
single    inference concurrent=1
"""
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@pytest.fixture(scope="module")
def server(tmp_path_factory, llama_dir):
    root = tmp_path_factory.mktemp("tenants")
    (root / "keys").write_text(KEYS)
    live = start_server(tiny_settings(llama_dir, root / "data", api_keys_file=root / "keys"))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def peft(tmp_path_factory, llama_dir) -> Path:
    return make_peft_adapter(llama_dir, tmp_path_factory.mktemp("tenant-adapter") / "a", "llama", r=4, seed=3)


def as_key(server, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {key}"})


def upload(c: httpx.Client, name: str, peft: Path, overwrite: bool = False) -> httpx.Response:
    files = {CONFIG: (CONFIG, (peft / CONFIG).read_bytes()), WEIGHTS: (WEIGHTS, (peft / WEIGHTS).read_bytes())}
    return c.post("/v1/adapters", data={"name": name}, files=files, params={"overwrite": str(overwrite).lower()})


def generate(c: httpx.Client, model: str) -> httpx.Response:
    return c.post("/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 2})


def test_adapters_belong_to_their_tenant(server, peft):
    a, a_inf, b, root = (as_key(server, k) for k in ("a-train", "a-infer", "b-train", "root"))
    r = upload(a, "acme-private", peft)
    assert r.status_code == 201, r.text
    assert r.json()["owned_by"] == "acme" and r.json()["public"] is False
    # another tenant: not there at all
    assert "acme-private" not in [x["id"] for x in b.get("/v1/adapters").json()["data"]]
    envelope(b.get("/v1/adapters/acme-private"), 404)
    envelope(generate(b, "acme-private"), 404)
    envelope(b.delete("/v1/adapters/acme-private"), 404)
    envelope(upload(b, "acme-private", peft, overwrite=True), 403)
    envelope(b.patch("/v1/adapters/acme-private", json={"public": True}), 404)
    # the same tenant's inference key uses it, but never downloads weights nor deletes
    assert generate(a_inf, "acme-private").status_code == 200
    envelope(a_inf.get("/v1/adapters/acme-private/download"), 403)
    envelope(a_inf.delete("/v1/adapters/acme-private"), 403)
    assert a.get("/v1/adapters/acme-private/download").status_code == 200
    # published by its owner: every tenant uses it; only the owner or an admin changes it
    assert a.patch("/v1/adapters/acme-private", json={"public": True}).json()["public"] is True
    assert generate(b, "acme-private").status_code == 200
    assert "acme-private" in [m["id"] for m in b.get("/v1/models").json()["data"]]
    envelope(b.delete("/v1/adapters/acme-private"), 403)
    envelope(b.get("/v1/adapters/acme-private/download"), 403)
    # an admin sees and manages every tenant's
    assert root.get("/v1/adapters/acme-private").json()["owned_by"] == "acme"
    assert root.delete("/v1/adapters/acme-private").status_code == 204
    envelope(a.get("/v1/adapters/acme-private"), 404)


def test_files_and_jobs_belong_to_their_tenant(server):
    a, b, root = (as_key(server, k) for k in ("a-train", "b-train", "root"))
    jsonl = b'{"prompt": "a", "completion": "b"}\n' * 4
    f = a.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("t.jsonl", io.BytesIO(jsonl))}).json()
    assert f["id"] not in [x["id"] for x in b.get("/v1/files").json()["data"]]
    envelope(b.get(f"/v1/files/{f['id']}"), 404)
    envelope(b.get(f"/v1/files/{f['id']}/content"), 404)
    envelope(b.delete(f"/v1/files/{f['id']}"), 404)
    job = {
        "training_file": f["id"],
        "adapter_name": "stolen",
        "method": {"type": "lora", "hyperparameters": {"max_steps": 1}},
    }
    assert "no file" in envelope(b.post("/v1/fine_tuning/jobs", json=job), 400)["message"]
    j = a.post("/v1/fine_tuning/jobs", json=job | {"adapter_name": "acme-job"})
    assert j.status_code == 201, j.text
    envelope(b.get(f"/v1/fine_tuning/jobs/{j.json()['id']}"), 404)
    envelope(b.post(f"/v1/fine_tuning/jobs/{j.json()['id']}/cancel"), 404)
    assert j.json()["id"] not in [x["id"] for x in b.get("/v1/fine_tuning/jobs").json()["data"]]
    assert j.json()["id"] in [x["id"] for x in root.get("/v1/fine_tuning/jobs").json()["data"]]
    a.post(f"/v1/fine_tuning/jobs/{j.json()['id']}/cancel")


@pytest.mark.parametrize("bad", [{"learning_rate": 1e999}, {"alpha": float("inf")}, {"warmup_ratio": float("nan")},
                                 {"learning_rate": 1e6}])  # fmt: skip
def test_non_finite_or_absurd_hyperparameters_are_refused_at_creation(server, bad):
    a = as_key(server, "a-train")
    jsonl = b'{"prompt": "a", "completion": "b"}\n' * 4
    f = a.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("t.jsonl", io.BytesIO(jsonl))}).json()
    job = {"training_file": f["id"], "adapter_name": "hp", "method": {"type": "lora", "hyperparameters": bad}}
    raw = json.dumps(job)  # Infinity and NaN as Python writes them (JSON has neither)
    r = a.post("/v1/fine_tuning/jobs", content=raw, headers={"content-type": "application/json"})
    envelope(r, 422)


def test_a_deeply_nested_training_file_line_is_a_400(server):
    a = as_key(server, "a-train")
    line = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b', "completion": "b"}\n'
    r = a.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("t.jsonl", io.BytesIO(line))})
    assert "line 1" in envelope(r, 400)["message"]


def test_docs_openapi_and_metrics_need_a_key(server):
    for path in ("/docs", "/openapi.json", "/metrics", "/redoc"):
        envelope(httpx.get(server.url + path), 401)
        assert httpx.get(server.url + path, headers={"Authorization": "Bearer a-infer"}).status_code == 200
    assert httpx.get(server.url + "/health/live").status_code == 200


def test_unknown_host_headers_are_refused(server):
    err = envelope(httpx.get(server.url + "/health/live", headers={"Host": "evil.example"}), 400)
    assert err["code"] == "invalid_host"
    assert httpx.get(server.url + "/health/live", headers={"Host": "localhost:8000"}).status_code == 200


def test_the_key_is_checked_before_the_body_is_read(server):
    """Headers announcing 1.5 MB, no body sent: 401 at once (today's code waits for the body, then parses it)."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1500000\r\n\r\n{")  # fmt: skip
        t = time.perf_counter()
        answer = s.recv(65536)
        assert answer.startswith(b"HTTP/1.1 401") and time.perf_counter() - t < 1.0, answer[:100]


def test_requests_per_minute_are_limited_with_openai_headers(server):
    c = as_key(server, "slow")
    ok = [c.get("/v1/models") for _ in range(3)]
    assert all(r.status_code == 200 for r in ok)
    assert [r.headers["x-ratelimit-remaining-requests"] for r in ok] == ["2", "1", "0"]
    assert ok[0].headers["x-ratelimit-limit-requests"] == "3" and ok[0].headers["x-ratelimit-reset-requests"].endswith(
        "s"
    )
    r = c.get("/v1/models")
    assert envelope(r, 429)["code"] == "rate_limit_exceeded"
    assert 1 <= int(r.headers["retry-after"]) <= 60 and r.headers["x-ratelimit-remaining-requests"] == "0"


def test_tokens_per_minute_are_limited(server):
    c = as_key(server, "thrifty")
    r = c.post("/v1/completions", json={"model": "llama", "prompt": "Hello", "max_tokens": 100})
    assert "Request too large" in envelope(r, 429)["message"]
    assert "retry-after" not in r.headers  # waiting cannot make it fit: a client must not retry it
    ok = c.post("/v1/completions", json={"model": "llama", "prompt": "Hello", "max_tokens": 30})
    assert ok.status_code == 200
    # every answer carries the token headers as OpenAI sends them, next to the request ones
    assert ok.headers["x-ratelimit-limit-tokens"] == "40"
    assert int(ok.headers["x-ratelimit-remaining-tokens"]) == 40 - ok.json()["usage"]["prompt_tokens"] - 30
    assert re.fullmatch(r"\d+(ms|s|m\d+s)", ok.headers["x-ratelimit-reset-tokens"])
    r = c.post("/v1/completions", json={"model": "llama", "prompt": "Hello", "max_tokens": 30})
    envelope(r, 429)
    assert int(r.headers["retry-after"]) >= 1 and r.headers["x-ratelimit-limit-tokens"] == "40"


def test_the_openai_sdk_sees_the_limits(server):
    """The official SDK's RateLimitError, with OpenAI's headers; its own retries honour Retry-After."""
    import openai

    key = next(k for k, v in server.state.api_keys.items() if v.limits.tokens_per_minute == 40)
    with openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0) as sdk:
        with pytest.raises(openai.RateLimitError) as e:
            for _ in range(3):
                sdk.completions.create(model="llama", prompt="Hello", max_tokens=30)
    assert e.value.response.headers["x-ratelimit-remaining-tokens"] == "0" or int(
        e.value.response.headers["x-ratelimit-remaining-tokens"]) < 30
    assert e.value.code == "rate_limit_exceeded" and int(e.value.response.headers["retry-after"]) >= 1


def test_concurrent_requests_are_limited(server):
    c = as_key(server, "single")
    body = {"model": "llama", "prompt": "Hello", "max_tokens": 120, "ignore_eos": True, "stream": True}
    with c.stream("POST", "/v1/completions", json=body) as first:
        assert first.status_code == 200
        r = c.post("/v1/completions", json=body | {"stream": False, "max_tokens": 2})
        envelope(r, 429)
        assert r.headers["retry-after"] == "1"
        first.read()
    assert c.post("/v1/completions", json=body | {"stream": False, "max_tokens": 2}).status_code == 200
