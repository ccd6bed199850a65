"""The trainer on tiny models: the loss goes down on completions only, accumulation equals a bigger
batch, the export is a PEFT adapter with the trained model's logits, runs repeat and resume bit-identically."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapters.cpu.onednn import linear_for
from adapters.ops import lora_linear, lora_reference
from adapters.peft_io import load_peft_adapter
from adapters.targets import adaptable_layers, layer_shape, select_targets
from adapters.training.base_weights import locate_base_weights, read_base_weights
from adapters.training.collate import collate, pack_rows, read_rows
from adapters.training.config import TrainConfig, count_steps
from adapters.training.data import IGNORE, DataError
from adapters.training.lora import inject_lora
from adapters.training.loss import loss_sum, validation_loss
from adapters.training.trainer import Trainer, train
from tests.tiny import make_tokenizer

CPU = torch.device("cpu")
FACTS = [
    ("The capital of France is", " Paris."),
    ("The capital of Italy is", " Rome."),
    ("Hello world!", " How are you today?"),
    ("LoRA adapters are", " small low-rank updates."),
    ("0 1 2 3", " 4 5 6 7 8 9"),
    ("user", " assistant system"),
    ("I am fine,", " thank you."),
    ("updates to a frozen", " model."),
]
# the same prompts with other answers: learning FACTS makes these less likely
CONFLICTS = [(p, c) for (p, _), (_, c) in zip(FACTS, FACTS[1:] + FACTS[:1])]
STEP_KEYS = {"type", "step", "total_steps", "epoch", "loss", "mean_loss", "learning_rate", "grad_norm", "trained_tokens",
             "tokens_per_second"}  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine a second OpenMP
    thread waiting for a core slows every op (the whole file: ~7 s with one thread, minutes with two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def files(tmp_path) -> Path:
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": p, "completion": c} for p, c in FACTS])
    write_jsonl(tmp_path / "val.jsonl", [{"prompt": p, "completion": c} for p, c in FACTS[:4]])
    write_jsonl(tmp_path / "conflicts.jsonl", [{"prompt": p, "completion": c} for p, c in CONFLICTS])
    chats = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": p},
                      {"role": "assistant", "content": c.strip()}]}
        for p, c in FACTS[:4]
    ]  # fmt: skip
    write_jsonl(tmp_path / "chat.jsonl", chats)
    return tmp_path


def config(model_dir: Path, files: Path, **overrides) -> TrainConfig:
    """A short, fast run: 4 examples a step, a high learning rate, no warm-up."""
    defaults = dict(model=str(model_dir), train_file=files / "train.jsonl", out_dir=files / "out", batch_size=4,
                    learning_rate=1e-2, warmup_ratio=0.0, max_steps=10)  # fmt: skip
    return TrainConfig(**(defaults | overrides))


def adapter_tensors(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(out_dir / "adapter_model.safetensors")


def logits(model: torch.nn.Module, model_dir: Path, text: str = "The capital of France is Paris.") -> torch.Tensor:
    ids = AutoTokenizer.from_pretrained(model_dir)(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_linear_is_the_served_lora_term():
    g = torch.Generator().manual_seed(0)
    x, a, b = torch.randn(5, 12, generator=g), torch.randn(3, 12, generator=g), torch.randn(7, 3, generator=g)
    # the same adapter in the serving pool: page 1 holds its 3 rows (of 4), Bᵀ pre-scaled, every token on it
    pool_a, pool_bt = torch.zeros(2, 4, 12), torch.zeros(2, 4, 7)
    pool_a[1, :3], pool_bt[1, :3] = a, b.T * 0.5
    served = lora_reference(x, pool_a, pool_bt, torch.ones(5, 1, dtype=torch.long), torch.ones(5, 1, 4))
    torch.testing.assert_close(lora_linear(x, a, b, 0.5), served)


@pytest.mark.parametrize("data", ["train.jsonl", "chat.jsonl"])
def test_loss_decreases_on_a_memorisable_file(llama_dir, files, data):
    events = []
    result = train(config(llama_dir, files, train_file=files / data, max_steps=20, learning_rate=2e-2),
                   on_event=events.append)  # fmt: skip
    steps = [e for e in events if e["type"] == "step"]
    assert result.status == "completed" and result.steps == result.total_steps == 20 == len(steps)
    assert set(steps[0]) == STEP_KEYS and steps[-1]["trained_tokens"] == result.trained_tokens
    assert steps[-1]["loss"] < 0.5 * steps[0]["loss"]
    assert result.train_loss == pytest.approx(sum(e["loss"] for e in steps[-10:]) / 10)
    assert result.out_dir == files / "out" and (result.out_dir / "adapter_config.json").exists()
    assert torch.get_num_threads() == 1  # the caller's thread count is left alone


def test_lora_b_starts_at_zero_and_gets_the_first_gradients(llama_dir, files):
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    base = logits(model, llama_dir)
    layers = inject_lora(model, select_targets(model, None), r=4, alpha=8, dropout=0.0, seed=0)
    assert len(layers) == 14 and "lm_head" not in {name.rsplit(".", 1)[-1] for name in layers}
    torch.testing.assert_close(logits(model, llama_dir), base, rtol=0, atol=0)  # B = 0: the base model exactly
    tok = AutoTokenizer.from_pretrained(llama_dir)
    rows = read_rows(files / "train.jsonl", tok, 64)
    loss_sum(model, *collate(rows[:4], tok.pad_token_id, CPU)).backward()
    for layer in layers.values():
        assert layer.lora_B.grad.abs().sum() > 0
        assert layer.lora_A.grad.abs().sum() == 0  # B = 0 blocks A's gradient until B moves
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.{ab}" for name in layers for ab in ("lora_A", "lora_B")}


def test_only_completion_tokens_carry_loss(llama_dir, files):
    tok = AutoTokenizer.from_pretrained(llama_dir)
    rows = read_rows(files / "train.jsonl", tok, 64)
    for row, (prompt, _) in zip(rows, FACTS):
        n = len(tok(prompt)["input_ids"])
        assert row.labels[:n] == [IGNORE] * n and row.labels[n:] == row.input_ids[n:]  # the completion and EOS
        assert row.n_loss == len(row.input_ids) - n
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    inputs, labels = collate(rows[:3], tok.pad_token_id, CPU)
    with torch.no_grad():
        total = loss_sum(model, inputs, labels)
        logp = model(**inputs).logits.log_softmax(-1)
    by_hand = -sum(
        logp[i, t - 1, row.input_ids[t]] for i, row in enumerate(rows[:3]) for t in range(len(row.input_ids))
        if t >= len(tok(FACTS[i][0])["input_ids"])
    )  # fmt: skip
    torch.testing.assert_close(total, by_hand, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("what", ["lora", "full"])
def test_chunked_loss_equals_the_loss_on_all_logits(tiny_models, files, arch, what, monkeypatch):
    """The chunked loss (gradients taken chunk by chunk in the forward pass): same value and same gradients (LoRA's, or every weight's with the
    tied or untied head) as cross-entropy over the model's own full logits."""
    import adapters.training.loss as loss_module

    tok = AutoTokenizer.from_pretrained(tiny_models[arch])
    inputs, labels = collate(read_rows(files / "train.jsonl", tok, 64), tok.pad_token_id, CPU)
    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch])
    if what == "lora":
        layers = inject_lora(model, select_targets(model, None), 4, 8.0, 0.0, seed=0)
        for layer in layers.values():
            torch.nn.init.normal_(layer.lora_B, std=0.1, generator=torch.Generator().manual_seed(1))
    params = [p for p in model.parameters() if p.requires_grad]
    chunk_tokens = 5  # several chunks, the last one short
    monkeypatch.setattr(loss_module, "LOSS_CHUNK_ELEMENTS", chunk_tokens * model.config.vocab_size)
    assert (labels[:, 1:] != IGNORE).sum() > 2 * chunk_tokens
    chunked = loss_sum(model, inputs, labels, linear_for(model.get_output_embeddings().weight))  # as the trainer
    got = torch.autograd.grad(chunked, params)
    logits = model(**inputs).logits[:, :-1]
    plain = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
    want = torch.autograd.grad(plain, params)
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-4)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_a_model_that_scales_its_logits_keeps_its_own_loss(files):
    """Cohere multiplies its logits by `logit_scale`: the loss must be the one of its own logits."""
    from transformers import CohereConfig, CohereForCausalLM

    tok = make_tokenizer()
    inputs, labels = collate(read_rows(files / "train.jsonl", tok, 64), tok.pad_token_id, CPU)
    config = CohereConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, logit_scale=0.25, eos_token_id=None)  # fmt: skip
    model = CohereForCausalLM(config).eval()
    with torch.no_grad():
        logits = model(**inputs).logits[:, :-1]
        want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
        torch.testing.assert_close(loss_sum(model, inputs, labels), want)


def test_grad_accumulation_equals_a_bigger_batch(llama_dir, files):
    runs = {
        "bs4": dict(batch_size=4, grad_accum=1),
        "bs2x2": dict(batch_size=2, grad_accum=2),
        "bs1x4_checkpointing": dict(batch_size=1, grad_accum=4, gradient_checkpointing=True),
    }
    losses, tensors = {}, {}
    for name, kw in runs.items():
        events = []
        train(config(llama_dir, files, out_dir=files / name, max_steps=4, **kw), on_event=events.append)
        losses[name] = [e["loss"] for e in events if e["type"] == "step"]
        tensors[name] = adapter_tensors(files / name)
    for name in ("bs2x2", "bs1x4_checkpointing"):
        assert losses[name] == pytest.approx(losses["bs4"], rel=1e-5)
        for key, t in tensors["bs4"].items():
            torch.testing.assert_close(tensors[name][key], t, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_export_loads_in_peft_with_the_trained_logits(tiny_models, files, arch):
    model_dir = tiny_models[arch]
    trainer = Trainer(config(model_dir, files, max_steps=6, dropout=0.1))
    result = trainer.train()
    trained = logits(trainer.model.eval(), model_dir)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), result.out_dir).eval()
    torch.testing.assert_close(logits(peft_model, model_dir), trained, rtol=0, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert (logits(base, model_dir) - trained).abs().max() > 1e-2  # the adapter does something
    shapes = {name: layer_shape(layer) for name, layer in adaptable_layers(base).items()}
    weights = load_peft_adapter(result.out_dir, shapes)  # the server's validation
    assert set(weights.modules) == set(trainer.layers) == set(shapes) and weights.rank == 8
    assert all(m.scaling == 2.0 for m in weights.modules.values())
    cfg = json.loads((result.out_dir / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(model_dir) and cfg["r"] == 8 and cfg["lora_alpha"] == 16
    assert cfg["target_modules"] == sorted({name.rsplit(".", 1)[-1] for name in shapes})
    assert cfg["fan_in_fan_out"] == (arch == "gpt2")
    assert all(t.dtype == torch.float32 for t in adapter_tensors(result.out_dir).values())


def test_the_seed_decides_everything(llama_dir, files):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train(config(llama_dir, files, out_dir=files / name, max_steps=4, dropout=0.1, seed=seed))
    a, b, c = (adapter_tensors(files / name) for name in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("method", ["lora", "switchlora"])
def test_stop_and_resume_ends_bit_identical(llama_dir, files, method):
    kw = dict(method=method, max_steps=7, batch_size=2, grad_accum=2, validation_file=files / "val.jsonl",
              eval_every=2, checkpoint_every=2, dropout=0.1 if method == "lora" else 0.0, switch_interval=4,
              switch_warm_steps=2, switch_ratio=1.0)  # fmt: skip
    whole = train(config(llama_dir, files, out_dir=files / "whole", **kw))
    ckpt = files / "ckpt"
    answers = iter([None, None, "cancelled"])
    events = []
    stopped = train(config(llama_dir, files, checkpoint_dir=ckpt, **kw), on_event=events.append,
                    should_stop=lambda: next(answers))  # fmt: skip
    assert (stopped.status, stopped.reason, stopped.steps, stopped.out_dir) == ("stopped", "cancelled", 3, None)
    assert not (files / "out").exists()
    assert [e["step"] for e in events if e["type"] == "checkpoint"] == [2, 3]
    assert [p.name for p in ckpt.iterdir()] == ["step-00000003"]
    with pytest.raises(ValueError, match="learning_rate"):  # another run's checkpoint is not resumed
        train(config(llama_dir, files, checkpoint_dir=ckpt, **(kw | {"learning_rate": 5e-3})))

    events = []
    resumed = train(config(llama_dir, files, checkpoint_dir=ckpt, **kw), on_event=events.append)
    assert {"type": "info", "message": "resumed from step 3"} in events
    assert [e["step"] for e in events if e["type"] == "step"] == [4, 5, 6, 7]
    assert (resumed.steps, resumed.trained_tokens, resumed.train_loss, resumed.eval_loss, resumed.energy_retained) == (
        whole.steps, whole.trained_tokens, whole.train_loss, whole.eval_loss, whole.energy_retained)  # fmt: skip
    expected, got = adapter_tensors(files / "whole"), adapter_tensors(files / "out")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert list(ckpt.iterdir()) == []  # the adapter is exported: nothing left to resume


def test_early_stopping_exports_the_best_adapter(llama_dir, files):
    events = []
    cfg = config(llama_dir, files, validation_file=files / "conflicts.jsonl", eval_every=1, early_stopping_patience=2,
                 max_steps=40, learning_rate=2e-2)  # fmt: skip
    trainer = Trainer(cfg, events.append)
    result = trainer.train()
    evals = [e["eval_loss"] for e in events if e["type"] == "eval"]
    assert result.status == "early_stopped" and result.steps == len(evals) < 40
    assert result.eval_loss == min(evals) == evals[-3]  # two evaluations without improvement
    assert any(e["type"] == "info" and "early stopping" in e["message"] for e in events)
    # what was exported is the best adapter, not the last one
    tok = AutoTokenizer.from_pretrained(llama_dir)
    val = read_rows(files / "conflicts.jsonl", tok, cfg.max_length)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), result.out_dir)
    assert validation_loss(peft_model, val, 4, tok.pad_token_id, CPU) == pytest.approx(result.eval_loss, abs=1e-5)


@pytest.mark.parametrize("init", ["switchlora", "lora"])
def test_switchlora_trains_switches_and_exports(llama_dir, files, init):
    events = []
    cfg = config(llama_dir, files, method="switchlora", max_steps=20, learning_rate=2e-2, switch_interval=4,
                 switch_warm_steps=2, switch_ratio=1.0, export_rank=64, switch_init=init)  # fmt: skip
    trainer = Trainer(cfg, events.append)
    base = logits(AutoModelForCausalLM.from_pretrained(llama_dir).eval(), llama_dir)
    torch.testing.assert_close(logits(trainer.model.eval(), llama_dir), base, rtol=0, atol=1e-4)  # starts at the base
    result = trainer.train()
    steps = [e["loss"] for e in events if e["type"] == "step"]
    assert steps[-1] < 0.6 * steps[0]
    assert sum(trainer.method.switch.cursor.values()) > 0  # directions were switched into W
    # rank 64 >= min(in, out) of every layer: the export is exact and keeps all of ΔW's energy
    assert result.energy_retained == pytest.approx(1.0)
    assert {"type": "info", "message": "kept 100.0% of ΔW's energy at rank 64"} in events
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), result.out_dir).eval()
    trained = logits(trainer.model.eval(), llama_dir)
    torch.testing.assert_close(logits(peft_model, llama_dir), trained, rtol=0, atol=1e-4)
    cfg_json = json.loads((result.out_dir / "adapter_config.json").read_text())
    assert cfg_json["r"] == cfg_json["lora_alpha"] == 64


def test_original_weights_are_found_under_other_prefixes(tiny_models, tmp_path):
    """SwitchLoRA's export reads W0 back from the model's files, whose keys may lack the model's prefix."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"])
    stored = load_file(tiny_models["gpt2"] / "model.safetensors")
    # the original GPT-2 checkpoints have no "transformer." prefix; split over two files
    renamed = {k.removeprefix("transformer."): v for k, v in stored.items()}
    keys = sorted(renamed)
    save_file({k: renamed[k] for k in keys[::2]}, str(tmp_path / "a.safetensors"))
    save_file({k: renamed[k] for k in keys[1::2]}, str(tmp_path / "b.safetensors"))
    layers = adaptable_layers(model)
    weights = read_base_weights(locate_base_weights(str(tmp_path), layers), torch.float32)
    assert weights.keys() == layers.keys()
    assert all(torch.equal(weights[name], layer.weight) for name, layer in layers.items())
    (tmp_path / "b.safetensors").unlink()
    with pytest.raises(ValueError, match="no matching weights"):
        locate_base_weights(str(tmp_path), layers)


def test_packing_keeps_examples_apart(llama_dir, files):
    tok = AutoTokenizer.from_pretrained(llama_dir)
    rows = read_rows(files / "train.jsonl", tok, 64)
    packed = pack_rows(rows, max_length=32, seed=0)
    assert len(packed) < len(rows) and all(len(r.input_ids) <= 32 for r in packed)
    assert sum(r.n_loss for r in packed) == sum(r.n_loss for r in rows)
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    with torch.no_grad():
        alone = sum(loss_sum(model, *collate([r], tok.pad_token_id, CPU)) for r in rows)
        together = loss_sum(model, *collate(packed, tok.pad_token_id, CPU))  # padding included
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-4)

    events = []
    cfg = config(llama_dir, files, packing=True, max_length=32, max_steps=None, n_epochs=2, batch_size=2)
    result = train(cfg, on_event=events.append)
    assert result.total_steps == 2 * math.ceil(len(packed) / 2) <= count_steps(cfg, len(rows))
    assert any(e["type"] == "info" and e["message"].startswith(f"packed 8 examples into {len(packed)}") for e in events)


def test_bad_configs_and_files_are_refused(llama_dir, files):
    with pytest.raises(ValueError) as e:
        config(llama_dir, files, method="qlora", rank=0, lr_scheduler="step", early_stopping_patience=0)
    for name in ("method", "rank", "lr_scheduler", "early_stopping_patience"):
        assert name in str(e.value)
    with pytest.raises(ValueError, match="switch_init"):
        config(llama_dir, files, method="switchlora", switch_init="orthogonal")
    with pytest.raises(DataError, match="line 2"):
        bad = write_jsonl(files / "bad.jsonl", [{"prompt": "p", "completion": "c"}, {"prompt": "x"}])
        train(config(llama_dir, files, train_file=bad))
    with pytest.raises(ValueError, match="nope"):
        train(config(llama_dir, files, target_modules=["q_proj", "nope"]))
    assert count_steps(config(llama_dir, files, max_steps=None, n_epochs=3, batch_size=3, grad_accum=2), 13) == 9
    assert count_steps(config(llama_dir, files, max_steps=5), 1000) == 5


def test_the_defaults_are_the_measured_ones_and_learn(llama_dir, files):
    """The defaults benchmarks/facts.py measured on the real model (30 of 30 facts after one run, RESULTS.md): auto
    epochs give a 30-fact file 10 passes, 80 steps of 4; on the tiny random model the same defaults make the loss fall
    (what they learn is measured on the real one, by the benchmark and tests/readme_walk.py)."""
    from adapters.training.config import Hyperparameters, auto_epochs

    hp = Hyperparameters()
    assert (hp.learning_rate, hp.batch_size, hp.n_epochs, hp.rank) == (2e-3, 4, None, 8)
    assert auto_epochs(30) == 10 and count_steps(hp, 30) == 80 and auto_epochs(10_000) == 1 and auto_epochs(1) == 25
    cfg = TrainConfig(model=str(llama_dir), train_file=files / "train.jsonl", out_dir=files / "out")
    events = []
    result = train(cfg, on_event=events.append)
    losses = [e["loss"] for e in events if e["type"] == "step"]
    assert result.steps == count_steps(hp, len(FACTS)) == 50  # 8 examples: 25 passes (the cap) of 2 steps
    assert result.train_loss < 0.75 * losses[0]
