"""Throughput with N adapters in rotation (default 1,000) against 16, with the host tier re-reading from disk.

The issue's target: throughput with 1,000 adapters in rotation ≥ 0.9 × with 16, in bounded memory.

Adapters: N seeded random rank-8 adapters (α = 16) on q_proj and v_proj only, so that 1,000 of
them fit on disk: 0.46 M parameters, ~1.9 MB fp32 each on the default model (30 layers, hidden
576, 3 KV heads), ~1.9 GB for 1,000. They are written as PEFT directories into a temporary
directory and registered lazily with `AdapterRegistry.add_stored` (weights stay on disk), with a
host budget of --host-mib (default 64 MiB, ~35 adapters): with N = 1,000 in round-robin every
request misses the host tier and its adapter is read again from disk (from the page cache, in
practice: the files were just written), and misses the 63-adapter device pool too.

Engine in process (no HTTP): 16 rows, 64 LoRA pages of 16 rank rows (a rank-8 adapter takes
one), auto-merge off. Workload: --requests (256) in rounds of 16 concurrent requests (the 16
chat prompts, 32 new tokens, greedy, EOS ignored), each round one batch of
`throughput.run_engine`; each request takes the next adapter in round-robin order and, as the
server does before submitting, resolves its weights with `registry.weights_of` (the disk read)
and pins them in `AdapterUse(adapter, 1.0, lora)`; that read is inside the measured wall time.
tok/s = generated tokens ÷ wall time of all rounds; one warm-up pass, then one measured pass
(`throughput.measure_interleaved`), the rotation going on across them (with N = 1,000 the measured pass uses
adapters the warm-up did not). The same workload runs with the first 16 adapters only, then with
N. Counters are those of the measured pass; peak RSS (ru_maxrss) is process-wide, so far.

Usage: `python benchmarks/rotation.py [--quick] [--backend eager] [--adapters N] [--host-mib M]`.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/rotation.py` from anywhere

from adapters.peft_io import describe_peft_adapter  # noqa: E402
from adapters.tiers.registry import Adapter, AdapterRegistry  # noqa: E402
from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    add_server_args,
    chat_prompt_ids,
    make_random_adapters,
    print_table,
    resolve_model_path,
    target_shapes,
    write_json,
    write_peft_adapters,
)
from benchmarks.throughput import Case, measure_interleaved, run_engine, warmed_engine  # noqa: E402
from server.engine.config import EngineConfig  # noqa: E402
from server.engine.engine import Engine  # noqa: E402
from server.engine.model import load_base_model  # noqa: E402
from server.engine.request import AdapterUse, GenerationRequest  # noqa: E402
from server.engine.threads import run_in_thread  # noqa: E402

BATCH = 16  # concurrent requests per round, and the smaller rotation
RANK, ALPHA, TARGETS = 8, 16, ("q_proj", "v_proj")
CHUNK = 50  # adapters made and written at a time, so that making them does not raise the peak RSS


class ServerSide:
    """The engine as run_engine drives it, but each request's adapters are resolved before submitting as the
    server does: `registry.weights_of` (a disk read if the host tier evicted them), pinned in the AdapterUse."""

    def __init__(self, engine: Engine, registry: AdapterRegistry):
        self.engine, self.registry, self.resolve_s = engine, registry, 0.0

    def submit(self, req: GenerationRequest) -> None:
        t0 = time.perf_counter()
        # as the server does (server.catalog.weights: a thread of its own for a host-tier miss)
        req.adapters = [AdapterUse(u.adapter, 1.0, run_in_thread(self.registry.weights_of, u.adapter))
                        for u in req.adapters]
        self.resolve_s += time.perf_counter() - t0
        self.engine.submit(req)

    def start(self) -> None:
        self.engine.start()

    def stop(self) -> None:
        self.engine.stop()


def register_adapters(shapes, n: int, directory: Path, registry: AdapterRegistry, model_path: str) -> list[Adapter]:
    """Write n random adapters as PEFT directories, CHUNK at a time, and register them with weights left on disk."""
    adapters = []
    for start in range(0, n, CHUNK):
        weights = make_random_adapters(shapes, min(CHUNK, n - start), RANK, ALPHA, seed=start)
        for path in write_peft_adapters(weights, directory / f"{start:04d}", base_model=model_path):
            size = sum(f.stat().st_size for f in path.iterdir())
            meta = dict(path=path, sha256=None, size_bytes=size, created_at=int(time.time()))
            adapters.append(registry.add_stored(f"rot-{len(adapters):04d}", 1, *describe_peft_adapter(path), **meta))
    return adapters


def counters(engine: Engine, registry: AdapterRegistry) -> dict[str, int]:
    r, p = registry, engine.pool
    return dict(
        host_loads=r.host_loads, host_evictions=r.host_evictions, pool_loads=p.loads, pool_evictions=p.evictions
    )


def workload(engine, registry, adapters: list[Adapter], prompts, new_tokens: int, rounds: int, stats: dict):
    """One pass: `rounds` batches of len(prompts) requests, adapters taken round-robin; returns tok/s."""
    rotation = itertools.count()

    def once() -> float:
        side, before = ServerSide(engine, registry), counters(engine, registry)
        t0 = time.perf_counter()
        for _ in range(rounds):
            run_engine(side, prompts, new_tokens, [adapters[next(rotation) % len(adapters)] for _ in prompts])
        wall = time.perf_counter() - t0
        stats.update({k: v - before[k] for k, v in counters(engine, registry).items()})
        stats.update(wall_s=wall, weights_of_s=side.resolve_s)
        return rounds * len(prompts) * new_tokens / wall

    return once


# table column → results key
COLUMNS = {"tok/s": "tok_per_s", f"÷ {BATCH}": "ratio", "host loads": "host_loads", "host evictions": "host_evictions",
           "pool loads": "pool_loads", "pool evictions": "pool_evictions", "weights_of s": "weights_of_s",
           "peak RSS MiB": "peak_rss_mib", "host resident MiB": "host_resident_mib"}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_server_args(ap)
    ap.add_argument("--adapters", type=int, default=1000, help="adapters in the large rotation (N ≥ 16)")
    ap.add_argument("--requests", type=int, default=256, help="requests per pass, in rounds of 16")
    ap.add_argument("--host-mib", type=float, default=64, help="host-tier budget for adapter weights, MiB")
    ap.add_argument("--quick", action="store_true", help="smoke check: N=40, 32 requests, 8 tokens, no JSON")
    ap.add_argument("--out", type=Path, default=None, help="JSON results (default: benchmarks/results/rotation.json)")
    args = ap.parse_args()
    new_tokens = 32
    if args.quick:
        args.adapters, args.requests, new_tokens = 40, 32, 8
    if args.adapters < BATCH:
        ap.error(f"--adapters must be at least {BATCH}")
    out_path = args.out or (None if args.quick else RESULTS_DIR / "rotation.json")
    rounds = max(1, args.requests // BATCH)

    base = run_in_thread(load_base_model, args.model, cache_dir=args.cache_dir)  # see server/engine/threads.py
    model_path = resolve_model_path(args.model, args.cache_dir)
    shapes = target_shapes(base.model, TARGETS)
    prompts = chat_prompt_ids(base.tokenizer, BATCH)
    max_len = max(map(len, prompts)) + new_tokens + 16
    config = EngineConfig(max_num_seqs=BATCH, max_model_len=max_len, lora_pages=64, lora_page_size=16,
                          auto_merge=False, lora_backend=args.backend)  # fmt: skip
    engine = run_in_thread(warmed_engine, base, config)
    registry = AdapterRegistry(host_bytes=int(args.host_mib * 2**20))

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="loraplex-rotation-") as tmp:
        print(f"writing {args.adapters} rank-{RANK} adapters to {tmp}...", flush=True)
        adapters = run_in_thread(register_adapters, shapes, args.adapters, Path(tmp), registry, model_path)
        disk_mb = sum(a.size_bytes for a in adapters) / 1e6
        print(f"  {disk_mb:.0f} MB on disk ({disk_mb / len(adapters):.2f} MB each)", flush=True)
        for n in (BATCH, args.adapters):
            stats: dict = {}
            run = workload(engine, registry, adapters[:n], prompts, new_tokens, rounds, stats)
            tps = measure_interleaved({"run": Case(f"{n} adapters in rotation", run)}, repeats=1)["run"]
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
            results[str(n)] = dict(tok_per_s=tps["median"], runs=tps["runs"], **stats, peak_rss_mib=rss,
                                   host_resident_mib=registry.resident_bytes / 2**20)  # fmt: skip

    for r in results.values():
        r["ratio"] = r["tok_per_s"] / results[str(BATCH)]["tok_per_s"]
    ratio = results[str(args.adapters)]["ratio"]
    print(f"\n{rounds} rounds × {BATCH} requests × {new_tokens} new tokens, greedy, backend={args.backend}, "
          f"host budget {args.host_mib:g} MiB, rank-{RANK} adapters on {', '.join(TARGETS)}")  # fmt: skip
    print_table(["adapters", *COLUMNS], [[n, *(r[k] for k in COLUMNS.values())] for n, r in results.items()])
    print(f"target {args.adapters}/{BATCH} ≥ 0.9: {ratio:.2f} ({'met' if ratio >= 0.9 else 'NOT met'})")

    if out_path:
        setup = dict(model=args.model or "SmolLM2-135M-Instruct", backend=args.backend, adapters=args.adapters,
                     requests=rounds * BATCH, concurrency=BATCH, new_tokens=new_tokens, host_mib=args.host_mib,
                     rank=RANK, target_modules=list(TARGETS), adapter_disk_mb=disk_mb / len(adapters),
                     torch=torch.__version__, threads=torch.get_num_threads(),
                     machine=platform.processor() or platform.machine())  # fmt: skip
        write_json(out_path, {"config": setup, "results": results, "ratio": ratio})


if __name__ == "__main__":
    main()
