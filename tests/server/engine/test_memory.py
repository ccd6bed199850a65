"""The memory budget: the KV cache's rows and the LoRA pool's pages sized from a share of the device's memory."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import server.engine.memory as memory
from benchmarks.common import resident
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.memory import BudgetError, page_bytes, plan_memory, row_bytes, weight_bytes
from server.engine.model import load_base_model

CPU = torch.device("cpu")


def config(**kw) -> EngineConfig:
    return EngineConfig(**(dict(max_num_seqs=8, max_model_len=128, lora_pages=16, lora_page_size=8, max_lora_rank=16,
                                lora_backend="eager") | kw))  # fmt: skip


@pytest.fixture
def model(llama_dir):
    return AutoModelForCausalLM.from_pretrained(llama_dir).eval()


def test_sizes_of_a_row_a_page_and_the_weights(model):
    c = model.config  # the tiny Llama: 2 layers, 2 KV heads of 16 dims
    assert row_bytes(model, 128, torch.float32) == 2 * 2 * 2 * 128 * 16 * 4
    per_layer = (64 + 64) + (64 + 32) * 2 + (64 + 64) + (64 + 128) * 2 + (128 + 64)  # q, k, v, o, gate, up, down
    assert page_bytes(model, 8, torch.bfloat16) == c.num_hidden_layers * per_layer * 8 * 2
    params = sum(p.numel() * 4 for p in model.parameters())
    assert weight_bytes(model, packed_copies=False) >= params
    assert weight_bytes(model, packed_copies=True) > weight_bytes(model, packed_copies=False)


def test_the_budget_sizes_the_cache_and_the_pool(model, monkeypatch):
    monkeypatch.setattr(memory, "activation_peak", lambda m, tokens, device: 1000)
    weights = weight_bytes(model, packed_copies=True)
    row, page = row_bytes(model, 128, torch.float32), page_bytes(model, 8, torch.float32)
    # room for 3 rows and the pool's minimum (the zero page and a rank-16 adapter: 3 pages) beyond a quarter's share
    total = weights + 1000 + 3 * row + 3 * page + 100
    monkeypatch.setattr(memory, "device_memory", lambda device: total)
    plan = plan_memory(config(memory_fraction=1.0, prefix_caching=False), model, 128, CPU)
    assert (plan.kv_rows, plan.lora_pages, plan.prefix_tokens) == (3, 3, 0) and plan.activations == 1000
    assert "KV cache 3 rows" in plan.describe()
    # the prefix cache takes at most half of the KV's share: the rows make way
    plan = plan_memory(config(memory_fraction=1.0, prefix_cache_tokens=10**6), model, 128, CPU)
    assert plan.kv_rows == 1 and 128 <= plan.prefix_tokens < 2 * 128
    assert plan.kv_rows * row + plan.lora_pages * page + plan.prefix_tokens * row // 128 <= total - weights - 1000
    # plenty of memory: the configured counts are the upper bounds
    monkeypatch.setattr(memory, "device_memory", lambda device: 2**40)
    plan = plan_memory(config(memory_fraction=0.5), model, 128, CPU)
    assert (plan.kv_rows, plan.lora_pages) == (8, 16)
    with pytest.raises(BudgetError, match="memory_fraction"):
        plan_memory(config(memory_fraction=weights / 2**40), model, 128, CPU)


def test_unset_on_the_cpu_keeps_the_configured_sizes(model):
    assert plan_memory(config(), model, 128, CPU) is None


def test_the_engine_serves_with_what_the_budget_gives(llama_dir, monkeypatch):
    base = load_base_model(str(llama_dir), cache_dir=llama_dir)
    measured = memory.activation_peak(base.model, 64, CPU)  # the real measurement runs (a real forward)
    assert measured >= 0
    monkeypatch.setattr(memory, "activation_peak", lambda m, tokens, device: 0)
    row, page = row_bytes(base.model, 128, torch.float32), page_bytes(base.model, 8, torch.float32)
    free = 3 * row + 4 * page
    monkeypatch.setattr(memory, "device_memory", lambda device: weight_bytes(base.model, packed_copies=True) + free)
    engine = Engine(base, config(memory_fraction=1.0))
    rows, pages, prefix = engine.config.max_num_seqs, engine.config.lora_pages, engine.config.prefix_cache_tokens
    assert rows * row + pages * page + prefix * row // 128 <= free and 1 <= rows < 8 and 3 <= pages < 16
    assert engine.prefix.capacity == prefix // 16
    assert engine.runner.cache.rows_total == rows + 1  # and the padding's scratch row
    assert engine.runner.layers["model.layers.0.mlp.up_proj"].lora_A.shape[0] == pages


def test_reserve_memory_maps_the_preallocated_buffers_in_at_start(llama_dir):
    base = load_base_model(str(llama_dir), cache_dir=llama_dir)
    big = dict(prefix_cache_tokens=2**19)  # 64 MiB per prefix-cache buffer: beyond glibc's mmap threshold, lazy
    before = resident()["VmRSS"]
    lazy = Engine(base, config(**big))
    assert resident()["VmRSS"] - before < 2**26  # zeros that take memory only as they are written
    reserved = lazy.reserve_memory()
    kv = sum(b.numel() * b.element_size() for name, b in base.model.named_buffers() if "loraplex" in name)
    pool = sum(layer.lora_A.nbytes + layer.lora_B.nbytes for layer in lazy.runner.layers.values())
    assert reserved == kv + pool and reserved > 2**28
    assert resident()["VmRSS"] - before > 0.9 * reserved
    assert all(not b.any() for name, b in base.model.named_buffers() if "loraplex" in name)  # still zeros
    lazy.stop()
    base = load_base_model(str(llama_dir), cache_dir=llama_dir)
    before = resident()["VmRSS"]
    Engine(base, config(**big, reserve_memory=True)).stop()
    assert resident()["VmRSS"] - before > 0.9 * reserved
