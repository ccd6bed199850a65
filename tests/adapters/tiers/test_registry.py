"""The host tier: names and versions, retiring, and the LRU byte budget with reloads from disk."""

from __future__ import annotations

import pytest
import torch

from adapters.peft_io import LoraModule, LoraWeights
from adapters.tiers.registry import AdapterExists, AdapterNotFound, AdapterRegistry


def weights(rank: int = 4, value: float = 1.0) -> LoraWeights:
    module = LoraModule(torch.full((rank, 8), value), torch.full((8, rank), value), 1.0)
    return LoraWeights(config={"r": rank, "lora_alpha": 8}, modules={"layers.0.q_proj": module})


def test_versions_overwrite_and_remove_retire_the_old_version():
    reg = AdapterRegistry()
    v1 = reg.add("a", weights())
    with pytest.raises(AdapterExists):
        reg.add("a", weights())
    v2 = reg.add("a", weights(value=2.0), overwrite=True)
    assert (v1.version, v2.version, v1.retired, v2.retired) == (1, 2, True, False)
    assert v1.key != v2.key and reg.get("a") is v2 and reg.next_version("a") == 3
    assert reg.remove("a") is v2 and v2.retired
    with pytest.raises(AdapterNotFound):
        reg.get("a")
    assert len(reg) == 0 and reg.resident_bytes == 0


def test_host_budget_evicts_least_recently_used_and_reloads_from_disk(tmp_path):
    loads = []

    def loader(path):
        loads.append(path.name)
        return weights(value=float(path.name[-1]))

    one = weights().nbytes
    reg = AdapterRegistry(host_bytes=2 * one, loader=loader)
    a = reg.add("a", weights(value=1.0), path=tmp_path / "a1")
    b = reg.add("b", weights(value=2.0), path=tmp_path / "b2")
    reg.weights_of(a)  # a is now the most recently used
    c = reg.add("c", weights(value=3.0), path=tmp_path / "c3")
    assert b.weights is None and a.weights is not None and c.weights is not None  # b was least recently used
    assert reg.resident_bytes == 2 * one and reg.host_evictions == 1
    again = reg.weights_of(b)  # read from disk, then held again (evicting the LRU one, a)
    assert loads == ["b2"] and torch.equal(again.modules["layers.0.q_proj"].lora_A, torch.full((4, 8), 2.0))
    assert a.weights is None and reg.host_loads == 1
