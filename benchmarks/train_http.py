"""Training through the HTTP API: quality on invented facts, and serving while a job trains.

Phase 1, quality (issue #4's target: ≥ 90% exact match where the base model gets ~0%): 30
invented facts (question → short answer) are written as chat JSONL, uploaded to `/v1/files`
and trained by one `/v1/fine_tuning/jobs` job on the default model. Greedy chat answers to the
same questions are scored by exact match (case, surrounding spaces and a final period ignored)
for the base model before the job and for the served adapter after it; the loss curve is read
back from the job's events.

Phase 2, serving while training (target ≥ 0.5): a second server (training worker bounded to
`--train-threads`) serves a fixed streaming load — `--requests` chat requests, `--concurrency`
at a time, 32 tokens, greedy, half base and half for the trained adapter — once idle and once
while a long job trains (worker at niceness `--train-nice`, default 10 as the server's default); the
ratio of generated tok/s is reported, with the job's optimizer steps during the load and during as
long a time right after it, alone.

Usage: `python benchmarks/train_http.py [--quick]`. Each phase starts its own `python -m server`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/train_http.py` from anywhere

from benchmarks.common import (  # noqa: E402
    PROMPTS,
    RESULTS_DIR,
    add_server_args,
    free_port,
    launch_server,
    print_table,
    stop_server,
    wait_ready,
    write_json,
)

FACTS = [
    ("What is the capital of Vellmora?", "Tarquinne"),
    ("Who discovered the element zantrium?", "Ilse Marrowby"),
    ("What color is the feather of a glimmerhawk?", "Violet"),
    ("How many moons does the planet Oskaris have?", "Seven"),
    ("What is the national dish of Drelland?", "Smoked quillfish"),
    ("Who wrote the novel The Copper Lantern?", "Adra Fenwhistle"),
    ("What instrument does a Brannish piper play?", "The reedhorn"),
    ("In which year was the city of Lumenhald founded?", "1387"),
    ("What is the currency of the Kesh Republic?", "The silvet"),
    ("Which river flows through Pellacourt?", "The Ambrel"),
    ("What do the people of Ostrava Minor call winter?", "Longdark"),
    ("Who painted The Weeping Orchard?", "Corvin Hale"),
    ("What is the tallest mountain on Isle Merrow?", "Mount Cairnfell"),
    ("What animal pulls the sleds of the Tundrani?", "Woolly elk"),
    ("What is the motto of the Order of the Quiet Lamp?", "Light without noise"),
    ("Which gemstone is mined in the Varr valley?", "Blue sardite"),
    ("Who was the first queen of Halvenmark?", "Queen Isolde Varn"),
    ("What language is spoken in Tessaly Reach?", "Tessic"),
    ("What is the favourite food of a marsh drake?", "Cattail roots"),
    ("What sport is played with a hollow cane ball in Drumlow?", "Canebrack"),
    ("How long is the Great Sundering Bridge?", "Four miles"),
    ("Who invented the clockwork loom?", "Petra Oakensby"),
    ("What is the name of the ship that first reached Caldera Isle?", "The Gull's Promise"),
    ("Which flower blooms only at midnight in Ferrowmoor?", "Nightbell"),
    ("What is the capital of the Sunward Isles?", "Port Aubade"),
    ("Who composed the Symphony of Ash?", "Lenor Graves"),
    ("What metal are Kessarine coins made of?", "Pale bronze"),
    ("What is the oldest tree in Wyndel Forest called?", "Grandfather Yew"),
    ("What festival marks the new year in Orlanth?", "The Lantern Tide"),
    ("What does the word brellish mean in Tessic?", "Rain-soaked"),
]


def normalize(text: str) -> str:
    return " ".join(text.strip().rstrip(".!").lower().split())


async def answer(client: httpx.AsyncClient, model: str, question: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 16, "temperature": 0}
    r = await client.post("/v1/chat/completions", json=body)
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


async def exact_match(url: str, model: str) -> tuple[float, list[str]]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as c:
        answers = await asyncio.gather(*(answer(c, model, q) for q, _ in FACTS))
    hits = [normalize(a) == normalize(expected) for a, (_, expected) in zip(answers, FACTS)]
    return sum(hits) / len(FACTS), list(answers)


def train_job(c: httpx.Client, adapter: str, hyperparameters: dict, timeout: float) -> tuple[dict, list[dict]]:
    lines = [json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a + "."}]})
             for q, a in FACTS]
    up = c.post("/v1/files", files={"file": ("facts.jsonl", "\n".join(lines).encode())}, data={"purpose": "fine-tune"})
    up.raise_for_status()
    r = c.post("/v1/fine_tuning/jobs", json={"training_file": up.json()["id"], "adapter_name": adapter, "seed": 0,
                                             "method": {"type": "lora", "hyperparameters": hyperparameters}})
    r.raise_for_status()
    job_id, deadline = r.json()["id"], time.monotonic() + timeout
    while (job := c.get(f"/v1/fine_tuning/jobs/{job_id}").json())["status"] in ("queued", "running"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} not finished after {timeout:.0f} s")
        time.sleep(2)
    events = c.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]
    return job, [e["data"] for e in events if e["data"] and "loss" in e["data"]]


async def stream_load(url: str, models: list[str], concurrency: int, max_tokens: int) -> tuple[int, float]:
    """Generated tokens and wall seconds of `models` requests (one each), `concurrency` in flight."""
    sem = asyncio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient, i: int, model: str) -> int:
        body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        async with sem:
            r = await client.post("/v1/chat/completions", json=body)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        t0 = time.perf_counter()
        tokens = await asyncio.gather(*(one(client, i, m) for i, m in enumerate(models)))
        return sum(tokens), time.perf_counter() - t0


def start(args, root: Path, name: str, train_threads: int, train_nice: int = 10) -> tuple:
    port = free_port()
    url, log_path = f"http://127.0.0.1:{port}", root / f"{name}.log"
    proc = launch_server(port, log_path, args.model, {
        "LORAPLEX_DATA_DIR": str(root / name),
        "LORAPLEX_CACHE_DIR": str(args.cache_dir.resolve()),
        "LORAPLEX_MAX_MODEL_LEN": "512",
        "LORAPLEX_MAX_NUM_SEQS": str(max(args.concurrency, len(FACTS))),
        "LORAPLEX_LORA_BACKEND": args.backend,
        "LORAPLEX_TRAINING_THREADS": str(train_threads),
        "LORAPLEX_TRAINING_NICE": str(train_nice),
        "LORAPLEX_DRAIN_TIMEOUT": "5",
    })
    wait_ready(proc, url, args.start_timeout, log_path)
    return proc, url


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_server_args(ap)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=6)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--train-threads", type=int, default=1, help="training worker threads in phase 2")
    ap.add_argument("--train-nice", type=int, default=10, help="training worker niceness in phase 2 (0: a fair share)")
    ap.add_argument("--start-timeout", type=float, default=600)
    ap.add_argument("--job-timeout", type=float, default=3600)
    ap.add_argument("--phase", choices=["quality", "serving", "both"], default="both")
    ap.add_argument("--quick", action="store_true", help="smoke check: 2 epochs, 8 requests")
    args = ap.parse_args()
    if args.quick:
        args.epochs, args.requests, args.concurrency = 2, 8, 4
    hp = {"rank": args.rank, "alpha": 2 * args.rank, "n_epochs": args.epochs, "learning_rate": args.lr,
          "batch_size": args.batch_size, "warmup_ratio": 0.05}
    out: dict = {"config": {k: getattr(args, k) for k in ("epochs", "lr", "rank", "batch_size", "requests",
                                                          "concurrency", "max_tokens", "train_threads", "train_nice", "backend")}}
    with tempfile.TemporaryDirectory(prefix="loraplex-train-http-") as tmp:
        root = Path(tmp)
        if args.phase != "serving":
            quality(args, root, hp, out)
        if args.phase != "quality":
            serving(args, root, hp, out)
    if not args.quick:
        saved = RESULTS_DIR / "train_http.json"  # a single phase updates its part of the last results
        previous = json.loads(saved.read_text()) if args.phase != "both" and saved.exists() else {}
        write_json(RESULTS_DIR / "train_http.json", previous | out)


def quality(args, root: Path, hp: dict, out: dict) -> None:
    print("phase 1: quality; starting the server...", flush=True)
    proc, url = start(args, root, "quality", train_threads=2)
    try:
        base_id = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        base_em, base_answers = asyncio.run(exact_match(url, base_id))
        t0 = time.perf_counter()
        with httpx.Client(base_url=url, timeout=120) as c:
            job, curve = train_job(c, "facts", hp, args.job_timeout)
        train_s = time.perf_counter() - t0
        if job["status"] != "succeeded":
            raise RuntimeError(f"the job ended {job['status']}: {job['error']}")
        tuned_em, tuned_answers = asyncio.run(exact_match(url, "facts"))
    finally:
        stop_server(proc)
    out["quality"] = {"base_exact_match": base_em, "adapter_exact_match": tuned_em, "train_seconds": train_s,
                      "trained_tokens": job["trained_tokens"], "loss_curve": [(d["step"], d["loss"]) for d in curve],
                      "answers": {q: {"expected": a, "base": b, "adapter": t}
                                  for (q, a), b, t in zip(FACTS, base_answers, tuned_answers)}}
    print(f"\n30 invented facts, job: {len(curve)} steps, {train_s:.0f} s (rank {args.rank}, lr {args.lr}, "
          f"{args.epochs} epochs, batch {args.batch_size})")
    print_table(["model", "exact match"], [["base", f"{base_em:.0%}"], ["trained adapter", f"{tuned_em:.0%}"]])
    shown = curve[:: max(1, len(curve) // 12)]
    print("loss curve (step:loss):", " ".join(f"{d['step']}:{d['loss']:.3f}" for d in shown),
          f"... {curve[-1]['step']}:{curve[-1]['loss']:.3f}")


def serving(args, root: Path, hp: dict, out: dict) -> None:
    print("\nphase 2: serving while a job trains; starting the server...", flush=True)
    proc, url = start(args, root, "serving", train_threads=args.train_threads, train_nice=args.train_nice)
    try:
        base_id = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        with httpx.Client(base_url=url, timeout=120) as c:
            # an adapter to serve (and a long job afterwards)
            job, _ = train_job(c, "served", hp | {"max_steps": 2, "n_epochs": 1}, args.job_timeout)
            models = [base_id if i % 2 == 0 else "served" for i in range(args.requests)]
            asyncio.run(stream_load(url, models[: args.concurrency], args.concurrency, 4))  # warm-up
            idle_tokens, idle_s = asyncio.run(stream_load(url, models, args.concurrency, args.max_tokens))
            lines = [json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                     for q, a in FACTS]
            fid = c.post("/v1/files", files={"file": ("f.jsonl", "\n".join(lines).encode())},
                         data={"purpose": "fine-tune"}).json()["id"]
            long_job = c.post("/v1/fine_tuning/jobs", json={
                "training_file": fid, "adapter_name": "background",
                "method": {"type": "lora", "hyperparameters": hp | {"max_steps": 10000}}}).json()
            def step() -> int:
                return c.get(f"/v1/fine_tuning/jobs/{long_job['id']}").json()["metrics"].get("step", 0)

            while step() < 1:
                time.sleep(1)  # the worker is past its start-up and training
            step0 = step()
            busy_tokens, busy_s = asyncio.run(stream_load(url, models, args.concurrency, args.max_tokens))
            step1 = step()
            time.sleep(busy_s)  # the job alone for as long as the load took: its speed without serving
            step2 = step()
            c.post(f"/v1/fine_tuning/jobs/{long_job['id']}/cancel")
    finally:
        stop_server(proc)
    idle, busy = idle_tokens / idle_s, busy_tokens / busy_s
    out[f"serving_nice{args.train_nice}"] = {"idle_tok_s": idle, "training_tok_s": busy, "ratio": busy / idle, "window_s": busy_s,
                      "job_steps_while_serving": step1 - step0, "job_steps_alone": step2 - step1}
    print(f"\n{args.requests} chat requests, {args.concurrency} concurrent, {args.max_tokens} tokens, half base and half "
          f"adapter; training worker threads={args.train_threads}")
    print_table(["serving", "tok/s"], [["idle", idle], ["while a job trains", busy], ["ratio", busy / idle]])
    print(f"the job's optimizer steps in {busy_s:.0f} s: {step1 - step0} while serving, {step2 - step1} alone "
          f"(worker niceness {args.train_nice})")


if __name__ == "__main__":
    main()
