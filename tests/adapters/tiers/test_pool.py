"""The device tier: pages lent to adapters, written into every layer, LRU eviction of unused ones, never of one in
use, and a retired adapter's pages freed with its last user."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adapters.layers import LoraMapping, wrap_multi_lora
from adapters.peft_io import LoraModule, LoraWeights
from adapters.tiers.pool import LoraPool, PoolFull
from adapters.tiers.registry import AdapterRegistry


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.v = nn.Linear(8, 6), nn.Linear(8, 4)


def weights(rank: int, value: float) -> LoraWeights:
    mods = {name: LoraModule(torch.full((rank, 8), value), torch.full((out, rank), value), 0.5)
            for name, out in (("q", 6), ("v", 4))}  # fmt: skip
    return LoraWeights(config={"r": rank}, modules=mods)


@pytest.fixture
def pool():
    layers = wrap_multi_lora(TwoLinears(), LoraMapping(), pages=5, page_size=4)
    return LoraPool(layers, pages=5, page_size=4, device=torch.device("cpu")), layers


def test_pages_hold_each_adapters_rows_and_are_reused_after_eviction(pool):
    pool, layers = pool
    reg = AdapterRegistry()
    a, b, c = (reg.add(n, weights(r, v)) for n, r, v in (("a", 8, 1.0), ("b", 4, 2.0), ("c", 4, 3.0)))
    pages_a = pool.acquire(a, a.weights)  # rank 8: two pages of 4 rows
    assert len(pages_a) == 2 and 0 not in pages_a  # page 0 stays the zero page (pages are host integers)
    rows = layers["q"].lora_B[list(pages_a)].flatten(0, 1)  # B's columns as rows, scaled
    torch.testing.assert_close(rows, torch.full((8, 6), 0.5))
    assert layers["q"].lora_A[0].abs().sum() == 0
    pages_b = pool.acquire(b, b.weights)
    pool.release(b)  # b stays resident, unused: a warm cache
    with pytest.raises(PoolFull):  # 3 pages: b's and the free one are not enough (a is in use), and b stays
        pool.acquire(a2 := reg.add("a2", weights(12, 4.0)), a2.weights)
    pages_c = pool.acquire(c, c.weights)  # the one free page
    assert pool.resident_count() == 3 and pool.evictions == 0
    pool.release(c)
    d = reg.add("d", weights(8, 5.0))
    pages_d = pool.acquire(d, d.weights)  # evicts b and c (least recently used first), never a
    assert pool.evictions == 2 and set(pages_d) == set(pages_b) | set(pages_c)
    assert b.key not in layers["q"].adapters and a.key in layers["q"].adapters


def test_a_retired_adapter_leaves_with_its_last_user(pool):
    pool, layers = pool
    reg = AdapterRegistry()
    a = reg.add("a", weights(4, 1.0))
    pages = pool.acquire(a, a.weights)
    pool.acquire(a, a.weights)
    reg.remove("a")  # retired while two requests use it
    pool.release(a)
    assert pool.resident_count() == 1
    pool.release(a)
    assert pool.resident_count() == 0 and layers["v"].lora_A[list(pages)].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepared_host_weights_fill_the_same_pages(dtype):
    """The host tier's copy as the pool wants it (pre-cast, scaling folded into B) writes the very same rows."""
    raw = weights(8, 0.0)
    g = torch.Generator().manual_seed(0)
    for m in raw.modules.values():
        m.lora_A.normal_(generator=g)
        m.lora_B.normal_(generator=g)
    rows = {}
    for form in ("raw", "prepared"):
        layers = wrap_multi_lora(TwoLinears(), LoraMapping(), pages=4, page_size=4, lora_dtype=dtype)
        pool = LoraPool(layers, pages=4, page_size=4, device=torch.device("cpu"))
        host = raw if form == "raw" else pool.prepare(raw)
        if form == "prepared":
            assert all(m.scaling == 1.0 and m.lora_A.dtype == dtype for m in host.modules.values())
        pages = pool.acquire(AdapterRegistry().add("a", host), host)
        rows[form] = {n: (layer.lora_A[list(pages)], layer.lora_B[list(pages)]) for n, layer in layers.items()}
    for n in rows["raw"]:
        for got, want in zip(rows["prepared"][n], rows["raw"][n]):
            assert torch.equal(got, want)
