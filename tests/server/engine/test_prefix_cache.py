"""Adapter-aware prefix caching: the block pool and its chained-hash index alone, then through the engine (outputs
identical with and without it, chunked prompts, several adapters, nothing compiled anew)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adapters.peft_io import LoraModule, LoraWeights
from adapters.tiers.registry import AdapterRegistry
from server.engine.kv_cache import SlotKVCache
from server.engine.prefix_cache import PrefixCache
from tests.server.engine.support import LONG, PROMPTS

BS = 4  # block size in the unit tests


def pool_with_rows(blocks: int, rows: int = 3, max_len: int = 32):
    cache = SlotKVCache(rows, max_len, torch.float32, torch.device("cpu"))
    attn = nn.Module()
    cache.attach(attn, 2, 8)
    return PrefixCache(cache, blocks, BS), attn


def fill_row(attn, row: int, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    attn.loraplex_k[row, :, :n] = torch.randn(2, n, 8, generator=g)
    attn.loraplex_v[row, :, :n] = torch.randn(2, n, 8, generator=g)


def adapter(name: str):
    w = LoraWeights({"r": 1}, {"m": LoraModule(torch.zeros(1, 2), torch.zeros(2, 1), 1.0)})
    return AdapterRegistry().add(name, w)


def test_blocks_round_trip_under_their_own_adapters():
    prefix, attn = pool_with_rows(blocks=8)
    tokens = list(range(100, 111))  # 11 tokens: 2 full blocks
    fill_row(attn, 0, 11, seed=1)
    base, a = [], [(adapter("a"), 1.0)]
    prefix.insert(tokens, base, row=0)
    assert len(prefix) == 2
    found = prefix.lookup(tokens + [7, 8], base)
    assert len(found) == 2 and prefix.lookup(tokens, a) == []  # another adapter set: nothing
    assert len(prefix.lookup(tokens[:8], base)) == 1  # at least one token stays uncached
    assert prefix.lookup([1] + tokens[1:], base) == []  # a different first block: nothing
    assert prefix.copy_in(found, row=2) == 8
    assert torch.equal(attn.loraplex_k[2, :, :8], attn.loraplex_k[0, :, :8])
    assert torch.equal(attn.loraplex_v[2, :, :8], attn.loraplex_v[0, :, :8])


def test_a_hash_collision_never_serves_another_prompts_kv(monkeypatch):
    prefix, attn = pool_with_rows(blocks=4)
    fill_row(attn, 0, 8, seed=2)
    prefix.insert(list(range(8)), [], row=0)
    monkeypatch.setattr(prefix, "_blocks", {k: b for k, b in prefix._blocks.items()})
    import builtins

    real_hash = builtins.hash
    monkeypatch.setattr(builtins, "hash", lambda x: 42 if isinstance(x, tuple) else real_hash(x))
    try:  # every block hashes alike now: the stored tokens still tell them apart
        prefix._blocks = {42: next(iter(prefix._blocks.values()))}
        assert prefix.lookup([9, 9, 9, 9, 1], []) == []
    finally:
        monkeypatch.setattr(builtins, "hash", real_hash)


def test_least_recently_used_chains_go_first_and_never_their_start_before_their_end():
    prefix, attn = pool_with_rows(blocks=4)
    fill_row(attn, 0, 8, seed=3)
    fill_row(attn, 1, 8, seed=4)
    first, second = list(range(8)), list(range(50, 58))
    prefix.insert(first, [], row=0)  # blocks f0, f1
    prefix.insert(second, [], row=1)  # blocks s0, s1: the pool is full
    prefix.lookup(first + [0], [])  # first is the most recently used now
    fill_row(attn, 2, 4, seed=5)
    prefix.insert(list(range(90, 94)), [], row=2)  # one more block: second's end goes (not its start)
    assert len(prefix.lookup(first + [0], [])) == 2
    assert len(prefix.lookup(second + [0], [])) == 1


def test_blocks_of_a_retired_adapter_are_dropped():
    prefix, attn = pool_with_rows(blocks=4)
    fill_row(attn, 0, 8, seed=6)
    a = adapter("a")
    prefix.insert(list(range(8)), [(a, 1.0)], row=0)
    assert len(prefix) == 2
    a.retired = True  # replaced or deleted
    assert prefix.drop_retired() == 2 and len(prefix) == 0
    prefix.insert(list(range(8)), [(a, 1.0)], row=0)  # nothing new is kept for it either
    assert len(prefix) == 0


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_cached_prefixes_give_the_uncached_outputs(make_harness, llama_dir, engine_adapters, backend):
    """The same requests twice on an engine with prefix caching (the second time from cached blocks: shared system
    prompts, several adapters, a chunked long prompt, a conversation resent with its answer) and on one without:
    the same greedy tokens, and nothing compiled after warm-up."""
    cached = make_harness(llama_dir, engine_adapters, backend, max_num_seqs=4, auto_merge=False, prefill_chunk=16)
    plain = make_harness(llama_dir, engine_adapters, "eager", max_num_seqs=4, auto_merge=False, prefill_chunk=16,
                         prefix_caching=False)  # fmt: skip
    system = " ".join(PROMPTS[:3]) + " "
    jobs = [dict(prompt=system + p, adapters=ad, max_tokens=8, min_tokens=8)
            for p in PROMPTS[3:] for ad in ([], [("a", 1.0)], [("a", 0.5), ("b", 0.5)])]  # fmt: skip
    jobs.append(dict(prompt=LONG + LONG, adapters=[("b", 1.0)], max_tokens=6, min_tokens=6))
    compiles = dict(torch._dynamo.utils.counters["frames"])
    first = cached.run(jobs)
    assert cached.engine.prefix.hit_tokens > 0  # the shared system prompt, from the second request on
    hits = cached.engine.prefix.hit_tokens
    again = cached.run(jobs)
    assert cached.engine.prefix.hit_tokens > hits
    want = plain.run(jobs)
    assert [o["ids"] for o in first] == [o["ids"] for o in want] == [o["ids"] for o in again]
    turn2 = [dict(prompt=system + PROMPTS[3] + cached.tok.decode(first[0]["ids"]) + " more", max_tokens=8,
                  min_tokens=8)]  # fmt: skip
    before = cached.engine.prefix.hit_tokens
    assert cached.run(turn2)[0]["ids"] == plain.run(turn2)[0]["ids"]
    assert cached.engine.prefix.hit_tokens - before >= 16  # the earlier turn's blocks, answer included
    if backend == "compiled":
        assert dict(torch._dynamo.utils.counters["frames"]) == compiles
