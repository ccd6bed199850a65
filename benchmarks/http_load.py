"""Latency and throughput of the real server under concurrent streaming chat traffic.

What it measures: a `python -m server` subprocess on 127.0.0.1 with 16 random rank-16 adapters
(q,k,v,o,gate,up,down; loaded from --adapter-dir at start) receives 64 streaming
`/v1/chat/completions` requests, 16 in flight at a time, half for the base model and half spread
over the 16 adapters; 32 tokens each, greedy, `ignore_eos`. From the arrival times of the SSE
chunks that carry text it reports, as vLLM's `benchmark_serving` does:

    TTFT  time to first token: request sent → first chunk with content
    ITL   inter-token latency: gap between consecutive content chunks of one request
    tok/s completion tokens (from the final `usage` chunk) ÷ wall time of the whole load

with p50/p99 for all requests, base-only and adapter requests, and the adapter ÷ base ratios. Then, with the
server stopped, the same engine in this process runs batches of --concurrency of the same requests (the same mix
of base and adapters, chat-templated, all queued at once: `throughput.run_engine`): the HTTP path's tok/s ÷ that
batch tok/s is how much of what the engine can do the served path delivers (target ≥ 0.8).
The client runs in this process and the server in its own, so they do not share a GIL. One
warm-up wave (one request per concurrency slot, not measured) precedes the load. Every wait is
bounded; the server is stopped (SIGTERM) at the end. Usage: `python benchmarks/http_load.py [--quick]`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/http_load.py` from anywhere

from benchmarks.common import (  # noqa: E402
    PROMPTS,
    RESULTS_DIR,
    adapter_name,
    add_server_args,
    free_port,
    launch_server,
    make_random_adapters,
    print_table,
    resolve_model_path,
    stop_server,
    target_shapes,
    wait_ready,
    write_json,
    write_peft_adapters,
)


@dataclass
class Result:
    """One request as the client saw it."""

    model: str
    start: float
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk with content
    tokens: int = 0
    text: str = ""
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.chunk_times)]


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated q-th percentile (0..100), None for no values."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def adapter_shapes(model_path: str) -> dict[str, tuple[int, int]]:
    """The target layers' shapes from the model's config alone (a meta-device model, no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    return target_shapes(model)


def start_server(args, adapter_dir: Path, data_dir: Path, port: int, log_path: Path) -> subprocess.Popen:
    """`python -m server` with this benchmark's limits (through LORAPLEX_* variables)."""
    return launch_server(port, log_path, args.model, {
        "LORAPLEX_ADAPTER_DIR": str(adapter_dir),
        "LORAPLEX_DATA_DIR": str(data_dir),
        "LORAPLEX_CACHE_DIR": str(args.cache_dir.resolve()),
        "LORAPLEX_MAX_NUM_SEQS": str(args.concurrency),
        "LORAPLEX_MAX_MODEL_LEN": "512",
        "LORAPLEX_MAX_WAITING": str(args.requests + args.concurrency),
        "LORAPLEX_LORA_PAGES": str(args.adapters + 1),  # one page per rank-16 adapter, plus the zero page
        "LORAPLEX_MAX_LORA_RANK": "16",
        "LORAPLEX_LORA_BACKEND": args.backend,
        "LORAPLEX_DRAIN_TIMEOUT": "5",
    })


async def stream_chat(client: httpx.AsyncClient, model: str, prompt: str | list[dict], max_tokens: int) -> Result:
    """One streaming chat request: `prompt` is the user message, or the whole list of messages."""
    body = {
        "model": model,
        "messages": prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result = Result(model=model, start=time.perf_counter())
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                now, data = time.perf_counter(), line[len("data: ") :]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = chunk["error"].get("message", str(chunk["error"]))
                    break
                content = "".join(c.get("delta", {}).get("content") or "" for c in chunk.get("choices", []))
                if content:
                    result.chunk_times.append(now)
                    result.text += content
                if chunk.get("usage"):
                    result.tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        result.error = f"{e.__class__.__name__}: {e}"
    return result


async def run_load(
    url: str, models: list[str], max_tokens: int, concurrency: int, timeout: float
) -> tuple[list[Result], float]:
    """Send one request per entry of `models`, `concurrency` at a time; (results, wall seconds)."""
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:

        async def one(i: int, model: str) -> Result:
            async with sem:
                return await stream_chat(client, model, PROMPTS[i % len(PROMPTS)], max_tokens)

        t0 = time.perf_counter()
        tasks = [one(i, m) for i, m in enumerate(models)]
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout * (len(models) / concurrency + 1))
        return list(results), time.perf_counter() - t0


def summarize_group(results: list[Result], wall: float) -> dict:
    ttfts = [r.ttft for r in results if r.ttft is not None]
    itls = [d for r in results for d in r.itls]
    tokens = sum(r.tokens for r in results)
    return {
        "requests": len(results),
        "tokens": tokens,
        "content_chunks": sum(len(r.chunk_times) for r in results),
        "tok_per_s": tokens / wall,
        "ttft_p50": percentile(ttfts, 50),
        "ttft_p99": percentile(ttfts, 99),
        "itl_p50": percentile(itls, 50),
        "itl_p99": percentile(itls, 99),
    }


def engine_batch_tok_s(args, models: list[str], base_id: str, adapters) -> float:
    """Median tok/s of 3 batches of `models`' requests on the engine in this process, as the server ran them."""
    from adapters.tiers.registry import AdapterRegistry
    from benchmarks.common import chat_prompt_ids
    from benchmarks.throughput import run_engine, warmed_engine
    from server.engine.config import EngineConfig
    from server.engine.model import load_base_model
    from server.engine.threads import run_in_thread

    base = run_in_thread(load_base_model, args.model, cache_dir=args.cache_dir)
    registry = AdapterRegistry()
    by_name = {adapter_name(i): registry.add(adapter_name(i), w) for i, w in enumerate(adapters)}
    config = EngineConfig(max_num_seqs=args.concurrency, max_model_len=512, lora_pages=args.adapters + 1,
                          lora_page_size=16, max_lora_rank=16, lora_backend=args.backend)  # as start_server's
    engine = run_in_thread(warmed_engine, base, config)
    prompts = chat_prompt_ids(base.tokenizer, len(models))
    rows = [None if m == base_id else by_name[m] for m in models]
    run_engine(engine, prompts, args.max_tokens, rows)  # warm
    return statistics.median(run_engine(engine, prompts, args.max_tokens, rows) for _ in range(3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_server_args(ap)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=16, help="rank-16 adapters registered and used")
    ap.add_argument("--timeout", type=float, default=300, help="seconds one request may take")
    ap.add_argument("--start-timeout", type=float, default=600, help="seconds the server may take to be ready")
    ap.add_argument("--quick", action="store_true", help="smoke check: 8 requests, 4 concurrent, 8 tokens, 4 adapters")
    ap.add_argument("--out", type=Path, default=None, help="JSON results (default: benchmarks/results/http_load.json)")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.concurrency, args.max_tokens, args.adapters = 8, 4, 8, 4
    out_path = args.out or (None if args.quick else RESULTS_DIR / "http_load.json")

    model_path = resolve_model_path(args.model, args.cache_dir)
    adapters = make_random_adapters(adapter_shapes(model_path), args.adapters)

    with tempfile.TemporaryDirectory(prefix="loraplex-http-") as tmp:
        root = Path(tmp)
        write_peft_adapters(adapters, root / "adapters", base_model=model_path)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = root / "server.log"
        print(f"starting the server on {url} with {args.adapters} adapters...", flush=True)
        proc = start_server(args, root / "adapters", root / "data", port, log_path)
        try:
            wait_ready(proc, url, args.start_timeout, log_path)
            served = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
            base_id = next(m["id"] for m in served if m["parent"] is None)
            # even requests: base; odd requests: the adapters in turn
            models = [base_id if i % 2 == 0 else adapter_name((i // 2) % args.adapters) for i in range(args.requests)]
            missing = set(models) - {m["id"] for m in served}
            if missing:
                raise RuntimeError(f"the server does not serve {sorted(missing)}:\n{log_path.read_text()[-3000:]}")
            print("warm-up wave...", flush=True)
            asyncio.run(run_load(url, models[: args.concurrency], args.max_tokens, args.concurrency, args.timeout))
            print(f"load: {args.requests} requests, {args.concurrency} at a time...", flush=True)
            results, wall = asyncio.run(run_load(url, models, args.max_tokens, args.concurrency, args.timeout))
        finally:
            stop_server(proc)

    batch_tok_s = engine_batch_tok_s(args, models[: args.concurrency], base_id, adapters)
    errors = [f"{r.model}: {r.error}" for r in results if r.error]
    short = [r for r in results if not r.error and r.tokens != args.max_tokens]
    groups = {
        "all": summarize_group(results, wall),
        "base": summarize_group([r for r in results if r.model == base_id], wall),
        "adapters": summarize_group([r for r in results if r.model != base_id], wall),
    }
    keys = ["ttft_p50", "ttft_p99", "itl_p50", "itl_p99"]
    b, a = groups["base"], groups["adapters"]
    ratios = {k: a[k] / b[k] if a[k] and b[k] else None for k in keys}  # latency of adapter requests ÷ base

    def ms(v: float | None) -> object:
        return "—" if v is None else v * 1000

    print(
        f"\n{args.requests} streaming chat requests, {args.concurrency} concurrent, {args.max_tokens} tokens, "
        f"greedy, ignore_eos; {args.adapters} rank-16 adapters; backend={args.backend}; wall {wall:.1f} s"
    )
    rows = [[name, g["requests"], g["tokens"], *(ms(g[k]) for k in keys), g["tok_per_s"]] for name, g in groups.items()]
    rows.append(["adapters ÷ base", "", "", *("—" if ratios[k] is None else ratios[k] for k in keys), ""])
    print_table(["group", "n", "tokens", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "tok/s"], rows)
    served = groups["all"]["tok_per_s"]
    print(f"\nHTTP closed loop {served:.1f} tok/s ÷ engine batch of {args.concurrency} {batch_tok_s:.1f} tok/s = "
          f"{served / batch_tok_s:.2f}")
    if errors or short:
        print(f"{len(errors)} failed, {len(short)} with fewer than {args.max_tokens} tokens: {errors[:5]}")

    if out_path:
        config = {k: getattr(args, k) for k in ("requests", "concurrency", "max_tokens", "adapters", "backend")}
        summary = {"wall_s": wall, "groups": groups, "ratios_adapters_over_base": ratios, "errors": errors,
                   "engine_batch_tok_per_s": batch_tok_s, "http_over_engine_batch": served / batch_tok_s}
        write_json(out_path, {"config": config | {"model": base_id}} | summary)
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
