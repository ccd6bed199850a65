"""What makes the decode step safe for CUDA graphs, proven on the CPU: one read of the device per step (the sampled
tokens), buffers that keep their addresses, and a forward that runs on the `meta` device (where any tensor made on
the host, or any read of the device, fails)."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from adapters.peft_io import LoraModule, LoraWeights
from adapters.tiers.registry import AdapterRegistry
from server.engine.config import EngineConfig
from server.engine.model import BaseModel
from server.engine.runner import ModelRunner
from tests.server.engine.support import LONG, PROMPTS

HOST_READS = {"tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero"}


class HostReads(TorchFunctionMode):
    """Counts the calls that copy a tensor's values to the host (each a device→host sync on a GPU)."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def running_batch(h, **extra):
    """The engine stopped, stepped by hand: four sequences (adapters, a composition, seeded top-p sampling,
    logprobs) admitted and prefilled."""
    h.engine.stop()
    eng = h.engine
    reqs = [h.request(PROMPTS[0], [("a", 1.0)], max_tokens=30, ignore_eos=True),
            h.request(PROMPTS[1], [("a", 0.5), ("b", 0.5)], max_tokens=30, ignore_eos=True, logprobs=3),
            h.request(PROMPTS[2], [], max_tokens=30, ignore_eos=True, temperature=0.8, top_p=0.9, seed=3),
            h.request(LONG, [("b", 1.0)], max_tokens=30, ignore_eos=True, **extra)]  # fmt: skip
    for r in reqs:
        r.emit = lambda out: None
        eng.scheduler.add(eng._sequence(r))
    with torch.inference_mode():
        eng._step()
    return eng


def test_a_decode_step_reads_the_device_once(make_harness, llama_dir, engine_adapters):
    h = make_harness(llama_dir, engine_adapters, "eager", auto_merge=False)
    eng = running_batch(h)
    with torch.inference_mode():
        for _ in range(4):
            with HostReads() as reads:
                eng._decode()
            assert len(reads.calls) == 1, reads.calls  # the packed copy of the sampled tokens (and logprobs)
    assert eng.num_running == 4


def test_decode_buffers_keep_their_addresses(make_harness, llama_dir, engine_adapters):
    h = make_harness(llama_dir, engine_adapters, "eager", auto_merge=True, merge_threshold=0.5, merge_window=2)
    runner = h.engine.runner
    eng = running_batch(h)

    def addresses() -> dict:
        ptrs = runner.buffers.data_ptrs()
        for name, layer in runner.layers.items():
            ptrs[f"{name}.A"], ptrs[f"{name}.B"] = layer.lora_A.data_ptr(), layer.lora_B.data_ptr()
            ptrs[f"{name}.W"] = layer.base_layer.weight.data_ptr()
        for i, m in enumerate(runner.cache.modules):
            ptrs[f"k{i}"], ptrs[f"v{i}"] = m.loraplex_k.data_ptr(), m.loraplex_v.data_ptr()
        return ptrs

    before = addresses()
    with torch.inference_mode():
        for _ in range(3):
            eng._decode()
        adapter = h.registry.get("a")  # a merge and an unmerge write the base weights in place
        pages = eng.pool.acquire(adapter, adapter.weights)
        eng.merger.merge(adapter, pages, adapter.weights)
        assert addresses() == before
        eng._decode()  # the batch's mixed traffic unmerges at once
        assert (eng.merger.merges, eng.merger.unmerges) == (1, 1)
        eng.pool.release(adapter)
        for _ in range(3):
            eng._decode()
    assert addresses() == before


@pytest.mark.parametrize("segments", ["decode", "prefill", "chunk"])
def test_the_runner_forward_runs_on_the_meta_device(llama_dir, segments):
    config = AutoConfig.from_pretrained(llama_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config).eval()
    tok = AutoTokenizer.from_pretrained(llama_dir)
    base = BaseModel(model=model, tokenizer=tok, model_id="meta", max_model_len=64)
    cfg = EngineConfig(max_num_seqs=4, max_model_len=64, lora_pages=4, lora_page_size=8, lora_backend="eager",
                       max_lora_rank=8, prefill_chunk=8)  # fmt: skip
    runner = ModelRunner(base, cfg)
    with torch.inference_mode():
        if segments == "prefill":
            logits = runner.prefill(0, [[1, 2, 3], [4, 5]], [[], []])
        elif segments == "chunk":
            logits = runner.prefill(2, [[1, 2, 3, 4], [5, 6]], [[], []], [8, 3])  # after cached tokens
        else:
            shapes = runner.layer_shapes()
            weights = LoraWeights({"r": 8}, {n: LoraModule(torch.randn(8, i), torch.randn(o, 8), 1.0)
                                             for n, (i, o) in shapes.items()})  # fmt: skip
            adapter = AdapterRegistry().add("x", weights)
            pages = runner.pool.acquire(adapter, weights)
            runner.pad_batches = True  # the padded batch of captured graphs: 3 rows padded to 4
            logits = runner.decode([1, 2, 3], [5, 9, 17], [[(adapter, pages, 1.0)], [], [(adapter, pages, 0.5)]])
    assert logits.device.type == "meta" and logits.shape[-1] == config.vocab_size
