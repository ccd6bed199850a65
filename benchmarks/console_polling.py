"""What an open web console costs the engine: its /metrics polling, with the server idle and under load.

The console's server page polls /metrics once a second while it is shown (`server/http/ui/js/serverpage.js`); its
other pages poll nothing. Against a `python -m server` subprocess on 127.0.0.1 (the default model), four cases:

    none      nothing but the benchmark's own requests
    again     the same once more: the control, whose ratio to `none` shows what this machine's noise alone gives
    poller    a plain client GETting /metrics once a second: what the page asks of the server, nothing else
    console   the real console: headless Chromium (Debian's, as the browser tests use) on /ui/#/server

and two measurements:

    idle      the server process's CPU seconds per second over --idle-seconds in each case; the time one /metrics
              answer takes (median of 200 back to back) and the server CPU time it costs (their total / 200)
    load      generated tokens/s of a fixed streaming load (--requests chat requests, --concurrency in flight,
              --max-tokens each, greedy, ignore_eos, base model) in each case; --rounds rounds with the cases
              interleaved (this machine's drift falls on all alike), each ratio paired within its round

On this 2-core machine the console case also runs the browser (drawing its charts) beside the server; the
poller case isolates what the server itself pays. Usage: `.venv/bin/python benchmarks/console_polling.py [--quick]`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/console_polling.py` from anywhere

from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    add_server_args,
    free_port,
    launch_server,
    print_table,
    resolve_model_path,
    stop_server,
    wait_ready,
    write_json,
)
from benchmarks.http_load import run_load  # noqa: E402
from tests.ui.conftest import chromium_path  # noqa: E402

CASES = ("none", "again", "poller", "console")
SCRAPES = 200
POLL_STARTS = """() => performance.getEntriesByType("resource").filter((e) => e.name.endsWith("/metrics")).length"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat, fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Poller:
    """GET /metrics once a second in a thread, as the console's server page does."""

    def __init__(self, url: str):
        self.url, self.polls, self._stop = url, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as c:
            while not self._stop.is_set():
                start = time.monotonic()
                c.get(f"{self.url}/metrics").raise_for_status()
                self.polls += 1
                self._stop.wait(max(0.0, 1.0 - (time.monotonic() - start)))

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


class Console:
    """Headless Chromium showing the console's server page, driven from a thread of its own (Playwright's sync
    API), so the benchmark's asyncio load runs meanwhile in the main thread."""

    def __init__(self, url: str):
        self.url, self.polls = url, 0
        self._opened, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        from playwright.sync_api import sync_playwright

        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox", "--disable-gpu"])
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                page.goto(f"{self.url}/ui/#/server")
                page.wait_for_selector("#sv-charts .chart[data-points]")
                self._opened.set()
                while not self._stop.wait(0.2):
                    pass
                self.polls = page.evaluate(POLL_STARTS)
                browser.close()
        except BaseException as e:  # reported by the main thread
            self.error = e
            self._opened.set()

    def __enter__(self) -> Console:
        self._thread.start()
        self._opened.wait(120)
        if self.error:
            raise self.error
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)


def case(name: str, url: str):
    return {"none": _Nothing, "again": _Nothing, "poller": Poller, "console": Console}[name](url)


class _Nothing:
    polls = 0

    def __init__(self, url: str):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def measure_idle(url: str, pid: int, seconds: float) -> dict:
    out = {}
    for name in CASES:
        with case(name, url) as c:
            time.sleep(1.5)  # past the console's first draw
            t0, cpu0 = time.monotonic(), cpu_seconds(pid)
            time.sleep(seconds)
            cpu = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
        out[name] = {"server_cpu_per_s": cpu, "polls": c.polls}
        print(f"idle, {name}: server CPU {100 * cpu:.2f} % of a core, {c.polls} polls", flush=True)
    with httpx.Client(timeout=10) as client:
        times = []
        cpu0 = cpu_seconds(pid)
        for _ in range(SCRAPES):  # back to back: the server's CPU per answer, far above this machine's noise
            t = time.perf_counter()
            client.get(f"{url}/metrics").raise_for_status()
            times.append(time.perf_counter() - t)
        out["metrics_cpu_ms"] = 1000 * (cpu_seconds(pid) - cpu0) / SCRAPES
    out["metrics_answer_ms"] = 1000 * statistics.median(times)
    return out


def measure_load(url: str, model: str, args) -> dict:
    runs: dict[str, list[float]] = {name: [] for name in CASES}
    asyncio.run(run_load(url, [model] * args.concurrency, args.max_tokens, args.concurrency, 120))  # warm-up
    for r in range(args.rounds):
        order = CASES[r % len(CASES):] + CASES[: r % len(CASES)]  # each case goes first in turn
        for name in order:
            with case(name, url):
                results, wall = asyncio.run(run_load(url, [model] * args.requests, args.max_tokens, args.concurrency, 300))
            errors = [x.error for x in results if x.error]
            if errors:
                raise RuntimeError(f"{name}: {errors[:3]}")
            runs[name].append(sum(x.tokens for x in results) / wall)
            print(f"load, round {r + 1}, {name}: {runs[name][-1]:.1f} tokens/s", flush=True)
    ratios = {name: [a / b for a, b in zip(runs[name], runs["none"])] for name in CASES[1:]}
    return {"tokens_per_s": runs, "median": {k: statistics.median(v) for k, v in runs.items()}, "ratios": ratios,
            "paired_ratio": {k: statistics.median(v) for k, v in ratios.items()}}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_server_args(ap)
    ap.add_argument("--idle-seconds", type=float, default=30.0)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="toy sizes: checks that the script works")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.idle_seconds, args.rounds, args.requests, args.max_tokens = 3.0, 1, 4, 4
    model_path = resolve_model_path(args.model, args.cache_dir)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        proc = launch_server(port, log, model_path, {
            "LORAPLEX_DATA_DIR": str(Path(tmp) / "data"), "LORAPLEX_CACHE_DIR": str(args.cache_dir.resolve()),
            "LORAPLEX_MAX_NUM_SEQS": str(args.concurrency), "LORAPLEX_MAX_MODEL_LEN": "512",
            "LORAPLEX_LORA_BACKEND": args.backend, "LORAPLEX_DRAIN_TIMEOUT": "5",
        })  # fmt: skip
        try:
            wait_ready(proc, url, 600, log)
            model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
            idle = measure_idle(url, proc.pid, args.idle_seconds)
            load = measure_load(url, model, args)
        finally:
            stop_server(proc)
    print(f"\nIdle server, {args.idle_seconds:.0f} s per case. One /metrics answer: {idle['metrics_answer_ms']:.2f} ms "
          f"(median of {SCRAPES}), {idle['metrics_cpu_ms']:.2f} ms of the server's CPU\n")  # fmt: skip
    print_table(["case", "server CPU (% of a core)", "/metrics polls"],
                [[n, 100 * idle[n]["server_cpu_per_s"], idle[n]["polls"]] for n in CASES])  # fmt: skip
    print(f"\nUnder load: {args.requests} chat requests x {args.max_tokens} tokens, {args.concurrency} in flight, "
          f"{args.rounds} rounds\n")  # fmt: skip
    spread = {k: f"{min(v):.2f}–{max(v):.2f}" for k, v in load["ratios"].items()}
    print_table(["case", "tokens/s (median)", "runs", "ratio to none (paired median)", "paired ratios (min–max)"],
                [[n, load["median"][n], ", ".join(f"{v:.0f}" for v in load["tokens_per_s"][n]),
                  load["paired_ratio"].get(n, 1.0), spread.get(n, "—")] for n in CASES])  # fmt: skip
    if not args.quick or args.out:
        write_json(args.out or RESULTS_DIR / "console_polling.json", {"args": vars(args) | {"cache_dir": str(args.cache_dir), "out": None},
                                                                      "idle": idle, "load": load})  # fmt: skip


if __name__ == "__main__":
    main()
