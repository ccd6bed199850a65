"""Reading, validating and writing the PEFT format."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from adapters.peft_io import AdapterError, check_fits, load_peft_adapter, save_peft_adapter
from adapters.targets import adaptable_layers, layer_shape
from tests.tiny import make_peft_adapter


@pytest.fixture
def good(llama_dir, tmp_path):
    return make_peft_adapter(llama_dir, tmp_path / "good", "llama", r=4)


def shapes_of(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return {n: layer_shape(m) for n, m in adaptable_layers(model).items()}


def edit_config(d, **changes):
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def problems_of(d, shapes=None, max_rank=64) -> list[str]:
    with pytest.raises(AdapterError) as e:
        w = load_peft_adapter(d)
        check_fits(w, shapes, max_rank)
    return e.value.problems


def test_reads_real_peft_adapter(good, llama_dir):
    w = load_peft_adapter(good)
    assert w.rank == 4 and w.alpha == 8
    assert set(w.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    check_fits(w, shapes_of(llama_dir), 64)
    assert all(m.scaling == 2.0 for m in w.modules.values())


def test_refuses_pickle(good):
    (good / "adapter_model.safetensors").rename(good / "adapter_model.bin")
    assert "pickle" in problems_of(good)[0]


def test_refuses_corrupt_safetensors(good):
    data = (good / "adapter_model.safetensors").read_bytes()
    (good / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    assert "not a valid safetensors" in problems_of(good)[0]


def test_reports_every_config_problem_at_once(good):
    edit_config(good, use_dora=True, modules_to_save=["lm_head"], bias="all")
    problems = problems_of(good)
    assert any("DoRA" in p for p in problems)
    assert any("modules_to_save" in p for p in problems)
    assert any("bias" in p for p in problems)


def test_refuses_embedding_lora_nan_and_orphans(good):
    path = good / "adapter_model.safetensors"
    t = load_file(path)
    t["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 320)
    key = next(k for k in t if k.endswith("q_proj.lora_A.weight"))
    t[key] = t[key].clone()
    t[key][0, 0] = float("nan")
    del t[next(k for k in t if k.endswith("v_proj.lora_B.weight"))]
    save_file(t, str(path))
    problems = problems_of(good)
    assert any("embedding LoRA" in p for p in problems)
    assert any("NaN" in p for p in problems)
    assert any("without its lora_B" in p for p in problems)


def test_refuses_shapes_rank_and_modules_of_another_model(tiny_models, tmp_path, llama_dir):
    other = make_peft_adapter(tiny_models["gpt2"], tmp_path / "gpt2", "gpt2", r=8)
    problems = problems_of(other, shapes_of(llama_dir))
    assert all("not an adaptable linear layer" in p for p in problems)
    big = make_peft_adapter(llama_dir, tmp_path / "big", "llama", r=32)
    problems = problems_of(big, shapes_of(llama_dir), max_rank=16)
    assert any("rank 32 is over the limit of 16" in p for p in problems)


def test_what_we_write_loads_in_peft_with_identical_logits(good, llama_dir, tmp_path):
    w = load_peft_adapter(good)
    save_peft_adapter(w, tmp_path / "ours", base_model=str(llama_dir))
    ids = torch.randint(0, 300, (1, 6))
    with torch.no_grad():
        a = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), good)(ids).logits
        b = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), tmp_path / "ours")(ids).logits
    torch.testing.assert_close(a, b)
