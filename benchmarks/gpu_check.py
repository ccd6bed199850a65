"""The GPU check: what the CPU tests cannot prove, on one CUDA device, in a few minutes.

(a) one decode step under `torch.cuda.set_sync_debug_mode("warn")`: the synchronizing calls it makes (the sampled
    tokens' copy to the host is the one expected);
(b) the decode and chunk attention under `sdpa_kernel([FLASH, EFFICIENT])`: SDPA raises if it would fall back to
    its math kernel;
(c) greedy tokens of 8 random rank-16 adapters (one per row, with base rows) against PEFT's mixed batch
    (`generate(adapter_names=...)`): fp32 identical, bf16 at least 98 % the same;
(d) tok/s of the base, one adapter and 16 adapters at 16 and 64 rows, with and without CUDA graphs, and the
    device's peak memory;
all printed as one JSON object (and written with --out). Without CUDA it says so and exits 0.

Usage: `python benchmarks/gpu_check.py [--model DIR] [--backend eager] [--out results/gpu_check.json]`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/gpu_check.py` from anywhere

from adapters.tiers.registry import AdapterRegistry  # noqa: E402
from benchmarks.common import (  # noqa: E402
    adapter_name,
    add_server_args,
    chat_prompt_ids,
    make_random_adapters,
    resolve_model_path,
    target_shapes,
    write_peft_adapters,
)
from benchmarks.throughput import left_padded, run_engine  # noqa: E402
from server.engine.config import EngineConfig  # noqa: E402
from server.engine.engine import Engine  # noqa: E402
from server.engine.model import load_base_model  # noqa: E402

NEW_TOKENS = 16


def engine_for(base, adapters, rows: int, backend: str, graphs: bool) -> tuple[Engine, list]:
    registry = AdapterRegistry()
    registered = [registry.add(adapter_name(i), w) for i, w in enumerate(adapters)]
    config = EngineConfig(max_num_seqs=rows, max_model_len=512, lora_pages=len(adapters) + 2, lora_page_size=16,
                          lora_backend=backend, cuda_graphs=graphs, auto_merge=False, memory_fraction=0.5)  # fmt: skip
    engine = Engine(base, config)
    engine.warmup()
    return engine, registered


def check_syncs_and_kernels(engine: Engine, prompts, registered) -> dict:
    """(a) and (b): one decode step with a batch running, syncs recorded, math attention forbidden."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    eng = engine
    seqs = [eng._sequence(r) for r in _requests(prompts[:8], registered[:8])]
    with torch.inference_mode():
        for s in seqs:
            eng.scheduler.add(s)
        eng._step()  # admit + prefill + one decode
        torch.cuda.synchronize()
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]), warnings.catch_warnings(
            record=True
        ) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                eng._decode()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
    eng.scheduler.take_active()
    return {"decode_step_syncs": len(syncs), "sync_messages": syncs[:5], "sdpa_without_math_kernel": True}


def _requests(prompts, adapters):
    from server.engine.request import AdapterUse, GenerationRequest
    from server.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    return [GenerationRequest(f"check-{i}", p, params, lambda out: None, [AdapterUse(a)] if a is not None else [])
            for i, (p, a) in enumerate(zip(prompts, adapters))]  # fmt: skip


def greedy_agreement(args, model_path: str, dtype: str, adapters, prompts) -> dict:
    """(c): our greedy tokens against PEFT's mixed batch, rows on adapters 0..7 and two base rows."""
    from peft import PeftModel

    base = load_base_model(args.model, cache_dir=args.cache_dir, device="cuda", dtype=dtype)
    engine, registered = engine_for(base, adapters, len(prompts), args.backend, graphs=False)
    rows = [registered[i] if i < 8 else None for i in range(len(prompts))]
    got: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    done = []
    for i, req in enumerate(_requests(prompts, rows)):
        req.emit = lambda out, i=i: (got[i].extend(out.token_ids), out.finish_reason and done.append(i))
        engine.submit(req)
    engine.start()
    deadline = time.monotonic() + 120
    while len(done) < len(prompts) and time.monotonic() < deadline:
        time.sleep(0.05)
    engine.stop()
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_peft_adapters(adapters, Path(tmp), base_model=model_path)
        ref = load_base_model(args.model, cache_dir=args.cache_dir, device="cuda", dtype=dtype).model
        peft = PeftModel.from_pretrained(ref, paths[0], adapter_name=adapter_name(0))
        for i, p in enumerate(paths[1:], 1):
            peft.load_adapter(p, adapter_name=adapter_name(i))
        tok = base.tokenizer
        batch = {k: v.cuda() for k, v in left_padded(prompts, tok.pad_token_id or tok.eos_token_id).items()}
        names = [adapter_name(i) if i < 8 else "__base__" for i in range(len(prompts))]
        with torch.inference_mode():
            out = peft.eval().generate(**batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                       pad_token_id=tok.pad_token_id, adapter_names=names)  # fmt: skip
    theirs = out[:, batch["input_ids"].shape[1] :].tolist()
    same = sum(a == b for i in range(len(prompts)) for a, b in zip(got[i], theirs[i]))
    return {"dtype": dtype, "tokens": len(prompts) * NEW_TOKENS, "same": same,
            "agreement": same / (len(prompts) * NEW_TOKENS)}  # fmt: skip


def throughput(args, base, adapters, prompts) -> dict:
    """(d): tok/s at 16 and 64 rows, base / 1 adapter / 16 adapters, graphs off and on; peak memory."""
    out = {}
    for rows in (16, 64):
        batch = [prompts[i % len(prompts)] for i in range(rows)]
        for graphs in (False, True):
            torch.cuda.reset_peak_memory_stats()
            engine, registered = engine_for(base, adapters, rows, args.backend, graphs)
            cases = {"base": [None] * rows, "one_adapter": registered[:1] * rows,
                     "16_adapters": [registered[i % 16] for i in range(rows)]}  # fmt: skip
            for name, per_row in cases.items():
                run_engine(engine, batch, NEW_TOKENS, per_row)  # warm (and capture)
                out[f"{rows}_rows/{'graphs' if graphs else 'eager_launch'}/{name}"] = run_engine(
                    engine, batch, NEW_TOKENS, per_row
                )
            out[f"{rows}_rows/{'graphs' if graphs else 'eager_launch'}/peak_memory_gib"] = (
                torch.cuda.max_memory_allocated() / 2**30
            )
            del engine
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_server_args(ap)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"cuda": False, "message": "no CUDA device here: nothing to check (the CPU tests ran)"}))
        return
    started = time.monotonic()
    model_path = resolve_model_path(args.model, args.cache_dir)
    result: dict = {"cuda": True, "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    base = load_base_model(args.model, cache_dir=args.cache_dir, device="cuda", dtype="bfloat16")
    adapters = make_random_adapters(target_shapes(base.model), 16)
    prompts = chat_prompt_ids(base.tokenizer, 10)
    engine, registered = engine_for(base, adapters, 16, args.backend, graphs=False)
    result["syncs_and_kernels"] = check_syncs_and_kernels(engine, prompts, registered)
    del engine
    result["greedy"] = [greedy_agreement(args, model_path, dt, adapters[:8], prompts) for dt in ("float32", "bfloat16")]
    result["throughput_tok_s"] = throughput(args, base, adapters, prompts)
    result["seconds"] = time.monotonic() - started
    fp32, bf16 = result["greedy"]
    result["passed"] = (result["syncs_and_kernels"]["decode_step_syncs"] <= 1 and fp32["agreement"] == 1.0
                        and bf16["agreement"] >= 0.98)  # fmt: skip
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
