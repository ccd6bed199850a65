"""The model runner alone: its prefill, decode and chunk logits are HF's own, with and without an adapter."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from adapters.peft_io import load_peft_adapter
from adapters.tiers.registry import AdapterRegistry
from server.engine.config import EngineConfig
from server.engine.model import load_base_model
from server.engine.runner import ModelRunner
from tests.server.engine.support import PROMPTS


@pytest.fixture(scope="module")
def runner(llama_dir):
    base = load_base_model(str(llama_dir), cache_dir=llama_dir)
    config = EngineConfig(max_num_seqs=4, max_model_len=64, lora_pages=8, lora_page_size=8, lora_backend="eager",
                          auto_merge=False, max_lora_rank=16)  # fmt: skip
    return ModelRunner(base, config), base.tokenizer


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]  # (t, vocab)


def test_prefill_then_decode_steps_give_hf_logits(runner, llama_dir):
    runner, tok = runner
    hf = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:3]]
    with torch.inference_mode():
        logits = runner.prefill(0, prompts, [[]] * 3)  # right-padded to the longest
        for i, p in enumerate(prompts):
            torch.testing.assert_close(logits[i], hf_logits(hf, p)[-1], rtol=1e-4, atol=1e-4)
        # two decode steps of all three rows at their own positions
        seqs = [list(p) for p in prompts]
        for _ in range(2):
            nxt = logits.argmax(-1).tolist()
            for s, t in zip(seqs, nxt):
                s.append(t)
            logits = runner.decode(nxt, [len(s) - 1 for s in seqs], [[]] * 3)
            for i, s in enumerate(seqs):
                torch.testing.assert_close(logits[i], hf_logits(hf, s)[-1], rtol=1e-4, atol=1e-4)


def test_chunks_after_a_cached_prefix_and_an_adapter_give_peft_logits(runner, llama_dir, engine_adapters):
    runner, tok = runner
    adapter = AdapterRegistry().add("a", load_peft_adapter(engine_adapters["a"]))
    pages = runner.pool.acquire(adapter, adapter.weights)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), engine_adapters["a"]).eval()
    ids = tok(" ".join(PROMPTS))["input_ids"]
    rows = [(adapter, pages, 1.0)]
    with torch.inference_mode():
        runner.prefill(3, [ids[:8]], [rows], [0])  # the first chunk is a plain prefill of row 3
        runner.prefill(3, [ids[8:16]], [rows], [8])
        last = runner.prefill(3, [ids[16:]], [rows], [16])
    torch.testing.assert_close(last[0], hf_logits(peft, ids)[-1], rtol=1e-4, atol=1e-4)
    runner.pool.release(adapter)
