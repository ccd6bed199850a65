"""The LoRA ops side by side at the engine's shapes: which one each step should use.

One projection of SmolLM2-135M (in 576, out 1536: `up_proj`, the widest), rank-16 pages. For each shape the ops that
can compute it run interleaved, `--repeats` rounds, every op once per round; the table shows each op's median time.

- decode: N rows over u adapters (N/u rows each), one token a row: `lora_gathered` (each row reads its own pages,
  Punica's BGMV) against `lora_grouped` (each adapter's pages read once for its rows, S-LoRA/Punica's grouping) and,
  all rows on one adapter, `lora_segmented` (two plain GEMMs). With decode grouping on, the engine groups a decode
  step when rows outnumber their page sets two to one (`ModelRunner._stage_lora`); `decode_grouping=auto` leaves it
  off for the compiled backend on the CPU, where this table shows the gathered op the faster at every shape (the
  engine then gathers over the rows adapter by adapter: each adapter's pages come from memory once per step, which a
  table of ops on hot caches cannot show; see RESULTS.md, 64 rows).
- prefill: n prompts of T tokens over u adapters: `lora_segmented` (each prompt's pages read once for its T tokens)
  against `lora_grouped` over the prompts' tokens. The engine's prefill stays segmented.

Each op is compiled (`torch.compile`, dynamic=False, as the engine's decode graphs are) unless `--eager`. Every op's
value is checked against `lora_reference` first. Usage: `python benchmarks/lora_ops.py [--repeats 20] [--eager]`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/lora_ops.py` from anywhere

from adapters.ops import lora_gathered, lora_grouped, lora_reference, lora_segmented  # noqa: E402
from benchmarks.common import RESULTS_DIR, print_table, write_json  # noqa: E402

IN, OUT, RANK = 576, 1536, 16
OPS = ("gathered", "segmented", "grouped")


def groups(rows: list[int], u: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`lora_grouped`'s slots (u, m) and inverse (n,) for rows[i] = row i's adapter."""
    members = [[i for i, a in enumerate(rows) if a == g] for g in range(u)]
    m = max(map(len, members))
    slots, inverse = torch.full((u, m), n, dtype=torch.long), torch.empty(n, dtype=torch.long)
    for g, rs in enumerate(members):
        slots[g, : len(rs)] = torch.tensor(rs)
        inverse[rs] = g * m + torch.arange(len(rs))
    return slots, inverse


def cases(pool_a: torch.Tensor, pool_b: torch.Tensor) -> list[tuple[str, dict, torch.Tensor]]:
    """(shape, {op name: (op, its arguments)}, each row's adapter) for the decode and prefill shapes."""
    out = []
    one = torch.ones(1, 1, RANK)
    for n, u in [(16, 16), (16, 8), (16, 4), (16, 1), (64, 16), (64, 4), (64, 1)]:
        x, rows = torch.randn(n, IN), [i % u for i in range(n)]
        pages, weights = torch.tensor(rows)[:, None], one.expand(n, 1, RANK)
        slots, inverse = groups(rows, u, n)
        gp, gw = torch.arange(u)[:, None], one.expand(u, 1, RANK)
        ops = {"gathered": (lora_gathered, (x, pool_a, pool_b, pages, weights)),
               "grouped": (lora_grouped, (x, pool_a, pool_b, gp, gw, slots, inverse))}  # fmt: skip
        if u == 1:  # every row on the same pages: one segment of all rows (two plain GEMMs)
            ops["segmented"] = (lora_segmented, (x, pool_a, pool_b, gp, gw))
        out.append((f"decode {n} rows / {u} adapters", ops, torch.tensor(rows)))
    for n, t, u in [(16, 32, 4), (16, 32, 16), (8, 128, 2), (16, 8, 4), (16, 2, 4)]:
        x, prompts = torch.randn(n * t, IN), [i % u for i in range(n)]
        pages, weights = torch.tensor(prompts)[:, None], one.expand(n, 1, RANK)
        tokens = [a for a in prompts for _ in range(t)]
        slots, inverse = groups(tokens, u, n * t)
        gp, gw = torch.arange(u)[:, None], one.expand(u, 1, RANK)
        out.append((f"prefill {n} prompts × {t} tokens / {u} adapters", {
            "segmented": (lora_segmented, (x, pool_a, pool_b, pages, weights)),
            "grouped": (lora_grouped, (x, pool_a, pool_b, gp, gw, slots, inverse)),
        }, torch.tensor(tokens)))  # fmt: skip
    return out


def check(shape: str, ops: dict, row_pages: torch.Tensor, pool_a: torch.Tensor, pool_b: torch.Tensor) -> None:
    """Every op against the plain loop (`lora_reference`) on the first rows, each row on its own adapter's page."""
    x = next(iter(ops.values()))[1][0]
    ref = lora_reference(x[:8], pool_a, pool_b, row_pages[:8, None], torch.ones(8, 1, RANK))
    for name, (op, op_args) in ops.items():
        got = op(*op_args)[:8]
        assert torch.allclose(got, ref, rtol=1e-3, atol=1e-3), (shape, name, (got - ref).abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--eager", action="store_true", help="the ops as written, not compiled")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "lora_ops.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch._dynamo.config.recompile_limit = 64  # every shape of every op compiled (the default 8 would leave some eager)
    pool_a, pool_b = torch.randn(64, RANK, IN) / IN**0.5, torch.randn(64, RANK, OUT) * 0.01
    results, table = {}, []
    with torch.inference_mode():
        for shape, ops, row_pages in cases(pool_a, pool_b):
            check(shape, ops, row_pages, pool_a, pool_b)
            calls = {}
            for name, (op, op_args) in ops.items():
                fn = op if args.eager else torch.compile(op, dynamic=False)
                calls[name] = lambda fn=fn, op_args=op_args: fn(*op_args)
                calls[name]()  # compile, and one untimed run
            times: dict[str, list[float]] = {name: [] for name in calls}
            for _ in range(args.repeats):
                for name, call in calls.items():
                    t = time.perf_counter()
                    call()
                    times[name].append(time.perf_counter() - t)
            med = {name: statistics.median(v) * 1e3 for name, v in times.items()}
            results[shape] = {
                name: {"median_ms": m, "runs_ms": [t * 1e3 for t in times[name]]} for name, m in med.items()
            }
            cells = [f"{med[name]:.3f}" if name in med else "—" for name in OPS]
            table.append([shape, *cells, min(med, key=med.get)])
    print_table(["shape", *(f"{name} ms" for name in OPS), "fastest"], table)
    write_json(args.out, {"compiled": not args.eager, "repeats": args.repeats, "in": IN, "out": OUT, "rank": RANK,
                          "threads": torch.get_num_threads(), "cases": results})  # fmt: skip


if __name__ == "__main__":
    main()
