"""SIGTERM ends every stream cleanly (issue #16, finding 4): `/health/ready` turns 503 "draining" at once, new
requests (new connections too) get 503 with Retry-After, a stream still running at the drain deadline ends with an
error event and `[DONE]`, and the process exits within the drain timeout plus a few seconds."""

from __future__ import annotations

import json
import shutil
import signal
import time

import httpx

from tests.live import spawn_server, stream_in_thread

DRAIN = 2.0


def test_sigterm_drains_then_ends_running_streams_with_an_error_event(tiny_models, tmp_path):
    model = tmp_path / "llama"
    shutil.copytree(tiny_models["llama"], model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 8192}))  # RoPE: a long stream
    proc, url = spawn_server({
        "LORAPLEX_MODEL": str(model), "LORAPLEX_DATA_DIR": str(tmp_path / "data"), "LORAPLEX_LORA_BACKEND": "eager",
        "LORAPLEX_MAX_MODEL_LEN": "8192", "LORAPLEX_MAX_NUM_SEQS": "2", "LORAPLEX_LORA_PAGES": "4",
        "LORAPLEX_MAX_LORA_RANK": "16", "LORAPLEX_DRAIN_TIMEOUT": str(DRAIN),
    })  # fmt: skip
    try:
        body = {"model": "llama", "prompt": "Hello", "max_tokens": 8000, "ignore_eos": True, "stream": True}
        t, events, first = stream_in_thread(url, body)
        assert first.wait(30)
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(0.3)
        ready = httpx.get(f"{url}/health/ready")  # a new connection: still accepted, and told
        assert ready.status_code == 503 and ready.json()["status"] == "draining", ready.text
        r = httpx.post(f"{url}/v1/completions", json={"model": "llama", "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
        assert r.json()["error"]["message"]
        t.join(DRAIN + 30)
        ended = time.monotonic() - signalled
        assert events[-1] == "[DONE]", events[-3:]
        last = json.loads(events[-2])
        assert "error" in last and "shutting down" in last["error"]["message"], last
        assert DRAIN - 0.5 < ended < DRAIN + 5, ended
        assert proc.wait(DRAIN + 10) in (0, -signal.SIGTERM)
        assert time.monotonic() - signalled < DRAIN + 10
    finally:
        if proc.poll() is None:
            proc.kill()
