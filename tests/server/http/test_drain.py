"""SIGTERM drains: the running stream finishes, then the process exits cleanly."""

from __future__ import annotations

import json
import signal

from tests.live import spawn_server, stream_in_thread


def test_sigterm_lets_the_running_stream_finish(llama_dir, tmp_path):
    proc, url = spawn_server({
        "LORAPLEX_MODEL": str(llama_dir), "LORAPLEX_DATA_DIR": str(tmp_path), "LORAPLEX_LORA_BACKEND": "eager",
        "LORAPLEX_MAX_MODEL_LEN": "256", "LORAPLEX_LORA_PAGES": "4", "LORAPLEX_MAX_LORA_RANK": "16",
        "LORAPLEX_DRAIN_TIMEOUT": "30",
    })  # fmt: skip
    try:
        body = {"model": "llama", "prompt": "Hello", "max_tokens": 200, "ignore_eos": True, "stream": True}
        t, events, first = stream_in_thread(url, body)
        assert first.wait(30)
        proc.send_signal(signal.SIGTERM)
        in_flight = len(events)
        t.join(60)
        assert in_flight < 100  # the signal came while the stream was running
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert "error" not in chunks[-1] and chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM after its graceful shutdown
    finally:
        if proc.poll() is None:
            proc.kill()
