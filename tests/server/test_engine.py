"""The engine: HF parity, batching invariance, continuous batching, aborts, seeds, composition."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from tiny import make_peft_adapter
from transformers import AutoModelForCausalLM

from adapters.dense import onednn_linear
from adapters.peft_io import load_peft_adapter
from adapters.registry import AdapterRegistry
from server.engine import AdapterUse, Engine, EngineConfig, GenerationRequest
from server.model import load_base_model
from server.sampling import SamplingParams

PROMPTS = ["The capital of France", "Hello world! How", "LoRA adapters are", "0 1 2 3", "user assistant"]


class Harness:
    """An engine thread on a tiny model, with a blocking `run` for tests."""

    def __init__(self, model_dir: Path, adapters: dict[str, Path], backend: str, max_num_seqs: int = 8, **config):
        self.base = load_base_model(str(model_dir), cache_dir=model_dir)
        config = dict(max_num_seqs=max_num_seqs, max_model_len=128, lora_pages=16, lora_page_size=8,
                      lora_backend=backend) | config
        self.engine = Engine(self.base, EngineConfig(**config))
        self.registry = AdapterRegistry()
        for name, d in adapters.items():
            self.registry.add(name, load_peft_adapter(d))
        self.engine.warmup()
        self.engine.start()
        self.tok = self.base.tokenizer
        self._n = 0

    def submit(self, prompt: str, adapters=(), max_tokens=10, **params):
        self._n += 1
        done, out = threading.Event(), {"ids": [], "text": "", "reason": None, "error": None}

        def emit(o):
            out["ids"] += o.token_ids
            out["text"] += o.text
            if o.finish_reason:
                out["reason"], out["error"] = o.finish_reason, o.error
                done.set()

        uses = [AdapterUse(self.registry.get(n), w) for n, w in adapters]
        params.setdefault("temperature", 0)
        rid = f"r{self._n}"
        self.engine.submit(GenerationRequest(rid, self.tok(prompt)["input_ids"], SamplingParams(max_tokens=max_tokens, **params), emit, uses))
        return rid, done, out

    def run(self, jobs: list[dict]) -> list[dict]:
        started = [self.submit(**j) for j in jobs]
        for _, done, _ in started:
            assert done.wait(60)
        return [o for _, _, o in started]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, llama_dir):
    root = tmp_path_factory.mktemp("engine-adapters")
    return {
        "a": make_peft_adapter(llama_dir, root / "a", "llama", r=4, alpha=8, seed=11),
        "b": make_peft_adapter(llama_dir, root / "b", "llama", r=12, alpha=12, seed=12, targets=["q_proj", "v_proj", "down_proj"]),
    }


@pytest.fixture(scope="module", params=["eager", "compiled"])
def harness(request, llama_dir, adapters):
    h = Harness(llama_dir, adapters, request.param, max_num_seqs=4, auto_merge=False)
    yield h
    h.engine.stop()


def hf_greedy(model, tok, prompt: str, n: int) -> list[int]:
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_greedy_matches_hf_and_merged_peft(harness, llama_dir, adapters):
    jobs = [dict(prompt=p, adapters=ad, min_tokens=10) for p in PROMPTS[:3] for ad in ([], [("a", 1.0)], [("b", 1.0)])]
    outs = harness.run(jobs)  # 9 requests through 4 rows: queueing and joining mid-run
    plain = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    merged = {n: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), d).merge_and_unload().eval()
              for n, d in adapters.items()}
    for job, out in zip(jobs, outs):
        model = merged[job["adapters"][0][0]] if job["adapters"] else plain
        assert out["ids"] == hf_greedy(model, harness.tok, job["prompt"], 10), job
        assert out["reason"] == "length"


def test_output_does_not_depend_on_batch_mates(harness):
    jobs = [dict(prompt=PROMPTS[i % 5], adapters=[("a", 1.0)] if i % 3 == 0 else [("b", 1.0)] if i % 3 == 1 else [],
                 max_tokens=4 + i, ignore_eos=True) for i in range(10)]
    together = harness.run(jobs)
    for job, out in zip(jobs, together):
        assert harness.run([job])[0]["ids"] == out["ids"]


def test_seeded_sampling_is_reproducible_and_batch_independent(harness):
    job = dict(prompt=PROMPTS[0], adapters=[("a", 1.0)], temperature=1.0, top_p=0.9, seed=5, max_tokens=16, ignore_eos=True)
    alone = harness.run([job])[0]["ids"]
    crowd = harness.run([job, dict(job, seed=6), dict(prompt=PROMPTS[1], max_tokens=8)])
    assert crowd[0]["ids"] == alone
    assert crowd[1]["ids"] != alone


def test_abort_frees_the_row(harness):
    rid, done, out = harness.submit(PROMPTS[0], max_tokens=100, ignore_eos=True)
    harness.engine.abort(rid)
    assert done.wait(30)
    assert out["reason"] == "abort"
    assert harness.run([dict(prompt=PROMPTS[1], max_tokens=3)])[0]["reason"] in ("length", "stop")
    assert harness.engine.num_running == 0


def test_composition_matches_peft_weighted_cat(harness, llama_dir, adapters):
    out = harness.run([dict(prompt=PROMPTS[2], adapters=[("a", 0.7), ("b", -0.4)], min_tokens=10)])[0]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), adapters["a"], adapter_name="a")
    model.load_adapter(adapters["b"], adapter_name="b")
    model.add_weighted_adapter(["a", "b"], [0.7, -0.4], "mix", combination_type="cat")
    model.set_adapter("mix")
    assert out["ids"] == hf_greedy(model.merge_and_unload().eval(), harness.tok, PROMPTS[2], 10)


def test_stop_string_and_max_tokens(harness):
    full = harness.run([dict(prompt=PROMPTS[0], max_tokens=12, ignore_eos=True)])[0]
    text = full["text"].replace("\ufffd", "")
    stop = next((text[i:i + 2] for i in range(2, len(text) - 2) if text[i:i + 2].strip()), None)
    if stop is None:
        pytest.skip("the random model produced no usable text")
    cut = harness.run([dict(prompt=PROMPTS[0], max_tokens=12, ignore_eos=True, stop=[stop])])[0]
    assert cut["reason"] == "stop"
    assert stop not in cut["text"]
    assert full["text"].startswith(cut["text"])


def test_request_too_long_for_pool_is_answered(llama_dir, tmp_path):
    big = make_peft_adapter(llama_dir, tmp_path / "big", "llama", r=40)
    h = Harness(llama_dir, {"big": big}, "eager")
    try:
        h.engine.pool.pages = 3  # pretend a small pool: 40 rows need 5 pages of 8
        h.engine.pool._free = [2, 1]
        out = h.run([dict(prompt=PROMPTS[0], adapters=[("big", 1.0)])])[0]
        assert out["reason"] == "error" and "pages" in out["error"]
    finally:
        h.engine.stop()


def test_gpt2_engine_matches_hf(tiny_models):
    h = Harness(tiny_models["gpt2"], {}, "eager")
    try:
        outs = h.run([dict(prompt=p, min_tokens=10) for p in PROMPTS])  # min_tokens bans EOS, as HF min_new_tokens
        model = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"]).eval()
        for p, out in zip(PROMPTS, outs):
            assert out["ids"] == hf_greedy(model, h.tok, p, 10)
    finally:
        h.engine.stop()


def test_sampling_respects_top_p_and_banned():
    from server.sampling import sample

    logits = torch.tensor([[5.0, 4.9, -10.0, -10.0]] * 64)
    gens = [torch.Generator().manual_seed(i) for i in range(64)]
    tokens = sample(logits, torch.ones(64), torch.full((64,), 0.5), gens)
    assert set(tokens.tolist()) == {0}  # top_p 0.5 keeps only the most likely token
    banned = torch.zeros(64, 4, dtype=torch.bool)
    banned[:, 0] = True
    tokens = sample(logits, torch.zeros(64), torch.ones(64), [None] * 64, banned)
    assert set(tokens.tolist()) == {1}


def test_auto_merge_serves_everyone_correctly_and_restores_weights_exactly(llama_dir, adapters):
    plain = Harness(llama_dir, adapters, "eager", auto_merge=False)
    merging = Harness(llama_dir, adapters, "eager", auto_merge=True, merge_threshold=0.75, merge_window=3)
    try:
        params = dict(merging.base.model.named_parameters())
        original = {n: p.detach().clone() for n, p in params.items()}
        dominant = [dict(prompt=p, adapters=[("a", 1.0)], max_tokens=12, ignore_eos=True) for p in PROMPTS[:4]]
        assert merging.run(dominant) == plain.run(dominant)
        m = merging.engine.merger
        assert m.merges == 1 and m.merged.name == "a"
        assert not all(torch.equal(p, original[n]) for n, p in params.items())  # the base really changed
        # while merged: the merged adapter, another adapter, the base and a composition all still match
        mixed = [dict(prompt=PROMPTS[0], adapters=[("a", 1.0)]), dict(prompt=PROMPTS[1], adapters=[("b", 1.0)]),
                 dict(prompt=PROMPTS[2]), dict(prompt=PROMPTS[3], adapters=[("a", 0.5), ("b", 0.5)])]
        mixed = [dict(j, max_tokens=10, ignore_eos=True) for j in mixed]
        ours, theirs = merging.run(mixed), plain.run(mixed)
        assert [o["ids"] for o in ours] == [o["ids"] for o in theirs]
        # mixed traffic unmerges, restoring the very same weights
        merging.run([dict(prompt=p, max_tokens=12, ignore_eos=True) for p in PROMPTS])
        assert m.unmerges == 1 and m.merged is None
        assert all(torch.equal(p, original[n]) for n, p in params.items())
    finally:
        plain.engine.stop()
        merging.engine.stop()


def test_merge_and_unmerge_compile_nothing_after_warmup(llama_dir, adapters):
    """A merge repacks the merged layers' weights for oneDNN (adapters.dense): the compiled decoder layer takes the
    new packed tensors as it took the first ones, so merging and unmerging recompile nothing."""
    h = Harness(llama_dir, adapters, "compiled", auto_merge=True, merge_threshold=0.75, merge_window=3)
    try:
        compiles = dict(torch._dynamo.utils.counters["frames"])  # every frame dynamo tried to compile
        dominant = [dict(prompt=p, adapters=[("a", 1.0)], max_tokens=12, ignore_eos=True) for p in PROMPTS[:4]]
        for _ in range(2):
            h.run(dominant)  # merges
            h.run([dict(prompt=p, max_tokens=12, ignore_eos=True) for p in PROMPTS])  # mixed again: unmerges
        m = h.engine.merger
        assert m.merges == 2 and m.unmerges == 2
        assert dict(torch._dynamo.utils.counters["frames"]) == compiles
    finally:
        h.engine.stop()


def test_many_merge_cycles_leave_no_drift(llama_dir, adapters):
    h = Harness(llama_dir, adapters, "eager", auto_merge=True)
    try:
        h.engine.stop()  # drive the merger by hand, from this thread
        params = dict(h.base.model.named_parameters())
        original = {n: p.detach().clone() for n, p in params.items()}
        adapter = h.registry.get("b")
        pages = h.engine.pool.acquire(adapter, adapter.weights)
        for _ in range(25):
            h.engine.merger.merge(adapter, pages, adapter.weights)
            h.engine.merger.unmerge()
        assert all(torch.equal(p, original[n]) for n, p in params.items())
        # the layers' packed copies for oneDNN (adapters.dense), where used, were made anew from those weights
        for layer in h.engine.runner.layers.values():
            if layer.packed is not None:
                x = torch.randn(3, layer.in_features)
                want = torch.nn.functional.linear(x, layer.base_layer.weight, layer.base_layer.bias)
                torch.testing.assert_close(onednn_linear(x, layer.packed, layer.base_layer.bias), want)
    finally:
        h.engine.stop()


def test_unpacked_weights_serve_the_same_tokens(llama_dir, adapters):
    """pack_weights=False keeps one copy of the weights: oneDNN reads the plain ones, merged or not, with the outputs
    of HF and of PEFT's merged adapter."""
    h = Harness(llama_dir, adapters, "compiled", auto_merge=True, merge_threshold=0.75, merge_window=3,
                pack_weights=False)  # fmt: skip
    try:
        layers = h.engine.runner.layers.values()
        assert all(layer.packed is None for layer in layers) and h.engine.runner._head_packed is None
        assert all(layer.onednn for layer in layers) == (torch.backends.mkldnn.is_available())
        plain = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
        merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), adapters["a"]).merge_and_unload()
        dominant = [dict(prompt=p, adapters=[("a", 1.0)], min_tokens=10, max_tokens=10) for p in PROMPTS[:4]]
        for job, out in zip(dominant, h.run(dominant)):  # merges "a" part-way
            assert out["ids"] == hf_greedy(merged.eval(), h.tok, job["prompt"], 10), job
        assert h.engine.merger.merges == 1
        mixed = [dict(prompt=p, min_tokens=10, max_tokens=10) for p in PROMPTS[:3]]
        for job, out in zip(mixed, h.run(mixed)):
            assert out["ids"] == hf_greedy(plain, h.tok, job["prompt"], 10), job
    finally:
        h.engine.stop()


def test_bf16_pages_serve_exactly_the_adapter_they_hold(llama_dir, tmp_path):
    """lora_dtype=bfloat16 keeps the LoRA pool in bf16. An adapter whose values bf16 holds exactly (and whose scaling
    is a power of two) is then served as in fp32: the greedy tokens of PEFT's merged model, batched or alone."""
    exact = make_peft_adapter(llama_dir, tmp_path / "exact", "llama", r=4, alpha=8, seed=21, round_to=torch.bfloat16)
    h = Harness(llama_dir, {"exact": exact}, "compiled", auto_merge=False, lora_dtype="bfloat16")
    try:
        assert all(layer.lora_a.dtype == torch.bfloat16 for layer in h.engine.runner.layers.values())
        merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), exact).merge_and_unload()
        plain = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
        jobs = [dict(prompt=p, adapters=[("exact", 1.0)] if i % 2 == 0 else [], min_tokens=10, max_tokens=10)
                for i, p in enumerate(PROMPTS)]  # fmt: skip
        for job, out in zip(jobs, h.run(jobs)):
            model = merged.eval() if job["adapters"] else plain
            assert out["ids"] == hf_greedy(model, h.tok, job["prompt"], 10), job
            assert h.run([job])[0]["ids"] == out["ids"]
    finally:
        h.engine.stop()


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_prompts_on_one_adapter_prefill_as_one_run(llama_dir, adapters, backend):
    """A prefill whose prompts all use the same adapter gives its layers one run of LoRA rows (two plain GEMMs over
    every token): each prompt's logits are those it gets alone, and the compiled graphs warmed up for it."""
    h = Harness(llama_dir, adapters, backend, auto_merge=False)
    try:
        h.engine.stop()  # drive the runner by hand, from this thread
        runner = h.engine.runner
        adapter = h.registry.get("a")
        rows = [(adapter, h.engine.pool.acquire(adapter, adapter.weights), 1.0)]
        prompts = [h.tok(p)["input_ids"] for p in PROMPTS[:4]]
        runs = []
        set_rows = runner.lora_batch.set
        runner.lora_batch.set = lambda idx, *a: runs.append(idx.shape[0]) or set_rows(idx, *a)
        compiles = dict(torch._dynamo.utils.counters["frames"])
        with torch.inference_mode():
            together = runner.prefill(0, prompts, [rows] * 4)
            mixed = runner.prefill(0, prompts, [rows, [], rows, rows])
            alone = [runner.prefill(0, [p], [rows]) for p in prompts]
            no_lora = runner.prefill(0, prompts, [[]] * 4)
        assert runs == [1, 4, 1, 1, 1, 1]
        torch.testing.assert_close(together, torch.cat(alone), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(mixed[[0, 2, 3]], together[[0, 2, 3]], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(mixed[1], no_lora[1], rtol=1e-4, atol=1e-4)
        assert not torch.allclose(together, no_lora, atol=1e-3)  # the adapter does change them
        assert dict(torch._dynamo.utils.counters["frames"]) == compiles
    finally:
        h.engine.stop()


LONG = " ".join(PROMPTS)  # ~30 tokens of the tiny tokenizer: chunks of 8


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_long_prompts_prefill_in_chunks_while_others_decode(llama_dir, adapters, backend):
    """A prompt longer than prefill_chunk is prefilled a chunk per engine step in the last cache row, the running
    sequences decoding in between; every output is HF's / merged PEFT's greedy one and nothing compiles anew."""
    h = Harness(llama_dir, adapters, backend, max_num_seqs=3, auto_merge=False, prefill_chunk=8)
    try:
        runner, events = h.engine.runner, []
        for name in ("prefill", "prefill_chunk", "decode"):
            def spy(*a, _f=getattr(runner, name), _name=name):
                events.append(_name)
                return _f(*a)
            setattr(runner, name, spy)
        compiles = dict(torch._dynamo.utils.counters["frames"])
        jobs = [dict(prompt=PROMPTS[0], max_tokens=24, min_tokens=24), dict(prompt=LONG, adapters=[("a", 1.0)]),
                dict(prompt=LONG + " and more", max_tokens=6), dict(prompt=PROMPTS[1], adapters=[("b", 1.0)])]
        assert len(h.tok(LONG)["input_ids"]) > 3 * 8
        outs = h.run([dict(j, min_tokens=j.get("max_tokens", 10), max_tokens=j.get("max_tokens", 10)) for j in jobs])
        plain = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
        merged = {n: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), d).merge_and_unload()
                  for n, d in adapters.items()}  # fmt: skip
        for job, out in zip(jobs, outs):
            model = merged[job["adapters"][0][0]].eval() if job.get("adapters") else plain
            assert out["ids"] == hf_greedy(model, h.tok, job["prompt"], len(out["ids"])), job
        # each long prompt went chunk by chunk (the first chunk a plain prefill), with decode steps in between
        chunks = [i for i, e in enumerate(events) if e == "prefill_chunk"]
        assert len(chunks) >= 2 * 3
        assert any(events[i + 1] == "decode" and events[i + 2] == "prefill_chunk" for i in chunks[:-2])
        assert h.engine.num_running == 0 and h.engine._partial is None
        if backend == "compiled":
            assert dict(torch._dynamo.utils.counters["frames"]) == compiles
    finally:
        h.engine.stop()


def test_aborting_a_chunked_prompt_frees_its_row(llama_dir, adapters):
    h = Harness(llama_dir, adapters, "eager", max_num_seqs=2, auto_merge=False, prefill_chunk=8)
    try:
        h.engine.stop()  # drive the engine's steps by hand, from this thread
        eng, got = h.engine, []
        req = GenerationRequest("long", h.tok(LONG)["input_ids"], SamplingParams(max_tokens=4), got.append,
                                [AdapterUse(h.registry.get("a"))])  # fmt: skip
        with torch.inference_mode():
            eng._enqueue(req)
            eng._step()
            assert eng._partial is not None and eng.num_running == 1 and eng.pool._resident
            eng._apply_aborts({"long"})
        assert eng._partial is None and eng.num_running == 0 and got[-1].finish_reason == "abort"
        assert all(r.users == 0 for r in eng.pool._resident.values())
        h.engine.start()
        assert h.run([dict(prompt=LONG, max_tokens=3, min_tokens=3)])[0]["ids"] == hf_greedy(
            AutoModelForCausalLM.from_pretrained(llama_dir).eval(), h.tok, LONG, 3
        )
    finally:
        h.engine.stop()
