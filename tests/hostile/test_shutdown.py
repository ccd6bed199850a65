"""SIGTERM ends every stream cleanly (issue #16, finding 4): `/health/ready` turns 503 "draining" at once, new
requests (new connections too) get 503 with Retry-After, a stream still running at the drain deadline ends with an
error event and `[DONE]`, and the process exits within the drain timeout plus a few seconds."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx

from tests.live import REPO

DRAIN = 2.0


def test_sigterm_drains_then_ends_running_streams_with_an_error_event(tiny_models, tmp_path):
    model = tmp_path / "llama"
    shutil.copytree(tiny_models["llama"], model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 8192}))  # RoPE: a long stream
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")} | {
        "LORAPLEX_MODEL": str(model), "LORAPLEX_DATA_DIR": str(tmp_path / "data"), "LORAPLEX_LORA_BACKEND": "eager",
        "LORAPLEX_MAX_MODEL_LEN": "8192", "LORAPLEX_MAX_NUM_SEQS": "2", "LORAPLEX_LORA_PAGES": "4",
        "LORAPLEX_MAX_LORA_RANK": "16", "LORAPLEX_DRAIN_TIMEOUT": str(DRAIN),
    }  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port), "--log-level", "warning"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"{url}/health/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        events: list[str] = []
        first = threading.Event()

        def stream() -> None:
            body = {"model": "llama", "prompt": "Hello", "max_tokens": 8000, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        first.set()

        t = threading.Thread(target=stream)
        t.start()
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
