"""Honest metrics and one log format (issue 17): counters that are counters, the three latency histograms, KV-cache
and LoRA-pool use, per-adapter series with the base model under its own id; start-up phases and lifecycle events as
log lines, text or JSON, uvicorn's included; a model that cannot load ends the process with one line."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import httpx
import pytest

from tests.live import REPO, wait_ready

SERVER_SETTINGS = dict(auto_merge=True, merge_window=2)


def families(text: str) -> dict[str, str]:
    """{family name: type} from the `# TYPE` lines of Prometheus text."""
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))


def value(text: str, sample: str) -> float:
    m = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
    assert m, sample
    return float(m.group(1))


def test_metrics_are_honest(client, server, adapter_dir):
    files = {f: (f, (adapter_dir / "alpha" / f).read_bytes()) for f in ("adapter_config.json", "adapter_model.safetensors")}
    assert client.post("/v1/adapters", data={"name": "obs"}, files=files).status_code == 201
    for model in ("llama", "obs", "obs"):
        r = client.post("/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 3, "ignore_eos": True})
        assert r.status_code == 200, r.text
    r = client.post("/v1/completions", json={"model": "llama", "prompt": "Hi", "max_tokens": 2,
                                             "adapters": [{"name": "obs", "weight": 0.5}]})  # fmt: skip
    assert r.status_code == 200
    text = client.get("/metrics").text
    types = families(text)
    samples = set(re.findall(r"^([a-z_]+)(?:\{| )", text, re.M))
    for name in samples:  # every *_total is a counter's sample, never a gauge named so
        if name.endswith("_total"):
            assert (types.get(name) or types.get(name.removesuffix("_total"))) == "counter", name
    for name in ("loraplex_adapter_loads", "loraplex_adapter_evictions", "loraplex_adapter_merges",
                 "loraplex_adapter_unmerges", "loraplex_prefix_cache_hit_tokens", "loraplex_prefix_cache_queried_tokens",
                 "loraplex_requests", "loraplex_generation_tokens"):  # fmt: skip
        assert (types.get(name) or types.get(f"{name}_total")) == "counter", name
    assert value(text, "loraplex_adapter_loads_total") >= 1
    for name in ("loraplex_time_to_first_token_seconds", "loraplex_inter_token_latency_seconds",
                 "loraplex_e2e_request_latency_seconds"):  # fmt: skip
        assert types[name] == "histogram" and value(text, f"{name}_count") >= 4, name
    assert 0 <= value(text, "loraplex_kv_cache_usage_ratio") <= 1
    assert 0 < value(text, "loraplex_lora_pool_usage_ratio") <= 1  # obs is resident
    assert types["loraplex_adapter_merged"] == "gauge" and types["loraplex_merged_adapter_info"] == "gauge"
    # the base model's traffic under its id, never "base"; a composition under its adapters
    assert value(text, 'loraplex_adapter_requests_total{adapter="llama"}') == 1
    assert value(text, 'loraplex_adapter_requests_total{adapter="obs"}') == 3  # two alone, one composed
    assert value(text, 'loraplex_adapter_generation_tokens_total{adapter="obs"}') >= 6
    assert 'adapter="base"' not in text


# --- logs and start-up, in a process of its own ---------------------------------------------------


def spawn(env: dict[str, str], *args: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    full = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")} | env
    proc = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port), *args], cwd=REPO, env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    return proc, f"http://127.0.0.1:{port}"


def stop(proc: subprocess.Popen) -> list[str]:
    proc.terminate()
    out, _ = proc.communicate(timeout=60)
    return out.splitlines()


def test_one_json_log_format_with_phases_and_lifecycle_lines(llama_dir, adapter_dir, tmp_path):
    env = {"LORAPLEX_MODEL": str(llama_dir), "LORAPLEX_DATA_DIR": str(tmp_path), "LORAPLEX_LORA_BACKEND": "eager",
           "LORAPLEX_MAX_MODEL_LEN": "128", "LORAPLEX_MAX_NUM_SEQS": "4", "LORAPLEX_LORA_PAGES": "16",
           "LORAPLEX_LORA_PAGE_SIZE": "8", "LORAPLEX_MAX_LORA_RANK": "16", "LORAPLEX_LOG_FORMAT": "json"}  # fmt: skip
    proc, url = spawn(env)
    try:
        wait_ready(proc, url)
        files = {f: (f, (adapter_dir / "beta" / f).read_bytes()) for f in ("adapter_config.json",
                                                                             "adapter_model.safetensors")}  # fmt: skip
        assert httpx.post(f"{url}/v1/adapters", data={"name": "logged"}, files=files).status_code == 201
        assert httpx.delete(f"{url}/v1/adapters/logged").status_code == 204
    finally:
        lines = stop(proc)
    records = [json.loads(line) for line in lines]  # every line is one JSON object: nothing else was written
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    messages = [r["message"] for r in records]
    assert any(m.startswith("start-up: loading") for m in messages)
    assert any(re.match(r"loaded llama \(.*\) in [\d.]+ s", m) for m in messages)
    assert any(re.match(r"ready in \d+ s: llama on cpu", m) for m in messages)
    assert any(m.startswith("adapter logged added: version 1, rank 8") for m in messages)
    assert any(m.startswith("adapter logged deleted") for m in messages)
    assert any(r["logger"] == "uvicorn.access" and "/v1/adapters" in r["message"] for r in records)


def test_a_model_that_cannot_load_exits_with_one_line(tmp_path):
    proc, _ = spawn({"LORAPLEX_DATA_DIR": str(tmp_path)}, "--model", "/no/such/model")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    errors = [line for line in out.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "/no/such/model" in errors[0] and "no such directory" in errors[0], out
    assert "Traceback" not in out


@pytest.mark.parametrize("phase", ["converting", "loading", "compiling"])
def test_ready_reports_the_phase_and_progress(phase, client, server):
    st = server.state
    saved = st.ready, st.phase
    st.ready, st.phase = False, phase
    try:
        r = client.get("/health/ready")
    finally:
        st.ready, st.phase = saved
    assert r.status_code == 503 and r.json()["phase"] == phase == r.json()["status"]
    if phase == "compiling":
        assert set(r.json()["compiling"]) == {"done", "total"}
