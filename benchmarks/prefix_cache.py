"""What prefix caching buys where real traffic repeats itself: a shared system prompt, and conversations resent whole.

Two servers (`python -m server`, 16 random rank-16 adapters loaded from --adapter-dir), one with prefix caching
(the default) and one without (`LORAPLEX_PREFIX_CACHING=false`), both up for the whole run; the cases alternate
between them round by round, so this machine's drift falls on both alike.

    chat:   --requests streaming chat requests, --concurrency at a time, spread over --adapters adapters, each
            with the same ~300-token system prompt and its own question; --max-tokens tokens each. Reported: TTFT
            p50 and tok/s, cached ÷ uncached (targets: TTFT ≤ 0.4, throughput ≥ 1.3×).
    turns:  --conversations conversations of 4 turns, each turn resending the whole conversation so far (the
            system prompt, every question and the answers the server gave) plus a new question. Reported: TTFT
            p50 of each turn, and turn 4 ÷ turn 1 with caching (target ≤ 1.2).

Usage: `python benchmarks/prefix_cache.py [--rounds 2] [--quick]`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/prefix_cache.py` from anywhere

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
    wait_ready,
    write_json,
    write_peft_adapters,
)
from benchmarks.http_load import Result, adapter_shapes, percentile, stream_chat  # noqa: E402

SYSTEM = (
    "You are Loraplex Assistant, a careful and friendly helper for the staff of a small public library. You answer "
    "questions about opening hours, borrowing rules, late fees, events, the reading room, the computer corner and "
    "the children's section. Opening hours are nine to six on weekdays and ten to four on Saturdays; the library is "
    "closed on Sundays and public holidays. Members may borrow up to twelve items at a time for three weeks, renew "
    "twice online or at the desk, and reserve up to five items. Late fees are twenty cents a day per item, capped "
    "at five euros, and are waived for children under twelve. The reading room is silent; phones must be on mute. "
    "The computer corner has eight machines, booked in one-hour slots. Events are listed on the board by the "
    "entrance and on the website. Answer in at most three short sentences, politely, without inventing rules that "
    "are not stated here, and say when a question is outside what you know."
)
FOLLOW_UPS = ["Can you say that more briefly?", "And what about on Saturdays?", "Thanks. One last thing: fees?"]


async def run_chat(url: str, models: list[str], max_tokens: int, concurrency: int) -> tuple[list[Result], float]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def one(i: int, model: str) -> Result:
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
            async with sem:
                return await stream_chat(client, model, messages, max_tokens)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(i, m) for i, m in enumerate(models)))
        return list(results), time.perf_counter() - t0


async def run_turns(url: str, base: str, conversations: int, max_tokens: int) -> list[list[float]]:
    """TTFTs per turn (turn index → one per conversation), the conversations concurrently."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def conversation(i: int) -> list[float]:
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
            ttfts = []
            for turn in range(4):
                r = await stream_chat(client, base, messages, max_tokens)
                if r.error:
                    raise RuntimeError(r.error)
                ttfts.append(r.ttft)
                messages += [{"role": "assistant", "content": r.text},
                             {"role": "user", "content": FOLLOW_UPS[min(turn, len(FOLLOW_UPS) - 1)]}]  # fmt: skip
            return ttfts

        per_conv = await asyncio.gather(*(conversation(i) for i in range(conversations)))
    return [[c[t] for c in per_conv] for t in range(4)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_server_args(ap)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2, help="rounds of every case on both servers, in turn")
    ap.add_argument("--quick", action="store_true", help="smoke check: 8 requests, 4 concurrent, 2 conversations")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.requests, args.concurrency, args.max_tokens, args.conversations, args.rounds = 8, 4, 8, 2, 1
    out_path = args.out or (None if args.quick else RESULTS_DIR / "prefix_cache.json")
    model_path = resolve_model_path(args.model, args.cache_dir)
    adapters = make_random_adapters(adapter_shapes(model_path), args.adapters)
    with tempfile.TemporaryDirectory(prefix="loraplex-prefix-") as tmp:
        root = Path(tmp)
        write_peft_adapters(adapters, root / "adapters", base_model=model_path)
        servers = {}
        try:
            for name, caching in (("cached", "true"), ("uncached", "false")):
                port = free_port()
                env = {"LORAPLEX_ADAPTER_DIR": str(root / "adapters"), "LORAPLEX_DATA_DIR": str(root / name),
                       "LORAPLEX_CACHE_DIR": str(args.cache_dir.resolve()), "LORAPLEX_MAX_NUM_SEQS": str(args.concurrency),
                       "LORAPLEX_MAX_MODEL_LEN": "1024", "LORAPLEX_MAX_WAITING": str(args.requests * 2),
                       "LORAPLEX_LORA_PAGES": str(args.adapters + 1), "LORAPLEX_MAX_LORA_RANK": "16",
                       "LORAPLEX_LORA_BACKEND": args.backend, "LORAPLEX_DRAIN_TIMEOUT": "5",
                       "LORAPLEX_PREFIX_CACHING": caching}  # fmt: skip
                log = root / f"{name}.log"
                servers[name] = (launch_server(port, log, args.model, env), f"http://127.0.0.1:{port}", log)
            for proc, url, log in servers.values():
                wait_ready(proc, url, 900, log)
            base = next(m["id"] for m in httpx.get(f"{servers['cached'][1]}/v1/models").json()["data"]
                        if m["parent"] is None)  # fmt: skip
            models = [adapter_name(i % args.adapters) for i in range(args.requests)]
            chat: dict[str, list[dict]] = {"cached": [], "uncached": []}
            turns: dict[str, list[list[list[float]]]] = {"cached": [], "uncached": []}
            for r in range(args.rounds):
                for name, (_, url, _) in servers.items():
                    asyncio.run(run_chat(url, models[: args.concurrency], args.max_tokens, args.concurrency))  # warm
                    results, wall = asyncio.run(run_chat(url, models, args.max_tokens, args.concurrency))
                    errors = [x.error for x in results if x.error]
                    if errors:
                        raise RuntimeError(f"{name}: {errors[:3]}")
                    ttfts = [x.ttft for x in results]
                    chat[name].append({"ttft_p50": percentile(ttfts, 50), "tok_per_s": sum(x.tokens for x in results) / wall})
                    turns[name].append(asyncio.run(run_turns(url, base, args.conversations, args.max_tokens)))
                    print(f"round {r + 1}: {name}: chat TTFT p50 {chat[name][-1]['ttft_p50'] * 1e3:.0f} ms, "
                          f"{chat[name][-1]['tok_per_s']:.1f} tok/s", flush=True)  # fmt: skip
        finally:
            for proc, _, _ in servers.values():
                stop_server(proc)

    med = lambda rows, key: statistics.median(x[key] for x in rows)  # noqa: E731
    ttft = {n: med(chat[n], "ttft_p50") for n in chat}
    tps = {n: med(chat[n], "tok_per_s") for n in chat}
    turn_p50 = {n: [statistics.median(v for rnd in turns[n] for v in rnd[t]) for t in range(4)] for n in turns}
    print(f"\nchat: {args.requests} requests, {args.concurrency} concurrent, ~300-token shared system prompt, "
          f"{args.adapters} adapters, {args.max_tokens} tokens; median of {args.rounds} rounds")  # fmt: skip
    print_table(["case", "TTFT p50 ms", "tok/s"], [[n, ttft[n] * 1e3, tps[n]] for n in chat]
                + [["cached ÷ uncached", ttft["cached"] / ttft["uncached"], tps["cached"] / tps["uncached"]]])
    print(f"\nturns: {args.conversations} conversations × 4 turns, each resent whole; TTFT p50 ms per turn")
    print_table(["case", "turn 1", "turn 2", "turn 3", "turn 4", "turn 4 ÷ turn 1"],
                [[n, *(v * 1e3 for v in turn_p50[n]), turn_p50[n][3] / turn_p50[n][0]] for n in turn_p50])
    if out_path:
        write_json(out_path, {"config": vars(args) | {"cache_dir": str(args.cache_dir), "out": None},
                              "chat": chat, "turns": turns, "ttft_ratio": ttft["cached"] / ttft["uncached"],
                              "throughput_ratio": tps["cached"] / tps["uncached"],
                              "turn4_over_turn1": {n: turn_p50[n][3] / turn_p50[n][0] for n in turn_p50}})


if __name__ == "__main__":
    main()
