"""Adapters over HTTP: upload, serve at once, versions, delete, download, restart, limits."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import httpx
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tests.live import start_server, tiny_settings
from tests.tiny import make_peft_adapter

BASE = "llama"


def files_of(d: Path) -> dict:
    return {
        "adapter_config.json": ("adapter_config.json", (d / "adapter_config.json").read_bytes()),
        "adapter_model.safetensors": ("adapter_model.safetensors", (d / "adapter_model.safetensors").read_bytes()),
    }


def greedy(http: httpx.Client, model: str, **extra) -> str:
    r = http.post("/v1/completions", json={"model": model, "prompt": "Hello world", "max_tokens": 8,
                                           "temperature": 0, "ignore_eos": True, **extra})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


SERVER_SETTINGS = dict(max_upload_bytes=2 * 2**20)  # the module's `server` (tests/conftest.py)


@pytest.fixture(scope="module")
def peft_dirs(tmp_path_factory, llama_dir):
    root = tmp_path_factory.mktemp("uploads")
    return {
        "one": make_peft_adapter(llama_dir, root / "one", "llama", r=4, seed=21),
        "two": make_peft_adapter(llama_dir, root / "two", "llama", r=8, seed=22, targets=["q_proj", "v_proj"]),
    }


def test_upload_is_servable_at_once_and_matches_peft(client, peft_dirs, llama_dir):
    r = client.post("/v1/adapters", data={"name": "up-one"}, files=files_of(peft_dirs["one"]))
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["id"] == "up-one" and body["object"] == "adapter" and body["parent"] == BASE
    assert body["rank"] == 4 and body["version"] == 1 and len(body["sha256"]) == 64 and body["size_bytes"] > 0
    text = greedy(client, "up-one")
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), peft_dirs["one"]).merge_and_unload()
    from tests.tiny import make_tokenizer

    tok = make_tokenizer()
    ids = tok("Hello world", return_tensors="pt")["input_ids"]
    out = merged.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert text == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert {"up-one"} <= {m["id"] for m in client.get("/v1/models").json()["data"]}
    assert client.get("/v1/adapters/up-one").json()["sha256"] == body["sha256"]
    assert "up-one" in [a["id"] for a in client.get("/v1/adapters").json()["data"]]


def test_archives_zip_and_tar_gz(client, peft_dirs):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, (_, data) in files_of(peft_dirs["two"]).items():
            z.writestr(name, data)
    r = client.post("/v1/adapters", data={"name": "zipped"}, files={"archive": ("a.zip", buf.getvalue())})
    assert r.status_code == 201, r.text
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, (_, data) in files_of(peft_dirs["two"]).items():
            info = tarfile.TarInfo(f"two/{name}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    r = client.post("/v1/adapters", data={"name": "tarred"}, files={"archive": ("a.tar.gz", buf.getvalue())})
    assert r.status_code == 201, r.text
    assert greedy(client, "zipped") == greedy(client, "tarred")


def test_conflict_overwrite_and_delete(client, peft_dirs):
    assert client.post("/v1/adapters", data={"name": "ver"}, files=files_of(peft_dirs["one"])).status_code == 201
    first = greedy(client, "ver")
    r = client.post("/v1/adapters", data={"name": "ver"}, files=files_of(peft_dirs["two"]))
    assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_exists"
    assert greedy(client, "ver") == first  # the failed upload changed nothing
    r = client.post("/v1/adapters?overwrite=true", data={"name": "ver"}, files=files_of(peft_dirs["two"]))
    assert r.status_code == 201 and r.json()["version"] == 2 and r.json()["rank"] == 8
    second = greedy(client, "ver")
    assert second != first
    assert client.delete("/v1/adapters/ver").status_code == 204
    r = client.post("/v1/completions", json={"model": "ver", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert client.delete("/v1/adapters/ver").status_code == 404


def test_download_loads_in_peft_with_identical_logits(client, peft_dirs, llama_dir, tmp_path):
    assert client.post("/v1/adapters", data={"name": "dl"}, files=files_of(peft_dirs["one"])).status_code == 201
    r = client.get("/v1/adapters/dl/download")
    assert r.status_code == 200 and r.headers["content-type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(r.content)) as t:
        t.extractall(tmp_path, filter="data")
    ids = torch.randint(0, 300, (1, 6))
    with torch.no_grad():
        a = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), peft_dirs["one"])(ids).logits
        b = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), tmp_path / "dl")(ids).logits
    torch.testing.assert_close(a, b)


def test_over_the_upload_limit_is_413(client):
    r = client.post("/v1/adapters", data={"name": "huge"}, files={"archive": ("a.zip", b"\0" * (3 * 2**20))})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    assert client.get("/v1/adapters/huge").status_code == 404


def test_store_survives_a_restart(tmp_path, llama_dir, peft_dirs):
    settings = tiny_settings(llama_dir, tmp_path, max_num_seqs=4, lora_pages=8)
    live = start_server(settings)
    try:
        with httpx.Client(base_url=live.url, timeout=60) as c:
            assert c.post("/v1/adapters", data={"name": "keep"}, files=files_of(peft_dirs["one"])).status_code == 201
            before = greedy(c, "keep")
            sha = c.get("/v1/adapters/keep").json()["sha256"]
    finally:
        live.stop()
    live = start_server(settings)
    try:
        with httpx.Client(base_url=live.url, timeout=60) as c:
            assert c.get("/v1/adapters/keep").json()["sha256"] == sha
            assert greedy(c, "keep") == before
    finally:
        live.stop()


def test_host_tier_evicts_and_reloads(tmp_path, llama_dir, peft_dirs):
    """With room for one adapter in host memory, three still serve: the others are re-read from disk."""
    one = sum(p.stat().st_size for p in peft_dirs["one"].iterdir())
    settings = tiny_settings(llama_dir, tmp_path, max_num_seqs=4, lora_pages=4, host_adapter_bytes=one)
    live = start_server(settings)
    try:
        with httpx.Client(base_url=live.url, timeout=60) as c:
            for n in ("h1", "h2", "h3"):
                assert c.post("/v1/adapters", data={"name": n}, files=files_of(peft_dirs["one"])).status_code == 201
            texts = {greedy(c, n) for n in ("h1", "h2", "h3", "h1")}
            assert len(texts) == 1  # the same weights under three names
            reg = live.state.registry
            assert reg.host_evictions >= 2 and reg.host_loads >= 1
            assert reg.resident_bytes <= one * 2
    finally:
        live.stop()
