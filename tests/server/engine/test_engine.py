"""The engine: HF parity, batching invariance, continuous batching, aborts, seeds, composition, merging, chunked
prefill; against HF's and PEFT's greedy tokens."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from adapters.cpu.onednn import OneDnnLinear, onednn_linear
from server.engine.request import AdapterUse, GenerationRequest
from server.engine.sampling import SamplingParams
from tests.server.engine.support import LONG, PROMPTS, hf_greedy
from tests.tiny import make_peft_adapter


def test_greedy_matches_hf_and_merged_peft(harness, llama_dir, engine_adapters):
    jobs = [dict(prompt=p, adapters=ad, min_tokens=10) for p in PROMPTS[:3] for ad in ([], [("a", 1.0)], [("b", 1.0)])]
    outs = harness.run(jobs)  # 9 requests through 4 rows: queueing and joining mid-run
    plain = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    merged = {n: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), d).merge_and_unload().eval()
              for n, d in engine_adapters.items()}
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


def test_composition_matches_peft_weighted_cat(harness, llama_dir, engine_adapters):
    out = harness.run([dict(prompt=PROMPTS[2], adapters=[("a", 0.7), ("b", -0.4)], min_tokens=10)])[0]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), engine_adapters["a"], adapter_name="a")
    model.load_adapter(engine_adapters["b"], adapter_name="b")
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


def test_request_too_long_for_pool_is_answered(make_harness, llama_dir, tmp_path):
    big = make_peft_adapter(llama_dir, tmp_path / "big", "llama", r=40)
    h = make_harness(llama_dir, {"big": big}, "eager")
    h.engine.pool.pages = 3  # pretend a small pool: 40 rows need 5 pages of 8
    h.engine.pool._free = [2, 1]
    out = h.run([dict(prompt=PROMPTS[0], adapters=[("big", 1.0)])])[0]
    assert out["reason"] == "error" and "pages" in out["error"]


def test_gpt2_engine_matches_hf(make_harness, tiny_models):
    h = make_harness(tiny_models["gpt2"], {}, "eager")
    outs = h.run([dict(prompt=p, min_tokens=10) for p in PROMPTS])  # min_tokens bans EOS, as HF min_new_tokens
    model = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"]).eval()
    for p, out in zip(PROMPTS, outs):
        assert out["ids"] == hf_greedy(model, h.tok, p, 10)


def test_sampling_respects_top_p_and_banned():
    from server.engine.sampling import sample

    logits = torch.tensor([[5.0, 4.9, -10.0, -10.0]] * 64)
    gens = [torch.Generator().manual_seed(i) for i in range(64)]
    tokens = sample(logits, torch.ones(64), torch.full((64,), 0.5), gens)
    assert set(tokens.tolist()) == {0}  # top_p 0.5 keeps only the most likely token
    banned = torch.zeros(64, 4, dtype=torch.bool)
    banned[:, 0] = True
    tokens = sample(logits, torch.zeros(64), torch.ones(64), [None] * 64, banned)
    assert set(tokens.tolist()) == {1}


def test_auto_merge_serves_everyone_correctly_and_restores_weights_exactly(make_harness, llama_dir, engine_adapters):
    plain = make_harness(llama_dir, engine_adapters, "eager", auto_merge=False)
    merging = make_harness(llama_dir, engine_adapters, "eager", auto_merge=True, merge_threshold=0.75, merge_window=3)
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


def test_merge_and_unmerge_compile_nothing_after_warmup(make_harness, llama_dir, engine_adapters):
    """A merge repacks the merged layers' weights for oneDNN (adapters.cpu.onednn): the compiled decoder layer takes the
    new packed tensors as it took the first ones, so merging and unmerging recompile nothing."""
    h = make_harness(llama_dir, engine_adapters, "compiled", auto_merge=True, merge_threshold=0.75, merge_window=3)
    compiles = dict(torch._dynamo.utils.counters["frames"])  # every frame dynamo tried to compile
    dominant = [dict(prompt=p, adapters=[("a", 1.0)], max_tokens=12, ignore_eos=True) for p in PROMPTS[:4]]
    for _ in range(2):
        h.run(dominant)  # merges
        h.run([dict(prompt=p, max_tokens=12, ignore_eos=True) for p in PROMPTS])  # mixed again: unmerges
    m = h.engine.merger
    assert m.merges == 2 and m.unmerges == 2
    assert dict(torch._dynamo.utils.counters["frames"]) == compiles


def test_many_merge_cycles_leave_no_drift(make_harness, llama_dir, engine_adapters):
    h = make_harness(llama_dir, engine_adapters, "eager", auto_merge=True)
    h.engine.stop()  # drive the merger by hand, from this thread
    params = dict(h.base.model.named_parameters())
    original = {n: p.detach().clone() for n, p in params.items()}
    adapter = h.registry.get("b")
    pages = h.engine.pool.acquire(adapter, adapter.weights)
    for _ in range(25):
        h.engine.merger.merge(adapter, pages, adapter.weights)
        h.engine.merger.unmerge()
    assert all(torch.equal(p, original[n]) for n, p in params.items())
    # the layers' packed copies for oneDNN (adapters.cpu.onednn), where used, were made anew from those weights
    for layer in h.engine.runner.layers.values():
        base = layer.base_layer
        if isinstance(base, OneDnnLinear) and base.packed is not None:
            x = torch.randn(3, layer.in_features)
            want = torch.nn.functional.linear(x, base.weight, base.bias)
            torch.testing.assert_close(onednn_linear(x, base.packed, base.bias), want)


def test_unpacked_weights_serve_the_same_tokens(make_harness, llama_dir, engine_adapters):
    """pack_weights=False keeps one copy of the weights: oneDNN reads the plain ones, merged or not, with the outputs
    of HF and of PEFT's merged adapter."""
    h = make_harness(llama_dir, engine_adapters, "compiled", auto_merge=True, merge_threshold=0.75, merge_window=3,
                pack_weights=False)  # fmt: skip
    frozen = [layer.base_layer for layer in h.engine.runner.layers.values()] + [h.engine.runner.lm_head]
    assert all(isinstance(f, OneDnnLinear) for f in frozen) == torch.backends.mkldnn.is_available()
    assert all(getattr(f, "packed", None) is None for f in frozen)
    plain = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), engine_adapters["a"]).merge_and_unload()
    dominant = [dict(prompt=p, adapters=[("a", 1.0)], min_tokens=10, max_tokens=10) for p in PROMPTS[:4]]
    for job, out in zip(dominant, h.run(dominant)):  # merges "a" part-way
        assert out["ids"] == hf_greedy(merged.eval(), h.tok, job["prompt"], 10), job
    assert h.engine.merger.merges == 1
    mixed = [dict(prompt=p, min_tokens=10, max_tokens=10) for p in PROMPTS[:3]]
    for job, out in zip(mixed, h.run(mixed)):
        assert out["ids"] == hf_greedy(plain, h.tok, job["prompt"], 10), job


def test_bf16_pages_serve_exactly_the_adapter_they_hold(make_harness, llama_dir, tmp_path):
    """lora_dtype=bfloat16 keeps the LoRA pool in bf16. An adapter whose values bf16 holds exactly (and whose scaling
    is a power of two) is then served as in fp32: the greedy tokens of PEFT's merged model, batched or alone."""
    exact = make_peft_adapter(llama_dir, tmp_path / "exact", "llama", r=4, alpha=8, seed=21, round_to=torch.bfloat16)
    h = make_harness(llama_dir, {"exact": exact}, "compiled", auto_merge=False, lora_dtype="bfloat16")
    assert all(layer.lora_A.dtype == torch.bfloat16 for layer in h.engine.runner.layers.values())
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), exact).merge_and_unload()
    plain = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    jobs = [dict(prompt=p, adapters=[("exact", 1.0)] if i % 2 == 0 else [], min_tokens=10, max_tokens=10)
            for i, p in enumerate(PROMPTS)]  # fmt: skip
    for job, out in zip(jobs, h.run(jobs)):
        model = merged.eval() if job["adapters"] else plain
        assert out["ids"] == hf_greedy(model, h.tok, job["prompt"], 10), job
        assert h.run([job])[0]["ids"] == out["ids"]


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_prompts_on_one_adapter_prefill_as_one_segment(make_harness, llama_dir, engine_adapters, backend):
    """A prefill whose prompts all use the same adapter gives its layers one segment of LoRA rows (two plain GEMMs over
    every token): each prompt's logits are those it gets alone, and the compiled graphs warmed up for it."""
    h = make_harness(llama_dir, engine_adapters, backend, auto_merge=False)
    h.engine.stop()  # drive the runner by hand, from this thread
    runner = h.engine.runner
    adapter = h.registry.get("a")
    rows = [(adapter, h.engine.pool.acquire(adapter, adapter.weights), 1.0)]
    prompts = [h.tok(p)["input_ids"] for p in PROMPTS[:4]]
    runs = []
    set_rows = runner.lora_mapping.set
    runner.lora_mapping.set = lambda pages, *a: runs.append(pages.shape[0]) or set_rows(pages, *a)
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


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_long_prompts_prefill_in_chunks_while_others_decode(make_harness, llama_dir, engine_adapters, backend):
    """A prompt longer than prefill_chunk is prefilled a chunk per engine step in the last cache row, the running
    sequences decoding in between; every output is HF's / merged PEFT's greedy one and nothing compiles anew."""
    h = make_harness(llama_dir, engine_adapters, backend, max_num_seqs=3, auto_merge=False, prefill_chunk=8,
                     prefix_caching=False)  # (the two long prompts share a prefix: no cached blocks here)
    runner, events = h.engine.runner, []
    for name in ("prefill", "decode"):
        def spy(*a, _f=getattr(runner, name), _name=name):
            events.append("prefill_chunk" if _name == "prefill" and len(a) > 3 else _name)  # a chunk: `starts`
            return _f(*a)
        setattr(runner, name, spy)
    compiles = dict(torch._dynamo.utils.counters["frames"])
    jobs = [dict(prompt=PROMPTS[0], max_tokens=24, min_tokens=24), dict(prompt=LONG, adapters=[("a", 1.0)]),
            dict(prompt=LONG + " and more", max_tokens=6), dict(prompt=PROMPTS[1], adapters=[("b", 1.0)])]
    assert len(h.tok(LONG)["input_ids"]) > 3 * 8
    outs = h.run([dict(j, min_tokens=j.get("max_tokens", 10), max_tokens=j.get("max_tokens", 10)) for j in jobs])
    plain = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    merged = {n: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), d).merge_and_unload()
              for n, d in engine_adapters.items()}  # fmt: skip
    for job, out in zip(jobs, outs):
        model = merged[job["adapters"][0][0]].eval() if job.get("adapters") else plain
        assert out["ids"] == hf_greedy(model, h.tok, job["prompt"], len(out["ids"])), job
    # each long prompt went chunk by chunk (the first chunk a plain prefill), with decode steps in between
    chunks = [i for i, e in enumerate(events) if e == "prefill_chunk"]
    assert len(chunks) >= 2 * 3
    assert any(events[i + 1] == "decode" and events[i + 2] == "prefill_chunk" for i in chunks[:-2])
    assert h.engine.num_running == 0 and h.engine.scheduler.partial is None
    if backend == "compiled":
        assert dict(torch._dynamo.utils.counters["frames"]) == compiles


def test_aborting_a_chunked_prompt_frees_its_row(make_harness, llama_dir, engine_adapters):
    h = make_harness(llama_dir, engine_adapters, "eager", max_num_seqs=2, auto_merge=False, prefill_chunk=8)
    h.engine.stop()  # drive the engine's steps by hand, from this thread
    eng, got = h.engine, []
    req = GenerationRequest("long", h.tok(LONG)["input_ids"], SamplingParams(max_tokens=4), got.append,
                            [AdapterUse(h.registry.get("a"))])  # fmt: skip
    with torch.inference_mode():
        eng.scheduler.add(eng._sequence(req))
        eng._step()
        assert eng.scheduler.partial is not None and eng.num_running == 1 and eng.pool._resident
        for seq in eng.scheduler.abort({"long"}):
            eng.outputs.finish(seq, "abort")
    assert eng.scheduler.partial is None and eng.num_running == 0 and got[-1].finish_reason == "abort"
    assert all(r.users == 0 for r in eng.pool._resident.values())
    h.engine.start()
    assert h.run([dict(prompt=LONG, max_tokens=3, min_tokens=3)])[0]["ids"] == hf_greedy(
        AutoModelForCausalLM.from_pretrained(llama_dir).eval(), h.tok, LONG, 3
    )


@pytest.mark.parametrize("backend,grouping", [("eager", "auto"), ("compiled", "on"), ("compiled", "auto")])
def test_rows_sharing_adapters_decode_grouped_with_the_same_tokens(make_harness, llama_dir, engine_adapters, backend,
                                                                   grouping):  # fmt: skip
    """Decode steps whose rows share pages take the segmented op (all rows on one adapter) or the grouped one
    (several rows per adapter, each adapter's pages read once), or with decode grouping off (auto: the compiled
    backend on the CPU) the gathered op: the tokens are PEFT's, and nothing compiles anew."""
    h = make_harness(llama_dir, engine_adapters, backend, max_num_seqs=6, auto_merge=False, prefix_caching=False,
                     decode_grouping=grouping)  # fmt: skip
    modes = []
    stage = h.engine.runner._stage_lora
    h.engine.runner._stage_lora = lambda *a: (r := stage(*a), modes.append(r[0][0]))[0]
    compiles = dict(torch._dynamo.utils.counters["frames"])
    same = [dict(prompt=p, adapters=[("a", 1.0)], min_tokens=6, max_tokens=6) for p in PROMPTS[:4]]
    shared = [dict(prompt=PROMPTS[i % 5], adapters=ad, min_tokens=6, max_tokens=6)
              for i, ad in enumerate([[("a", 1.0)]] * 3 + [[("b", 1.0)]] * 2 + [[]])]  # fmt: skip
    outs = h.run(same) + h.run(shared)
    grouped = grouping == "on" or h.engine.runner.device.type != "cpu" or backend == "eager"
    assert h.engine.runner.group_decode == grouped
    assert ("segmented" in modes and "grouped" in modes) if grouped else set(modes) <= {"gathered", "none"}
    plain = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    merged = {n: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), d).merge_and_unload().eval()
              for n, d in engine_adapters.items()}  # fmt: skip
    for job, out in zip(same + shared, outs):
        model = merged[job["adapters"][0][0]] if job["adapters"] else plain
        assert out["ids"] == hf_greedy(model, h.tok, job["prompt"], 6), job
    if backend == "compiled":
        assert dict(torch._dynamo.utils.counters["frames"]) == compiles


def test_rows_arriving_interleaved_decode_adapter_by_adapter_with_the_same_tokens(make_harness, llama_dir,
                                                                                  engine_adapters):  # fmt: skip
    """One step admits its new sequences adapter by adapter, but sequences admitted at different steps leave a decode
    step's rows interleaved (a b | base a b): the compiled backend on the CPU gathers over them adapter by adapter
    (a permutation of the rows and back), the tokens are PEFT's, and nothing compiles anew."""
    h = make_harness(llama_dir, engine_adapters, "compiled", max_num_seqs=6, auto_merge=False, prefix_caching=False)
    h.engine.stop()  # drive the engine's steps by hand, from this thread
    eng, staged = h.engine, []
    stage = eng.runner._stage_lora
    eng.runner._stage_lora = lambda host, adapters, b: (r := stage(host, adapters, b),
                                                        staged.append((r[0][0], host["order"][:b].tolist())))[0]  # fmt: skip
    compiles = dict(torch._dynamo.utils.counters["frames"])
    jobs = [(PROMPTS[0], "a"), (PROMPTS[1], "b"), (PROMPTS[2], None), (PROMPTS[3], "a"), (PROMPTS[4], "b")]
    outs = [[] for _ in jobs]
    reqs = [h.request(p, [(a, 1.0)] if a else [], 6, outs[i].append, min_tokens=6) for i, (p, a) in enumerate(jobs)]
    with torch.inference_mode():
        for req in reqs[:2]:
            eng.scheduler.add(eng._sequence(req))
        eng._step()
        for req in reversed(reqs[2:]):  # arriving b, a, base: admitted adapter by adapter, base first
            eng.scheduler.add(eng._sequence(req))
        eng._step()
        assert [s.req.request_id for s in eng.scheduler.running] == [reqs[i].request_id for i in (0, 1, 2, 3, 4)]
        while eng.scheduler.has_work():
            eng._step()
    h.engine.start()
    assert any(mode == "gathered" and order != sorted(order) for mode, order in staged), staged
    assert dict(torch._dynamo.utils.counters["frames"]) == compiles
    plain = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    merged = {n: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), d).merge_and_unload().eval()
              for n, d in engine_adapters.items()}  # fmt: skip
    for (prompt, adapter), out in zip(jobs, outs):
        assert [t for o in out for t in o.token_ids] == hf_greedy(merged[adapter] if adapter else plain, h.tok,
                                                                   prompt, 6), (prompt, adapter)  # fmt: skip


def test_background_compile_serves_at_once_then_compiled(make_harness, llama_dir, engine_adapters):
    """With the warm-up in the background the engine serves at once (eagerly), compiles while idle, and then
    serves compiled, the same tokens throughout and nothing compiled after the warm-up."""
    import time

    h = make_harness(llama_dir, engine_adapters, "compiled", max_num_seqs=4, auto_merge=False, background=True)
    jobs = [dict(prompt=p, adapters=[("a", 1.0)] if i % 2 else [], min_tokens=6, max_tokens=6)
            for i, p in enumerate(PROMPTS[:4])]  # fmt: skip
    assert h.engine.compiling
    first = h.run(jobs)  # served while the warm-up is pending: eagerly
    deadline = time.monotonic() + 600
    while h.engine.compiling and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not h.engine.compiling and h.progress[-1][0] == h.progress[-1][1] > 10
    compiles = dict(torch._dynamo.utils.counters["frames"])
    assert [o["ids"] for o in h.run(jobs)] == [o["ids"] for o in first]
    assert dict(torch._dynamo.utils.counters["frames"]) == compiles
