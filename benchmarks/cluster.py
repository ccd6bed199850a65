"""Scale-out on Ray Serve against one process: overhead, adapter affinity, time to ready, resident memory.

What it measures, each server a real `python -m server` subprocess on 127.0.0.1 (the default model, the LoRA backend
of `--backend`, eager by default so that replicas start in seconds):

1. Overhead: the traffic of `http_load.py` (64 streaming chat requests, 16 at a time, 32 tokens each, greedy,
   `ignore_eos`; half base, half over 16 rank-16 adapters) on plain `loraplex serve` and on
   `loraplex serve --replicas 1` (one engine replica behind the Ray Serve ingress), with the same engine settings and
   torch threads, both up and their loads alternated; tok/s and latencies, and Ray ÷ plain (target >= 0.9).
2. Affinity: 2 replicas, 24 adapters, 192 requests with Zipf(1.1) popularity, 8 at a time, 16 tokens; a request is a
   hit when the replica that served it (`x-loraplex-replica`) already held its adapter (the pools hold them all, so
   nothing is evicted). With adapter affinity (multiplexed model ids) and with Serve's default router
   (`LORAPLEX_ADAPTER_AFFINITY=false`): hit rate, adapters loaded per replica, tok/s.
3. Time to ready: the command's start to `/health/ready` 200, plain and for 1 and 2 replicas.
4. Resident memory (VmRSS) of every process under the command: engine replicas, the ingress, Serve's controller and
   proxy, Ray's own daemons (gcs_server, raylet, agents, idle workers), the command (Ray's driver) itself.

Two replicas on this 2-core machine share the same two cores: they cannot show throughput scaling, and this script
does not claim any. Every server is stopped with SIGTERM (a Ray-backed one stops its Ray instance). Usage:
`python benchmarks/cluster.py [--quick]`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/cluster.py` from anywhere

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
    wait_ready,
    write_json,
    write_peft_adapters,
)
from benchmarks.http_load import adapter_shapes, run_load, summarize_group  # noqa: E402

LATENCY_KEYS = ["tok_per_s", "ttft_p50", "ttft_p99", "itl_p50", "itl_p99"]
ROLES = [  # what a process under the command is, by its title
    ("ServeReplica:loraplex:LoraplexEngine", "engine replica"),
    ("ServeReplica:loraplex:LoraplexIngress", "ingress"),
    ("ServeController", "Serve controller"),
    ("ProxyActor", "Serve proxy"),
    ("gcs_server", "Ray GCS"),
    ("raylet", "Ray raylet"),
    ("DashboardAgent", "Ray agents"),
    ("RuntimeEnvAgent", "Ray agents"),
    ("ray::IDLE", "Ray idle workers"),
]


def process_tree(root: int) -> list[int]:
    """`root` and every process below it."""
    children = defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children[int(fields[1])].append(int(stat.parent.name))
        except (OSError, IndexError):
            continue
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def resident_by_role(root: int) -> dict[str, list[float]]:
    """{role: [MiB of each process]} of the processes under `root` (the command itself is "driver")."""
    roles: dict[str, list[float]] = defaultdict(list)
    for pid in process_tree(root):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            rss = resident(pid)["VmRSS"] / 2**20
        except (OSError, KeyError):  # gone, or a zombie
            continue
        role = "driver (loraplex serve)" if pid == root else next((r for key, r in ROLES if key in title), "other")
        roles[role].append(rss)
    return dict(roles)


def start(args, root: Path, name: str, adapter_dir: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str, float]:
    """A server with this benchmark's limits (LORAPLEX_* variables plus `env`); (process, url, seconds to ready)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = root / f"{name}.log"
    t0 = time.perf_counter()
    proc = launch_server(port, log, args.model, {
        "LORAPLEX_ADAPTER_DIR": str(adapter_dir), "LORAPLEX_DATA_DIR": str(root / f"{name}-data"),
        "LORAPLEX_CACHE_DIR": str(args.cache_dir.resolve()), "LORAPLEX_MAX_MODEL_LEN": "512",
        "LORAPLEX_MAX_LORA_RANK": "16", "LORAPLEX_LORA_BACKEND": args.backend, "LORAPLEX_DRAIN_TIMEOUT": "5",
    } | env | (dict(kv.split("=", 1) for kv in args.ray_env) if "LORAPLEX_REPLICAS" in env else {}))  # fmt: skip
    print(f"starting {name} on {url}...", flush=True)
    wait_ready(proc, url, args.start_timeout, log)
    return proc, url, time.perf_counter() - t0


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, with time for a Ray-backed server to stop its replicas and its Ray instance."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(180)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def overhead(args, root: Path, adapter_dir: Path) -> dict:
    """The http_load traffic on plain and on one Ray replica: both up, their loads alternated (this machine's load
    from other work drifts; alternating spreads it over both), the ratio taken per pair."""
    engine = {"LORAPLEX_MAX_NUM_SEQS": str(args.concurrency), "LORAPLEX_MAX_WAITING": str(4 * args.requests),
              "LORAPLEX_LORA_PAGES": str(args.adapters + 1), "LORAPLEX_THREADS": str(args.threads)}  # fmt: skip
    servers = {}
    try:
        for name, env in (("plain", {}), ("ray-1", {"LORAPLEX_REPLICAS": "1", "LORAPLEX_REPLICA_NUM_CPUS": str(args.threads)})):
            servers[name] = start(args, root, name, adapter_dir, engine | env)
        out: dict = {name: {"ready_s": ready, "runs": []} for name, (_, _, ready) in servers.items()}
        for _, url, _ in servers.values():  # warm-up wave
            models = traffic(url, args)
            asyncio.run(run_load(url, models[: args.concurrency], args.max_tokens, args.concurrency, args.timeout))
        for _ in range(args.repeats):
            for name, (_, url, _) in servers.items():
                results, wall = asyncio.run(run_load(url, traffic(url, args), args.max_tokens, args.concurrency,
                                                     args.timeout))  # fmt: skip
                errors = [r.error for r in results if r.error]
                if errors:
                    raise RuntimeError(f"{name}: {len(errors)} requests failed: {errors[:3]}")
                out[name]["runs"].append(summarize_group(results, wall) | {"load_avg": os.getloadavg()[0]})
        for name, (proc, _, _) in servers.items():
            out[name]["memory_mib"] = resident_by_role(proc.pid)
    finally:
        for proc, _, _ in servers.values():
            stop(proc)
    pairs = [r["tok_per_s"] / p["tok_per_s"] for p, r in zip(out["plain"]["runs"], out["ray-1"]["runs"])]
    out["ratios"] = pairs
    for name in ("plain", "ray-1"):
        out[name]["median"] = {k: statistics.median(r[k] for r in out[name]["runs"]) for k in LATENCY_KEYS}
    return out


def traffic(url: str, args) -> list[str]:
    """http_load's: even requests for the base model, odd ones over the adapters in turn."""
    base = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    return [base if i % 2 == 0 else adapter_name((i // 2) % args.adapters) for i in range(args.requests)]


async def zipf_load(url: str, names: list[str], n: int, concurrency: int, max_tokens: int, seed: int = 0):
    """(adapter, replica) of each of `n` requests with Zipf(1.1) popularity over `names`, and the wall time."""
    traffic = random.Random(seed).choices(names, [1 / (k + 1) ** 1.1 for k in range(len(names))], k=n)
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:

        async def one(i: int, name: str) -> tuple[str, str, int]:
            body = {"model": name, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}  # fmt: skip
            async with sem:
                r = await client.post("/v1/chat/completions", json=body)
            r.raise_for_status()
            return name, r.headers["x-loraplex-replica"], r.json()["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        served = await asyncio.gather(*(one(i, name) for i, name in enumerate(traffic)))
        return served, time.perf_counter() - t0


def affinity(args, root: Path, adapter_dir: Path) -> dict:
    names = [adapter_name(i) for i in range(args.zipf_adapters)]
    engine = {"LORAPLEX_REPLICAS": "2", "LORAPLEX_MAX_NUM_SEQS": str(args.zipf_concurrency),
              "LORAPLEX_LORA_PAGES": str(args.zipf_adapters + 1), "LORAPLEX_THREADS": "1"}  # fmt: skip
    out = {}
    for name, on in (("affinity", "true"), ("serve-default", "false")):
        proc, url, ready = start(args, root, f"ray-2-{name}", adapter_dir, engine | {"LORAPLEX_ADAPTER_AFFINITY": on})
        try:
            served, wall = asyncio.run(zipf_load(url, names, args.zipf_requests, args.zipf_concurrency, args.zipf_tokens))
            memory = resident_by_role(proc.pid)
        finally:
            stop(proc)
        held: dict[str, set[str]] = defaultdict(set)
        hits = 0
        for adapter, replica, _ in served:
            hits += adapter in held[replica]
            held[replica].add(adapter)
        out[name] = {"ready_s": ready, "hit_rate": hits / len(served), "requests": len(served),
                     "adapters_loaded_per_replica": sorted(len(v) for v in held.values()),
                     "tok_per_s": sum(t for *_, t in served) / wall, "memory_mib": memory}  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_server_args(ap)
    ap.set_defaults(backend="eager")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5, help="measured loads per server, alternated (medians compared)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the engine, plain and Ray alike")
    ap.add_argument("--zipf-adapters", type=int, default=24)
    ap.add_argument("--zipf-requests", type=int, default=192)
    ap.add_argument("--zipf-concurrency", type=int, default=8)
    ap.add_argument("--zipf-tokens", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=300, help="seconds one request may take")
    ap.add_argument("--start-timeout", type=float, default=900, help="seconds a server may take to be ready")
    ap.add_argument("--quick", action="store_true", help="smoke check at toy sizes (no JSON unless --out)")
    ap.add_argument("--out", type=Path, default=None, help="JSON results (default: benchmarks/results/cluster.json)")
    ap.add_argument("--overhead-only", action="store_true", help="part 1 only (with part 3's plain and 1 replica)")
    ap.add_argument("--ray-env", action="append", default=[], metavar="NAME=VALUE",
                    help="an environment variable of the Ray-backed servers only (e.g. a RAY_SERVE_* option)")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.concurrency, args.max_tokens, args.adapters, args.repeats = 8, 4, 8, 4, 1
        args.zipf_adapters, args.zipf_requests, args.zipf_concurrency, args.zipf_tokens = 4, 16, 4, 4
    out_path = args.out or (None if args.quick else RESULTS_DIR / "cluster.json")

    model_path = resolve_model_path(args.model, args.cache_dir)
    adapters = make_random_adapters(adapter_shapes(model_path), max(args.adapters, args.zipf_adapters))
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="loraplex-cluster-") as tmp:
        root = Path(tmp)
        write_peft_adapters(adapters, root / "adapters", base_model=model_path)
        over = overhead(args, root, root / "adapters")
        aff = {} if args.overhead_only else affinity(args, root, root / "adapters")

    plain, ray1 = over["plain"]["median"], over["ray-1"]["median"]
    print(f"\n1. Overhead: {args.requests} streaming chat requests, {args.concurrency} concurrent, {args.max_tokens} "
          f"tokens, half over {args.adapters} adapters; median of {args.repeats} alternated loads; "
          f"backend={args.backend}, {args.threads} torch threads; load average {load_before:.1f} at the start")  # fmt: skip
    rows = [[name, g["tok_per_s"], *(g[k] * 1000 for k in LATENCY_KEYS[1:])]
            for name, g in (("plain", plain), ("Ray, 1 replica", ray1))]  # fmt: skip
    rows.append(["Ray ÷ plain (tok/s: median of the pairs)", statistics.median(over["ratios"]),
                 *(ray1[k] / plain[k] for k in LATENCY_KEYS[1:])])  # fmt: skip
    print_table(["server", "tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms"], rows)
    print("tok/s ratio of each pair: " + ", ".join(f"{r:.2f}" for r in over["ratios"]))

    if not aff:
        return
    print(f"\n2. Affinity: 2 replicas, {args.zipf_adapters} adapters, {args.zipf_requests} requests Zipf(1.1), "
          f"{args.zipf_concurrency} concurrent, {args.zipf_tokens} tokens")  # fmt: skip
    print_table(["router", "hit rate", "adapters loaded per replica", "tok/s"],
                [[n, r["hit_rate"], r["adapters_loaded_per_replica"], r["tok_per_s"]] for n, r in aff.items()])

    print("\n3. Time to ready (command start → /health/ready 200)")
    print_table(["server", "seconds"], [["plain", over["plain"]["ready_s"]], ["Ray, 1 replica", over["ray-1"]["ready_s"]],
                                        ["Ray, 2 replicas", aff["affinity"]["ready_s"]]])

    print("\n4. Resident memory (VmRSS MiB, once ready and after the load)")
    memory = [("plain", over["plain"]["memory_mib"]), ("Ray, 1 replica", over["ray-1"]["memory_mib"]),
              ("Ray, 2 replicas", aff["affinity"]["memory_mib"])]  # fmt: skip
    roles = sorted({role for _, m in memory for role in m})
    print_table(["process", *(n for n, _ in memory)],
                [[role, *(" + ".join(f"{v:.0f}" for v in m.get(role, [])) or "—" for _, m in memory)] for role in roles]
                + [["total", *(f"{sum(sum(v) for v in m.values()):.0f}" for _, m in memory)]])

    if out_path:
        config = {k: getattr(args, k) for k in ("requests", "concurrency", "max_tokens", "adapters", "repeats",
                                                "threads", "backend", "zipf_adapters", "zipf_requests",
                                                "zipf_concurrency", "zipf_tokens")}  # fmt: skip
        write_json(out_path, {"config": config, "load_avg_at_start": load_before, "overhead": over,
                              "ray_over_plain_tok_s": statistics.median(over["ratios"]), "affinity": aff})  # fmt: skip


if __name__ == "__main__":
    main()
