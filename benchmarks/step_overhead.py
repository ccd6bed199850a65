"""The decode step's host overhead: wall time of one engine decode step minus the time inside its forward pass.

A batch of --rows chat prompts (16 distinct adapters, or none with --base) is admitted and prefilled, then the
engine thread is left out: the script calls the engine's decode step itself, --steps times, timing the whole step
and the model forward inside it (`ModelRunner._forward`, the backbone's forward). What is left — staging inputs,
the LoRA mapping, sampling, detokenization, stop rules, emitting — is the host's share of a step; on a GPU it is
what the device would wait for. It runs on this tree and on older ones (it only uses `Engine._decode`,
`ModelRunner._forward` and the request types), so `git worktree` + this script compares before and after.

Usage: `python benchmarks/step_overhead.py [--rows 16] [--steps 40] [--base] [--backend eager]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/step_overhead.py` from anywhere

from adapters.tiers.registry import AdapterRegistry  # noqa: E402
from benchmarks.common import (  # noqa: E402
    add_server_args,
    chat_prompt_ids,
    make_random_adapters,
    target_shapes,
)

try:  # this tree's layout
    from server.engine.config import EngineConfig
    from server.engine.engine import Engine
    from server.engine.model import load_base_model
    from server.engine.request import AdapterUse, GenerationRequest
    from server.engine.sampling import SamplingParams
    from server.engine.threads import run_in_thread
except ImportError:  # the flat layout before the architecture issue (#13)
    from server.engine import AdapterUse, Engine, EngineConfig, GenerationRequest  # type: ignore
    from server.model import load_base_model  # type: ignore
    from server.sampling import SamplingParams  # type: ignore
    from server.threads import run_in_thread  # type: ignore


def measure(args) -> dict:
    base = load_base_model(args.model, cache_dir=args.cache_dir)
    prompts = chat_prompt_ids(base.tokenizer, args.rows)
    adapters = [] if args.base else make_random_adapters(target_shapes(base.model), 16)
    registry = AdapterRegistry()
    registered = [registry.add(f"a{i}", w) for i, w in enumerate(adapters)]
    config = EngineConfig(max_num_seqs=args.rows, max_model_len=max(map(len, prompts)) + args.steps + 32,
                          lora_pages=len(adapters) + 2, lora_page_size=16, max_lora_rank=16, lora_backend=args.backend,
                          auto_merge=False)
    engine = Engine(base, config)
    engine.warmup()
    params = SamplingParams(max_tokens=args.steps + 8, temperature=0.0, ignore_eos=True)
    for i, ids in enumerate(prompts):
        uses = [AdapterUse(registered[i % len(registered)])] if registered else []
        req = GenerationRequest(f"r{i}", ids, params, lambda out: None, uses)
        if hasattr(engine, "scheduler"):
            engine.scheduler.add(engine._sequence(req))
        else:
            engine._enqueue(req)
    runner, inside = engine.runner, []
    forward = runner._forward

    def timed_forward(*a, **kw):
        t0 = time.perf_counter()
        out = forward(*a, **kw)
        inside.append(time.perf_counter() - t0)
        return out

    runner._forward = timed_forward
    totals = []
    with torch.inference_mode():
        runner.enter_thread()
        engine._step()  # admission, prefill and a first decode step
        inside.clear()
        for _ in range(args.steps):
            t0 = time.perf_counter()
            engine._decode()
            totals.append(time.perf_counter() - t0)
    host = [t - f for t, f in zip(totals, inside, strict=True)]
    return {"rows": args.rows, "adapters": len(adapters), "steps": args.steps,
            "step_ms": 1e3 * statistics.median(totals), "forward_ms": 1e3 * statistics.median(inside),
            "host_overhead_ms": 1e3 * statistics.median(host)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_server_args(ap)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--base", action="store_true", help="no adapters")
    args = ap.parse_args()
    result = run_in_thread(measure, args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
