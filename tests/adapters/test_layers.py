"""The multi-LoRA layers against the real `peft` library: same adapters, same logits."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from adapters.layers import LoraMapping, wrap_multi_lora
from adapters.peft_io import check_fits, load_peft_adapter
from adapters.targets import layer_shape
from adapters.tiers.pool import LoraPool
from adapters.tiers.registry import AdapterRegistry
from tests.tiny import make_peft_adapter

PATTERNS = {
    "llama": ({"q_proj": 6}, {"down_proj": 20}),
    "qwen2": ({"q_proj": 6}, {"down_proj": 20}),
    "gpt2": ({"c_attn": 6}, {"c_fc": 20}),
}


def load_into_pool(model_dir, adapter_dirs, pages=10, page_size=8, dtype=torch.float32):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    batch = LoraMapping()
    layers = wrap_multi_lora(model, batch, pages, page_size)
    shapes = {n: layer_shape(m.base_layer) for n, m in layers.items()}
    pool = LoraPool(layers, pages, page_size, torch.device("cpu"))
    registry = AdapterRegistry()
    adapters = []
    for i, d in enumerate(adapter_dirs):
        w = load_peft_adapter(d)
        check_fits(w, shapes, 64)
        adapters.append(registry.add(f"a{i}", w))
    pages_of = [pool.acquire(a, a.weights) for a in adapters]
    return model, batch, adapters, pages_of


def set_rows(batch, adapters, pages_of, row_adapter: list[int | None], tokens: int, page_size=8, dtype=torch.float32):
    k = max(len(p) for p in pages_of)
    idx = torch.zeros(len(row_adapter), k, dtype=torch.long)
    w = torch.zeros(len(row_adapter), k, page_size, dtype=dtype)
    for i, a in enumerate(row_adapter):
        if a is not None:
            idx[i, : len(pages_of[a])] = torch.tensor(pages_of[a])
            w[i, : len(pages_of[a])] = 1.0
    batch.set(idx, w, frozenset(a.key for a in adapters), "segmented" if tokens > 1 else "gathered")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_mixed_batch_matches_peft(tiny_models, tmp_path, arch, dtype):
    d = tiny_models[arch]
    rank_pattern, alpha_pattern = PATTERNS[arch]
    ad0 = make_peft_adapter(d, tmp_path / "a0", arch, r=4, alpha=8, seed=1)
    ad1 = make_peft_adapter(d, tmp_path / "a1", arch, r=12, alpha=6, seed=2, use_rslora=True,
                            rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    model, batch, adapters, pages_of = load_into_pool(d, [ad0, ad1], dtype=dtype)
    torch.manual_seed(0)
    ids = torch.randint(0, 300, (3, 7))
    set_rows(batch, adapters, pages_of, [0, None, 1], tokens=7, dtype=dtype)
    with torch.no_grad():
        ours = model(ids).logits.float()

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval(), ad0,
                                           adapter_name="a0")  # fmt: skip
    peft_model.load_adapter(ad1, adapter_name="a1")
    with torch.no_grad():
        peft_model.set_adapter("a0")
        ref0 = peft_model(ids[0:1]).logits
        peft_model.set_adapter("a1")
        ref2 = peft_model(ids[2:3]).logits
        with peft_model.disable_adapter():
            ref1 = peft_model(ids[1:2]).logits
    # bf16: both compute in bf16 (PEFT keeps its adapters in fp32), so they agree to bf16's rounding
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0, atol=0.15)
    torch.testing.assert_close(ours[0], ref0[0].float(), **tol)
    torch.testing.assert_close(ours[1], ref1[0].float(), **tol)
    torch.testing.assert_close(ours[2], ref2[0].float(), **tol)
    assert (ref0 - ref1).abs().max() > 1e-2  # the adapters really change the output


def test_no_adapter_in_batch_is_the_base(llama_dir, tmp_path):
    ad = make_peft_adapter(llama_dir, tmp_path / "a", "llama", r=4)
    model, batch, adapters, pages_of = load_into_pool(llama_dir, [ad])
    plain = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    ids = torch.randint(0, 300, (2, 5))
    batch.clear()
    with torch.no_grad():
        # the same values up to fp32 rounding: on the CPU the wrapped layers run oneDNN's kernels, not MKL's
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, atol=1e-5, rtol=1e-5)
