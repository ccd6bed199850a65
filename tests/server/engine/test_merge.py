"""The automatic merger alone: when it merges and unmerges, what every other row applies while merged, and the
exact restore of the base weights."""

from __future__ import annotations

import pytest
import torch

from adapters.peft_io import load_peft_adapter
from adapters.tiers.registry import AdapterRegistry
from server.engine.config import EngineConfig
from server.engine.merge import UNMERGE_MARGIN
from server.engine.model import load_base_model
from server.engine.runner import ModelRunner


@pytest.fixture
def setup(llama_dir, engine_adapters):
    base = load_base_model(str(llama_dir), cache_dir=llama_dir)
    config = EngineConfig(max_num_seqs=4, max_model_len=64, lora_pages=8, lora_page_size=8, lora_backend="eager",
                          merge_threshold=0.75, merge_window=3, max_lora_rank=16)  # fmt: skip
    runner = ModelRunner(base, config)
    reg = AdapterRegistry()
    a, b = (reg.add(n, load_peft_adapter(engine_adapters[n])) for n in ("a", "b"))
    pa, pb = (runner.pool.acquire(x, x.weights) for x in (a, b))
    return runner, reg, (a, pa), (b, pb)


def test_merges_after_a_dominant_window_and_corrects_every_other_row(setup):
    runner, reg, (a, pa), (b, pb) = setup
    m = runner.merger
    weights = {n: layer.base_layer.weight.detach().clone() for n, layer in runner.layers.items()}
    single_a, single_b = (a, pa, a.weights), (b, pb, b.weights)
    m.observe([single_a, single_a, single_a, None])  # 0.75 of the rows, once
    m.observe([single_a, single_a, single_a, single_b])
    assert m.merged is None  # the window is 3 steps
    m.observe([single_a, single_a, single_a, single_a])
    assert m.merged is a and m.merges == 1
    layer = runner.layers["model.layers.0.self_attn.q_proj"]
    rows_a = layer.lora_A[list(pa)].flatten(0, 1)
    rows_b = layer.lora_B[list(pa)].flatten(0, 1)  # Bᵀ, scaled
    want = weights["model.layers.0.self_attn.q_proj"] + rows_b.T @ rows_a
    torch.testing.assert_close(layer.base_layer.weight, want, rtol=1e-5, atol=1e-6)
    # rows on the merged adapter add nothing; every other row takes it back out
    assert m.corrected([(a, pa, 1.0)]) == []
    assert m.corrected([]) == [(pa, -1.0)]
    (p1, w1), (p2, w2) = m.corrected([(b, pb, 1.0)])
    assert (p1, w1, p2, w2) == (pb, 1.0, pa, -1.0)
    assert [w for _, w in m.corrected([(a, pa, 0.5), (b, pb, 0.5)])] == [0.5, -0.5]


def test_mixed_traffic_or_a_retired_adapter_unmerge_exactly(setup):
    runner, reg, (a, pa), (b, pb) = setup
    m = runner.merger
    original = {n: layer.base_layer.weight.detach().clone() for n, layer in runner.layers.items()}
    single_a, single_b = (a, pa, a.weights), (b, pb, b.weights)
    for _ in range(3):
        m.observe([single_a] * 4)
    assert m.merged is a
    assert 0.6 >= 0.75 - UNMERGE_MARGIN  # hysteresis: 0.6 of the rows keeps it merged
    m.observe([single_a] * 3 + [single_b] * 2)
    assert m.merged is a
    m.observe([single_b] * 5)  # the window's mean share falls to 0.3
    assert m.merged is None and m.unmerges == 1
    assert all(torch.equal(layer.base_layer.weight, original[n]) for n, layer in runner.layers.items())
    for _ in range(3):
        m.observe([single_b] * 4)
    assert m.merged is b
    reg.remove("b")  # deleted while merged: unmerged at the next step, whatever the traffic
    m.observe([single_b] * 4)
    assert m.merged is None
    assert all(torch.equal(layer.base_layer.weight, original[n]) for n, layer in runner.layers.items())


def test_a_merge_that_would_make_a_weight_non_finite_is_refused_and_restores_every_weight(setup):
    runner, reg, (a, pa), _ = setup
    m = runner.merger
    original = {n: layer.base_layer.weight.detach().clone() for n, layer in runner.layers.items()}
    w = a.weights
    huge = type(w)(config=w.config, modules={n: type(lm)(lm.lora_A * 1e20, lm.lora_B * 1e20, lm.scaling)
                                             for n, lm in w.modules.items()})  # finite, but B·A overflows
    c = reg.add("c", huge)
    pc = runner.pool.acquire(c, huge)
    for _ in range(3):
        m.observe([(c, pc, huge)] * 4)
    assert m.merged is None and m.merges == 0 and c.key in m.refused
    assert all(torch.equal(layer.base_layer.weight, original[n]) for n, layer in runner.layers.items())
    for _ in range(3):  # never tried again; another adapter still merges
        m.observe([(a, pa, a.weights)] * 4)
    assert m.merged is a
