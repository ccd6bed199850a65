"""Generation throughput of one batch, multi-LoRA against base and against its peers.

What it measures: generated tokens per second (prefill included, wall clock from the first
request queued to the last token) for a batch of 16 chat prompts × 32 new tokens, greedy, EOS
ignored, on the default model (SmolLM2-135M-Instruct, fp32):

    (a) our engine, base model only
    (b) our engine, one rank-16 adapter for all 16 rows
    (c) our engine, 16 distinct rank-16 adapters (q,k,v,o,gate,up,down), one per row
    (d) transformers `model.generate`, base (left padding, batch 16, min = max new tokens)
    (e) PEFT's mixed-adapter batch: the same 16 adapters, `generate(..., adapter_names=[...])`

plus (b+m) and (c+m), (b) and (c) with automatic merging on, measured in steady state: before each timed
run an untimed one merges (if one adapter dominates), so the timed run finds the engine merged; the
merge's own time is printed apart. And the ratios (c)/(a) (the cost of 16 different adapters in one batch), (b)/(a), (c)/(e) (our
multi-LoRA against PEFT's) and (a)/(d) (our engine against `generate`). The engine runs in
process, no HTTP (see http_load.py for the server). (d) and (e) use a second, un-injected copy
of the model, since the engine wraps its model's linears in place.

MFU = tok/s × 2·params FLOPs per token ÷ this process's best fp32 matmul FLOP/s at 2048³ (MKL or oneDNN) (adapter
parameters counted for the rows that use them). Each number: the median of --repeats runs, the
cases interleaved round by round, each timed run right after an untimed one of the same case. Each ratio twice:
the ratio of two medians, and paired, the median over rounds of the ratio within a round (robust to this machine's
drift). Usage: `python benchmarks/throughput.py [--quick] [--backend eager] [--skip-peer] [--lora-dtype bfloat16]`
(--lora-dtype: the engine's LoRA pages in bf16, vLLM's `lora_dtype`; the peers keep fp32 adapters). `--prompts 64
--adapters 16` measures a larger batch over the same 16 adapters, 4 rows each (as many adapter bytes per step, more
rows to spread them over).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/throughput.py` from anywhere

from adapters.cpu.allocator import keep_freed_memory  # noqa: E402
from adapters.cpu.onednn import onednn_linear  # noqa: E402
from adapters.tiers.registry import Adapter, AdapterRegistry  # noqa: E402
from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    adapter_name,
    add_server_args,
    chat_prompt_ids,
    make_random_adapters,
    print_table,
    resolve_model_path,
    summarize,
    target_shapes,
    write_json,
    write_peft_adapters,
)
from server.engine.config import EngineConfig  # noqa: E402
from server.engine.engine import Engine  # noqa: E402
from server.engine.model import BaseModel, load_base_model  # noqa: E402
from server.engine.request import AdapterUse, GenerationRequest, RequestOutput  # noqa: E402
from server.engine.sampling import SamplingParams  # noqa: E402
from server.engine.threads import run_in_thread  # noqa: E402

RUN_TIMEOUT = 900.0  # seconds one batch may take before the benchmark gives up


def matmul_gflops(n: int = 2048, reps: int = 5) -> dict[str, float]:
    """Best fp32 GFLOP/s of an n×n×n matmul in this process, through MKL (PyTorch's `@`) and through oneDNN
    (the kernels the engine uses, adapters.cpu.onednn): the larger is this machine's ceiling for MFU."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    bt = b.T.contiguous()
    kernels = {"mkl": lambda: a @ b, "onednn": lambda: onednn_linear(a, bt, None)}
    rates = {}
    for name, f in kernels.items():
        f()
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            f()
            best = min(best, time.perf_counter() - t0)
        rates[name] = 2 * n**3 / best / 1e9
    return rates


def memory_bandwidth(nbytes: int = 256 * 2**20, reps: int = 8) -> float:
    """Bytes per second this process reads from memory: the best of `reps` sums over a buffer far beyond the caches."""
    x = torch.ones(nbytes // 4)
    x.sum()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def c_over_a_bound(base_tok_s: float, rows: int, new_tokens: int, adapters: int, adapter_params: int,
                   lora_dtype: str, dtype: str, bandwidth: float) -> float:
    """The most (c)/(a) can be when each decode step must read every distinct adapter's pages once, at the
    machine's memory bandwidth, on top of the base's own time (prefill and everything else left out)."""
    width = torch.empty((), dtype=getattr(torch, dtype if lora_dtype == "auto" else lora_dtype)).element_size()
    base_s = rows * new_tokens / base_tok_s
    lora_s = (new_tokens - 1) * adapters * adapter_params * width / bandwidth
    return base_s / (base_s + lora_s)


def run_engine(engine: Engine, prompts: list[list[int]], new_tokens: int, adapters: list[Adapter | None]) -> float:
    """tok/s of one batch: every request is queued before the engine thread starts, so all prefill together."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    done = threading.Event()
    lock = threading.Lock()
    state = {"left": len(prompts), "tokens": 0, "end": 0.0, "errors": []}

    def emit(out: RequestOutput) -> None:  # engine thread
        with lock:
            state["tokens"] += len(out.token_ids)
            if out.finish_reason is not None:
                if out.error:
                    state["errors"].append(out.error)
                state["left"] -= 1
                if state["left"] == 0:
                    state["end"] = time.perf_counter()
                    done.set()

    for i, (ids, adapter) in enumerate(zip(prompts, adapters, strict=True)):
        uses = [AdapterUse(adapter)] if adapter is not None else []
        engine.submit(GenerationRequest(f"bench-{i}", ids, params, emit, uses))
    t0 = time.perf_counter()
    engine.start()
    finished = done.wait(RUN_TIMEOUT)
    engine.stop()
    if not finished or state["errors"]:
        raise RuntimeError(f"engine run failed: {state['errors'] or 'timed out'}")
    if state["tokens"] != len(prompts) * new_tokens:
        raise RuntimeError(f"engine generated {state['tokens']} tokens, expected {len(prompts) * new_tokens}")
    return state["tokens"] / (state["end"] - t0)


def left_padded(prompts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask padded on the left, as `generate` wants for decoder-only models."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def run_generate(model, batch: dict[str, torch.Tensor], new_tokens: int, pad_id: int, **kwargs) -> float:
    """tok/s of one HF `generate` call on the whole batch, forced to exactly `new_tokens` per row."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **batch,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            **kwargs,
        )
    dt = time.perf_counter() - t0
    generated = out.shape[0] * (out.shape[1] - batch["input_ids"].shape[1])
    if generated != batch["input_ids"].shape[0] * new_tokens:
        raise RuntimeError(f"generate produced {generated} tokens, expected {batch['input_ids'].shape[0] * new_tokens}")
    return generated / dt


@dataclass
class Case:
    """One measured configuration: `run` times one batch (tok/s); `prepare` sets the engine up first, untimed."""

    label: str
    run: Callable[[], float]
    prepare: Callable[[], None] = lambda: None


def measure_interleaved(cases: dict[str, Case], repeats: int) -> dict[str, dict]:
    """`repeats` rounds of every case in turn (a b c ... a b c ...), so that this machine's drift (±15 % over
    minutes) falls on all of them alike; each timed run follows an untimed run of the same case (a run right
    after another case's was seen 10-30 % slower); each case's median is its number."""
    runs: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(repeats):
        for k, case in cases.items():
            case.prepare()
            case.run()
            runs[k].append(case.run())
            print(f"round {r + 1}/{repeats}: {case.label}: {runs[k][-1]:.1f} tok/s", flush=True)
    return {k: summarize(v) for k, v in runs.items()}


def warmed_engine(base: BaseModel, config: EngineConfig) -> Engine:
    engine = Engine(base, config)
    engine.warmup()
    return engine


def our_cases(
    base: BaseModel, backend: str, prompts, new_tokens: int, adapters, lora_dtype: str = "auto"
) -> tuple[dict[str, Case], list]:
    """(a) base, (b) one adapter for every row, (c) row i on adapter i mod len(adapters), on our engine in process;
    (b+m), (c+m) with auto-merge. Also returns the list the merges' durations go to."""
    n = len(prompts)
    registry = AdapterRegistry()
    registered = [registry.add(adapter_name(i), w) for i, w in enumerate(adapters)]
    config = EngineConfig(
        max_num_seqs=n,
        max_model_len=max(map(len, prompts)) + new_tokens + 16,
        lora_pages=len(adapters) + 1,  # one page per rank-16 adapter, plus the zero page
        lora_page_size=16,
        lora_backend=backend,
        lora_dtype=lora_dtype,
    )
    engine = run_in_thread(warmed_engine, base, config)
    per_row = [registered[i % len(registered)] for i in range(n)]
    merger = engine.merger
    merge_s: list[float] = []
    timed_merge = merger.merge

    def merge_and_time(*args):
        t0 = time.perf_counter()
        timed_merge(*args)
        merge_s.append(time.perf_counter() - t0)

    merger.merge = merge_and_time

    def case(label: str, rows: list, merge: bool) -> Case:
        def prepare() -> None:
            # every case starts unmerged; with auto-merge an untimed batch first leaves the engine as steady traffic
            # does (merged, when one adapter dominates), so the timed batch measures the merged state
            if merger.merged is not None:
                run_in_thread(merger.unmerge)
            engine.merger = merger if merge else None
            if merge:
                run_engine(engine, prompts, new_tokens, rows)

        return Case(label, lambda: run_engine(engine, prompts, new_tokens, rows), prepare)

    return {
        "a": case("(a) engine, base", [None] * n, False),
        "b": case("(b) engine, 1 adapter", registered[:1] * n, False),
        "bm": case("(b+m) engine, 1 adapter, auto-merge", registered[:1] * n, True),
        "c": case(f"(c) engine, {len(adapters)} adapters", per_row, False),
        "cm": case(f"(c+m) engine, {len(adapters)} adapters, auto-merge on", per_row, True),
    }, merge_s


def peer_cases(args, model_path: str, prompts, new_tokens: int, adapters, tmp: Path) -> dict[str, Case]:
    """(d) transformers `generate` and (e) PEFT's mixed batch, each on an un-injected model copy of its own."""
    from peft import PeftModel

    def load():
        plain = load_base_model(args.model, cache_dir=args.cache_dir, dtype=args.dtype)
        model = load_base_model(args.model, cache_dir=args.cache_dir, dtype=args.dtype).model
        paths = write_peft_adapters(adapters, tmp, base_model=model_path)
        names = [adapter_name(i) for i in range(len(paths))]
        peft_model = PeftModel.from_pretrained(model, paths[0], adapter_name=names[0])
        for name, path in zip(names[1:], paths[1:], strict=True):
            peft_model.load_adapter(path, adapter_name=name)
        return plain, peft_model.eval(), names

    plain, peft_model, names = run_in_thread(load)
    tok = plain.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batch = left_padded(prompts, pad_id)
    row_names = [names[i % len(names)] for i in range(len(prompts))]
    return {
        "d": Case("(d) transformers generate, base",
                  lambda: run_in_thread(run_generate, plain.model, batch, new_tokens, pad_id)),
        "e": Case("(e) PEFT mixed batch", lambda: run_in_thread(
            run_generate, peft_model, batch, new_tokens, pad_id, adapter_names=row_names)),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_server_args(ap)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--lora-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="dtype of the engine's LoRA pages (auto: the model's)")
    ap.add_argument("--prompts", type=int, default=16, help="batch size")
    ap.add_argument("--adapters", type=int, default=None,
                    help="distinct adapters in (c), row i on adapter i mod N (default: one per row)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="measured runs after the warm-up (median reported)")
    ap.add_argument("--skip-peer", action="store_true", help="skip (d) transformers and (e) PEFT")
    ap.add_argument("--quick", action="store_true", help="smoke check: 4 prompts × 8 tokens, 1 repeat, no JSON")
    ap.add_argument("--out", type=Path, default=None, help="JSON results (default: benchmarks/results/throughput.json)")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.new_tokens, args.repeats = 4, 8, 1
    out_path = args.out or (None if args.quick else RESULTS_DIR / "throughput.json")
    n, new_tokens = args.prompts, args.new_tokens
    n_adapters = args.adapters or n
    if not 1 <= n_adapters <= n:
        ap.error("--adapters must be between 1 and --prompts")

    keep_freed_memory()  # as the server does at start, before any thread (adapters.cpu.allocator); the peers share it
    # torch work runs in threads that end with it, as in the server (see server/engine/threads.py), so that the engine
    # thread's OpenMP team is the only one alive while it runs; each peer run is in a thread of its own too
    rates = run_in_thread(matmul_gflops)
    bandwidth = run_in_thread(memory_bandwidth)
    gflops = max(rates.values())
    matmul_line = f"fp32 matmul 2048³: MKL {rates['mkl']:.1f}, oneDNN {rates['onednn']:.1f} GFLOP/s ({torch.get_num_threads()} threads)"
    print(matmul_line, flush=True)

    base = run_in_thread(load_base_model, args.model, cache_dir=args.cache_dir, dtype=args.dtype)
    params = sum(p.numel() for p in base.model.parameters())
    adapters = run_in_thread(make_random_adapters, target_shapes(base.model), n_adapters)
    adapter_params = sum(m.lora_A.numel() + m.lora_B.numel() for m in adapters[0].modules.values())
    prompts = chat_prompt_ids(base.tokenizer, n)
    model_path = resolve_model_path(args.model, args.cache_dir)

    cases, merge_s = our_cases(base, args.backend, prompts, new_tokens, adapters, args.lora_dtype)
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-") as tmp:
        if not args.skip_peer:
            cases |= peer_cases(args, model_path, prompts, new_tokens, adapters, Path(tmp))
        results = measure_interleaved(cases, args.repeats)
    print(f"auto-merge: {len(merge_s)} merges, median {1000 * statistics.median(merge_s):.0f} ms" if merge_s else
          "auto-merge: no merge", flush=True)  # fmt: skip

    def ratio(x: str, y: str) -> float | None:
        return results[x]["median"] / results[y]["median"] if x in results and y in results else None

    def paired(x: str, y: str) -> float | None:
        """The median over rounds of x ÷ y within a round: the two ran a minute apart at most, so drift cancels."""
        if x not in results or y not in results:
            return None
        return statistics.median(vx / vy for vx, vy in zip(results[x]["runs"], results[y]["runs"], strict=True))

    pairs = {"c/a": ("c", "a"), "b/a": ("b", "a"), "c/e": ("c", "e"), "a/d": ("a", "d"), "bm/a": ("bm", "a"),
             "cm/c": ("cm", "c")}
    ratios = {k: ratio(x, y) for k, (x, y) in pairs.items()}
    paired_ratios = {k: paired(x, y) for k, (x, y) in pairs.items()}
    flops_per_token = {k: 2 * (params + (adapter_params if k in ("b", "bm", "c", "cm", "e") else 0)) for k in results}
    mfu = {k: results[k]["median"] * flops_per_token[k] / (gflops * 1e9) for k in results}

    labels = {
        "a": ("(a) engine, base", "—"),
        "b": ("(b) engine, 1 adapter for all rows", "b/a"),
        "bm": ("(b+m) the same, auto-merge on", "bm/a"),
        "c": (f"(c) engine, {n_adapters} distinct adapters", "c/a"),
        "cm": ("(c+m) the same, auto-merge on", "cm/c"),
        "d": ("(d) transformers generate, base", "a/d"),
        "e": (f"(e) PEFT mixed batch, {n_adapters} adapters", "c/e"),
    }
    print(
        f"\n{n} prompts × {new_tokens} new tokens, {n_adapters} adapters in (c), greedy, {args.dtype} (LoRA pages: {args.lora_dtype}), "
        f"backend={args.backend}, "
        f"median of {args.repeats}; rank-16 adapters on {', '.join(adapters[0].target_modules)}"
    )
    rows = []
    for k, (what, r) in labels.items():
        if k in results:
            value, pair = ratios.get(r), paired_ratios.get(r)
            rows.append([what, results[k]["median"], f"{mfu[k]:.1%}", r, "—" if value is None else value,
                         "—" if pair is None else pair])  # fmt: skip
    print_table(["what", "tok/s", "MFU", "ratio", "value", "paired"], rows)
    print("value: the ratio of the medians; paired: the median of the ratios within each round")
    print(f"{matmul_line}; {params / 1e6:.1f} M params, {adapter_params / 1e6:.2f} M per adapter")
    bound = c_over_a_bound(results["a"]["median"], n, new_tokens, n_adapters, adapter_params, args.lora_dtype,
                           args.dtype, bandwidth)  # fmt: skip
    fraction = ratios["c/a"] / bound if ratios["c/a"] else None
    print(f"memory bandwidth {bandwidth / 1e9:.1f} GB/s: c/a is bounded by {bound:.2f} (each decode step reads the "
          f"{n_adapters} adapters' pages once); measured {ratios['c/a']:.2f} = {fraction:.0%} of the bound")

    if out_path:
        write_json(
            out_path,
            {
                "config": {
                    "model": args.model or "SmolLM2-135M-Instruct",
                    "dtype": args.dtype,
                    "backend": args.backend,
                    "lora_dtype": args.lora_dtype,
                    "prompts": n,
                    "adapters": n_adapters,
                    "new_tokens": new_tokens,
                    "repeats": args.repeats,
                    "rank": 16,
                    "target_modules": adapters[0].target_modules,
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "machine": platform.processor() or platform.machine(),
                },
                "matmul_gflops": rates,
                "params": params,
                "adapter_params": adapter_params,
                "tok_per_s": results,
                "ratios": ratios,
                "paired_ratios": paired_ratios,
                "mfu": mfu,
                "merge_s": merge_s,
                "bandwidth_gb_s": bandwidth / 1e9,
                "c_over_a_bound": bound,
                "c_over_a_fraction_of_bound": fraction,
            },
        )


if __name__ == "__main__":
    main()
