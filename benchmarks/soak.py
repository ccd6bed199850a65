"""Soak: N minutes of mixed traffic, 8 requests at a time, with the server's resident memory sampled (issue #16).

The server (`python -m server`, a subprocess with its own defaults but for the limits below) serves the base model
and a few rank-16 adapters. Eight workers send requests back to back, each one drawn from a fixed, seeded mix:
completions and chat, streamed and not, base model, one adapter or a weighted composition of two, prompts of
different lengths (some a few hundred tokens), 8 to 128 new tokens, greedy and sampled, some with logprobs. The
server's resident set (VmRSS of its process) is read every `--sample` seconds. What it reports: the level after the
warm-up (`--settle` minutes, 2 by default), the highest and the last level after it, and the drift, the highest
after the warm-up over the level at its end (the target: within 10 %); requests done and failed.

    .venv/bin/python benchmarks/soak.py --minutes 20             # the issue's soak
    .venv/bin/python benchmarks/soak.py --minutes 3 --settle 1   # a quick check of the script
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/soak.py` from anywhere

from benchmarks.common import (  # noqa: E402
    PROMPTS,
    RESULTS_DIR,
    adapter_name,
    add_server_args,
    free_port,
    launch_server,
    make_random_adapters,
    print_table,
    resident,
    resolve_model_path,
    stop_server,
    wait_ready,
    write_json,
    write_peft_adapters,
)
from benchmarks.http_load import adapter_shapes  # noqa: E402


def request_mix(rng: random.Random, base: str, adapters: int) -> tuple[str, dict]:
    """One request of the mix: (path, body)."""
    kind = rng.random()
    if kind < 0.4:
        model, extra = base, {}
    elif kind < 0.85:
        model, extra = adapter_name(rng.randrange(adapters)), {}
    else:
        a, b = rng.sample(range(adapters), 2)
        model, extra = base, {"adapters": [{"name": adapter_name(a), "weight": 0.6}, {"name": adapter_name(b), "weight": 0.4}]}
    text = " ".join(rng.choice(PROMPTS) for _ in range(rng.choice([1, 1, 2, 8, 24])))  # up to a few hundred tokens
    body = {"model": model, "max_tokens": rng.choice([8, 16, 32, 64, 128]), "stream": rng.random() < 0.5,
            "temperature": rng.choice([0, 0.7]), "seed": rng.randrange(1000)} | extra  # fmt: skip
    if rng.random() < 0.5:
        body["messages"] = [{"role": "user", "content": text}]
        if rng.random() < 0.2:
            body |= {"logprobs": True, "top_logprobs": 3}
        return "/v1/chat/completions", body
    body["prompt"] = text
    if rng.random() < 0.2:
        body["logprobs"] = 3
    return "/v1/completions", body


async def one_request(client: httpx.AsyncClient, path: str, body: dict) -> str | None:
    """Send it; None, or what went wrong."""
    try:
        if not body["stream"]:
            r = await client.post(path, json=body)
            return None if r.status_code == 200 else f"HTTP {r.status_code}: {r.text[:200]}"
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                return f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            last = None
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    last = line[6:]
                    if last != "[DONE]" and "error" in json.loads(last):
                        return f"stream error: {last[:200]}"
            return None if last == "[DONE]" else "the stream ended without [DONE]"
    except httpx.HTTPError as e:
        return f"{e.__class__.__name__}: {e}"


async def soak(url: str, pid: int, base: str, args) -> dict:
    end = time.monotonic() + args.minutes * 60
    t0 = time.monotonic()
    samples: list[tuple[float, int]] = []
    done, errors = [0], []

    async def worker(w: int, client: httpx.AsyncClient) -> None:
        rng = random.Random(args.seed * 1000 + w)
        while time.monotonic() < end:
            error = await one_request(client, *request_mix(rng, base, args.adapters))
            done[0] += 1
            if error:
                errors.append(error)

    async def sampler() -> None:
        while time.monotonic() < end:
            r = resident(pid)
            samples.append((time.monotonic() - t0, r["VmRSS"]))
            print(f"  {samples[-1][0]:6.0f} s  {r['VmRSS'] / 2**30:.3f} GiB (anon {r['RssAnon'] / 2**30:.3f}, "
                  f"file {r['RssFile'] / 2**30:.3f})  {done[0]} requests, {len(errors)} failed", flush=True)  # fmt: skip
            await asyncio.sleep(args.sample)

    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout, limits=limits) as client:
        workers = [asyncio.create_task(worker(w, client)) for w in range(args.concurrency)]
        await sampler()
        for w in workers:  # the requests still running at the end are left, not waited for
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return {"samples": samples, "requests": done[0], "errors": errors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_server_args(ap)
    ap.add_argument("--minutes", type=float, default=20)
    ap.add_argument("--settle", type=float, default=2, help="minutes of warm-up before the level that drift is measured from")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--adapters", type=int, default=4, help="rank-16 adapters served")
    ap.add_argument("--sample", type=float, default=5, help="seconds between resident-memory samples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=300, help="seconds one request may take")
    ap.add_argument("--start-timeout", type=float, default=900)
    ap.add_argument("--env", action="append", default=[], help="extra server setting, NAME=VALUE (LORAPLEX_ implied)")
    ap.add_argument("--out", type=Path, default=None, help="JSON results (default: benchmarks/results/soak.json)")
    ap.add_argument("--log", type=Path, default=None, help="keep the server's log here")
    args = ap.parse_args()
    model_path = resolve_model_path(args.model, args.cache_dir)
    adapters = make_random_adapters(adapter_shapes(model_path), args.adapters)
    with tempfile.TemporaryDirectory(prefix="loraplex-soak-") as tmp:
        root = Path(tmp)
        write_peft_adapters(adapters, root / "adapters", base_model=model_path)
        port, log_path = free_port(), root / "server.log"
        url = f"http://127.0.0.1:{port}"
        env = {"LORAPLEX_ADAPTER_DIR": str(root / "adapters"), "LORAPLEX_DATA_DIR": str(root / "data"),
               "LORAPLEX_CACHE_DIR": str(args.cache_dir.resolve()), "LORAPLEX_LORA_BACKEND": args.backend,
               "LORAPLEX_MAX_MODEL_LEN": "1024", "LORAPLEX_MAX_NUM_SEQS": "16", "LORAPLEX_DRAIN_TIMEOUT": "5"}  # fmt: skip
        env |= {f"LORAPLEX_{k.split('=', 1)[0].upper()}": k.split("=", 1)[1] for k in args.env}
        print(f"starting the server on {url}...", flush=True)
        proc = launch_server(port, log_path, args.model, env)
        try:
            wait_ready(proc, url, args.start_timeout, log_path)
            base = next(m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"] if m["parent"] is None)
            ready_rss = resident(proc.pid)["VmRSS"]
            print(f"ready at {ready_rss / 2**30:.3f} GiB; {args.minutes:g} minutes, {args.concurrency} concurrent",
                  flush=True)  # fmt: skip
            result = asyncio.run(soak(url, proc.pid, base, args))
        finally:
            stop_server(proc)
            if args.log:
                args.log.write_bytes(log_path.read_bytes())
    samples = result["samples"]
    settled = [rss for t, rss in samples if t >= args.settle * 60]
    level = settled[0] if settled else samples[-1][1]
    peak, last = max(settled or [level]), samples[-1][1]
    drift = peak / level - 1
    gib = 2**30
    print_table(["ready GiB", f"at {args.settle:g} min GiB", "peak after GiB", "last GiB", "drift", "requests", "failed"],
                [[ready_rss / gib, level / gib, peak / gib, last / gib, f"{drift:+.1%}", result["requests"],
                  len(result["errors"])]])  # fmt: skip
    if result["errors"]:
        print("failures:", result["errors"][:5])
    config = {k: getattr(args, k) for k in ("minutes", "settle", "concurrency", "adapters", "backend", "seed", "env")}
    write_json(args.out or RESULTS_DIR / "soak.json", {"config": config, "ready_rss": ready_rss, "settled_rss": level,
               "peak_rss": peak, "last_rss": last, "drift": drift, "requests": result["requests"],
               "errors": result["errors"][:20], "samples": samples})  # fmt: skip
    if result["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
