"""Hostile adapter uploads (issue #16, findings 1, 2, 7 and 9): no upload can change another client's output or
stall the server; archives are bounded while they are read; every refusal is a 4xx, quick, and short."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import time
import zipfile
from pathlib import Path

import httpx
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from transformers import AutoModelForCausalLM

from adapters.peft_io import module_scaling
from tests.hostile.support import envelope, live_latency
from tests.tiny import make_peft_adapter

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
LIMIT = 16 * 2**20
SERVER_SETTINGS = dict(max_upload_bytes=LIMIT, merge_window=4)  # merges after 4 dominant decode steps


@pytest.fixture(scope="module")
def good(tmp_path_factory, llama_dir) -> Path:
    return make_peft_adapter(llama_dir, tmp_path_factory.mktemp("hostile") / "good", "llama", r=4, seed=7)


def config_of(d: Path, **changes) -> bytes:
    return json.dumps(json.loads((d / CONFIG).read_text()) | changes).encode()


def upload(client: httpx.Client, name: str, config: bytes, weights: bytes) -> httpx.Response:
    return client.post(
        "/v1/adapters", data={"name": name}, files={CONFIG: (CONFIG, config), WEIGHTS: (WEIGHTS, weights)}
    )


def upload_archive(client: httpx.Client, name: str, blob: bytes, filename: str) -> httpx.Response:
    return client.post("/v1/adapters", data={"name": name}, files={"archive": (filename, blob)})


def base_text(client: httpx.Client, n: int = 12) -> tuple[str, list]:
    body = {"model": "llama", "prompt": "The capital of France is", "max_tokens": n, "temperature": 0,
            "ignore_eos": True, "logprobs": 2}  # fmt: skip
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["text"], choice["logprobs"]["token_logprobs"]


# ---- 1. a hostile adapter corrupts other clients' answers ---------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"lora_alpha": float("nan")},
        {"lora_alpha": float("inf")},
        {"lora_alpha": 1e30},
        {"alpha_pattern": {"q_proj": 1e30}},
        {"alpha_pattern": {"q_proj": float("-inf")}},
    ],
    ids=["alpha-nan", "alpha-inf", "alpha-1e30", "pattern-1e30", "pattern-minus-inf"],
)
def test_non_finite_or_huge_scaling_is_refused_and_base_output_unchanged(client, good, changes):
    before = base_text(client)
    r = upload(client, "hostile", config_of(good, **changes), (good / WEIGHTS).read_bytes())
    if r.status_code == 201:  # today's code: served, then merged into the base weights by its own traffic
        for _ in range(3):
            client.post(
                "/v1/completions", json={"model": "hostile", "prompt": "x", "max_tokens": 16, "ignore_eos": True}
            )
        client.delete("/v1/adapters/hostile")
    err = envelope(r, 400)
    assert "lora_alpha" in err["message"] or "alpha_pattern" in err["message"]
    assert base_text(client) == before


def test_finite_weights_whose_delta_overflows_are_refused(client, good):
    t = load_file(good / WEIGHTS)
    t = {k: v * 1e19 for k, v in t.items()}  # every value finite; B·A is 1e38-ish, inf in fp16/bf16 pools
    err = envelope(upload(client, "overflow", (good / CONFIG).read_bytes(), st_save(t)), 400)
    assert "over the limit" in err["message"]


# ---- 2. regex DoS ------------------------------------------------------------------------------------------


def test_regex_patterns_are_refused_at_once_without_stalling_the_server(client, server, good):
    # today's code runs every key as a regex on every module name: (.*){6}Z backtracks ~0.2 s per module
    config = config_of(good, alpha_pattern={"(.*){6}Z": 16}, rank_pattern={"(a+)+$": 4})
    with live_latency(server.url) as worst:
        t = time.perf_counter()
        r = upload(client, "redos", config, (good / WEIGHTS).read_bytes())
        took = time.perf_counter() - t
    err = envelope(r, 400)
    assert "never regular expressions" in err["message"]
    assert took < 1.0 and worst[0] < 0.1, (took, worst[0])


def test_literal_patterns_still_apply_as_peft_matches_them(client, good, llama_dir):
    """A module-name key matches the whole path or a dotted suffix (PEFT's rule): layer 0's q_proj gets 4× alpha."""
    config = config_of(good, alpha_pattern={"model.layers.0.self_attn.q_proj": 32})
    r = upload(client, "patterned", config, (good / WEIGHTS).read_bytes())
    assert r.status_code == 201, r.text
    client.delete("/v1/adapters/patterned")
    peft_dir = good.parent / "patterned"
    peft_dir.mkdir(exist_ok=True)
    (peft_dir / CONFIG).write_bytes(config)
    (peft_dir / WEIGHTS).write_bytes((good / WEIGHTS).read_bytes())
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), peft_dir)
    peft_scaling = {
        n: m.scaling["default"] for n, m in model.named_modules() if isinstance(getattr(m, "scaling", None), dict)
    }
    cfg = json.loads(config)
    for layer, want in ((0, 8.0), (1, 2.0)):  # alpha 32 / r 4 for layer 0's q_proj, 8 / 4 elsewhere
        module = f"model.layers.{layer}.self_attn.q_proj"
        assert module_scaling(cfg, module, 4) == want
        assert next(v for n, v in peft_scaling.items() if n.endswith(module)) == want


# ---- 7. archives ---------------------------------------------------------------------------------------------


def _targz(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_an_archive_of_100000_members_is_refused_in_under_a_second_with_a_short_answer(client):
    members = [(f"junk/{i}", b"") for i in range(100_000)]
    blob = _targz(members)
    t = time.perf_counter()
    r = upload_archive(client, "many", blob, "a.tar.gz")
    took = time.perf_counter() - t
    err = envelope(r, 400)
    assert "members" in err["message"] and len(r.content) < 4096 and took < 1.0, (took, len(r.content))


def test_a_tar_whose_first_member_decompresses_to_a_gibibyte_is_refused_unread(client):
    """3 MB of gzip holding one member of 1 GiB of zeros (gzip members concatenated: cheap to make)."""
    size = 2**30
    header = tarfile.TarInfo(WEIGHTS)
    header.size = size
    zeros = gzip.compress(bytes(1 << 20), compresslevel=1)
    blob = gzip.compress(header.tobuf(), compresslevel=1) + zeros * (size >> 20) + gzip.compress(bytes(1024))
    t = time.perf_counter()
    r = upload_archive(client, "bomb", blob, "a.tar.gz")
    took = time.perf_counter() - t
    err = envelope(r, 400)
    assert "more than the upload limit" in err["message"] and took < 1.0, took


def _zip_with(good: Path, method: int | None = None, encrypted: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for f in (CONFIG, WEIGHTS):
            z.writestr(f, (good / f).read_bytes())
    blob = bytearray(buf.getvalue())
    for sig, flag_at, method_at in ((b"PK\x03\x04", 6, 8), (b"PK\x01\x02", 8, 10)):  # local and central headers
        at = blob.find(sig)
        while at >= 0:
            if method is not None:
                blob[at + method_at : at + method_at + 2] = method.to_bytes(2, "little")
            if encrypted:
                blob[at + flag_at] |= 1
            at = blob.find(sig, at + 4)
    return bytes(blob)


@pytest.mark.parametrize(("kind", "expect"), [("method", "compression method"), ("encrypted", "encrypted")])
def test_zip_members_with_an_unknown_method_or_encryption_are_a_400(client, good, kind, expect):
    blob = _zip_with(good, method=99) if kind == "method" else _zip_with(good, encrypted=True)
    err = envelope(upload_archive(client, "zipped", blob, "a.zip"), 400)
    assert expect in err["message"]


def test_error_lists_are_capped(client, good):
    t = load_file(good / WEIGHTS) | {f"junk.{i}": torch.zeros(1) for i in range(3000)}
    r = upload(client, "noisy", (good / CONFIG).read_bytes(), st_save(t))
    err = envelope(r, 400)
    assert "more" in err["message"] and len(r.content) < 4096, len(r.content)


# ---- 9. configs a client controls ----------------------------------------------------------------------------


def test_deeply_nested_config_json_is_a_400(client, good):
    cfg = json.loads((good / CONFIG).read_text())
    nested = json.dumps(cfg)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    err = envelope(upload(client, "deep", nested.encode(), (good / WEIGHTS).read_bytes()), 400)
    assert CONFIG in err["message"]


def test_an_adapter_may_not_take_the_base_models_id(client, good):
    err = envelope(upload(client, "llama", (good / CONFIG).read_bytes(), (good / WEIGHTS).read_bytes()), 400)
    assert "base model" in err["message"]
    assert client.get("/v1/models").json()["data"][0]["parent"] is None  # the base model is still the base
