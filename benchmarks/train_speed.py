"""Training speed and memory of our LoRA trainer, against PEFT + transformers `Trainer` and full fine-tuning.

Issue #4's targets: training tokens/s of `adapters.training.trainer.train` (method "lora") ≥ 1 × PEFT + HF `Trainer` on the
same job, and peak RSS of LoRA training ≤ 0.5 × full fine-tuning. The job, the same in every run: the default model
(SmolLM2-135M-Instruct, fp32), a rank-16 LoRA (α = 32) on q, k, v, o, gate, up and down, --examples synthetic
prompt/completion pairs (seeded, 30–150 tokens each, written to a JSONL file), batch 8, --steps (10) optimizer steps,
AdamW at 2e-4 with a cosine schedule and 3% warm-up, gradient clipping at 1.0, no evaluation, no checkpoints.

Each run is its own subprocess (same thread count), so that its peak RSS (`ru_maxrss`, model load included) is its
own; (a)–(d) run --rounds (2) times, interleaved (a b c d a b c d), and their rows average the rounds' tok/s (this
machine drifts by 10–15 % over minutes, which once turned (a)/(c) from 1.15 into 0.88 between two runs in a row):

    (a) ours: `adapters.training.trainer.train(TrainConfig(method="lora", ...))`
    (b) PEFT `get_peft_model` + HF `Trainer`: default random sampler, a collator that pads each batch to its longest
        row with labels from `adapters.training.data.tokenize` (prompt tokens masked exactly as ours), `remove_unused_columns=
        False`, `report_to=[]`, no logging, eval or saving; the Trainer's default optimizer (fused torch AdamW)
    (c) the same on our trainer's very batches: the rows in the order of its first epoch (`adapters.training.collate.
        plan_epoch`: shuffled, grouped by length) and `train_sampling_strategy="sequential"`; so (a) and (c) differ
        only in the implementation (HF's own `group_by_length` sampler would put the longest batch first, untimed)
    (d) full fine-tuning: every parameter trainable, plain `torch.optim.AdamW`, our trainer's own batches and loss
        (`adapters.training.collate`: `read_rows`, `plan_epoch`, `collate`; `adapters.training.loss.loss_sum`) and allocator setting (`adapters.cpu.allocator`), so it differs
        from (a) only in what is trained
    (e), (f) = (a), (d) with gradient checkpointing, once, for --memory-steps (8) steps: less activation memory
    (g) the floor: the model loaded and one no-grad forward pass (so that every weight page is resident)

Tokens are counted from each run's own batches (the collate call of each step): "input" = non-pad tokens, "loss" =
tokens that carry loss (completion tokens). Steps 1 and 2 (start-up, first allocations) are not timed: tok/s = the
tokens of steps 3..N ÷ the wall time from the end of step 2 to the end of step N. (a), (c), (d), (e) and (f) train on
the very same batches. "other CPU" is the CPU time of every other process on the machine during the timed steps
(from /proc/stat), in % of one core: above ~10 % the run was disturbed and its speed should not be trusted.

Usage: `python benchmarks/train_speed.py [--quick] [--steps N] [--threads T] [--skip RUN ...]`. `--quick` trains a
tiny random Llama (SmolLM2's tokenizer) for 4 steps to check that the script works; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/train_speed.py` from anywhere

from benchmarks.common import (  # noqa: E402
    DEFAULT_CACHE_DIR,
    RESULTS_DIR,
    TARGETS,
    print_table,
    resolve_model_path,
    write_json,
)

RANK, ALPHA, LR, WARMUP_RATIO, MAX_LENGTH, SEED = 16, 32.0, 2e-4, 0.03, 1024, 0
UNTIMED_STEPS = 2
CHILD_TIMEOUT = 1200.0  # seconds one run may take
DISTURBED_PCT = 10.0  # other processes' CPU during the timed steps, % of one core, above which a run is flagged
RUNS = {
    "ours": "(a) ours: adapters.training.trainer, LoRA",
    "peft": "(b) PEFT + HF Trainer, random sampler",
    "peft_same": "(c) PEFT + HF Trainer, our batches",
    "full": "(d) full fine-tuning, torch AdamW",
    "ours_gc": "(e) = (a) + gradient checkpointing",
    "full_gc": "(f) = (d) + gradient checkpointing",
    "floor": "(g) model loaded + one forward",
}
SPEED_RUNS = ("ours", "peft", "peft_same", "full")  # run --rounds times, interleaved
MEMORY_RUNS = ("ours_gc", "full_gc")  # run once, for --memory-steps

WORDS = {
    "adj": "quiet bright heavy simple careful ancient modern small large rapid gentle curious formal noisy early "
    "late narrow broad cold warm",
    "noun": "river engine garden library market teacher signal window harbor bridge letter forest planet museum "
    "kitchen budget report station village machine",
    "verb": "moves past|describes|protects|follows|replaces|measures|connects to|supports|changes|reaches|"
    "explains|carries",
    "prep": "near|behind|across|inside|beyond|under|beside|around",
}
TASKS = [
    "Summarize the following notes in your own words.",
    "Rewrite this passage in a formal tone.",
    "List the main points of the text below.",
    "Explain what the following paragraph says to a new reader.",
    "Continue the story that starts below.",
]


def sentence(rng: random.Random) -> str:
    """One ~10-word sentence from the word lists."""
    pick = {k: v.split("|" if "|" in v else " ") for k, v in WORDS.items()}
    a1, a2 = rng.choice(pick["adj"]), rng.choice(pick["adj"])
    n1, n2, n3 = (rng.choice(pick["noun"]) for _ in range(3))
    return f"The {a1} {n1} {rng.choice(pick['verb'])} the {a2} {n2} {rng.choice(pick['prep'])} the {n3}."


def synthetic_examples(n: int, seed: int = SEED) -> list[dict]:
    """n prompt/completion pairs: an instruction and 1–4 sentences, answered by 1–8 sentences (~30–150 tokens)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = " ".join(sentence(rng) for _ in range(rng.randint(1, 4)))
        answer = " ".join(sentence(rng) for _ in range(rng.randint(1, 8)))
        out.append({"prompt": f"{rng.choice(TASKS)}\n\n{text}\n\nAnswer: ", "completion": answer})
    return out


def make_tiny_model(directory: Path, tokenizer_dir: str) -> str:
    """--quick: a random 2-layer Llama with the default model's tokenizer, saved as an HF directory."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


# --- the runs, each in its own process ----------------------------------------------------------------------------


class Clock:
    """Step-end stamps: wall time, this process's CPU time and the whole machine's busy CPU time."""

    def __init__(self):
        self.stamps: list[tuple[float, float, float]] = []

    def stamp(self) -> None:
        self.stamps.append((time.perf_counter(), *cpu_seconds()))


def cpu_seconds() -> tuple[float, float]:
    """(this process's CPU seconds, every process's busy CPU seconds since boot from /proc/stat: user, nice,
    system, irq, softirq, steal): their difference over an interval is the CPU the rest of the machine used."""
    own = os.times()
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]
    return own.user + own.system, (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def batch_counts(rows_ids: list[list[int]], rows_labels: list[list[int]]) -> tuple[int, int, int]:
    """(non-pad tokens, loss tokens, padded positions) of one batch padded to its longest row."""
    width = max(map(len, rows_ids))
    return sum(map(len, rows_ids)), sum(sum(x != -100 for x in lab) for lab in rows_labels), width * len(rows_ids)


def run_ours(args, counts: list, clock: Clock, checkpointing: bool) -> None:
    import adapters.training.trainer as trainer

    collate = trainer.collate

    def counting_collate(rows, pad_id, device):
        counts.append(batch_counts([r.input_ids for r in rows], [r.labels for r in rows]))
        return collate(rows, pad_id, device)

    trainer.collate = counting_collate  # train_step looks it up in the module at each call

    def on_event(event: dict) -> None:
        if event["type"] == "step":
            clock.stamp()

    with tempfile.TemporaryDirectory() as out:
        cfg = trainer.TrainConfig(model=args.model_path, train_file=args.data, out_dir=Path(out) / "adapter",
                                  method="lora", rank=RANK, alpha=ALPHA, target_modules=list(TARGETS),
                                  max_steps=args.steps, learning_rate=LR, batch_size=args.batch_size,
                                  warmup_ratio=WARMUP_RATIO, max_length=MAX_LENGTH, seed=SEED,
                                  gradient_checkpointing=checkpointing)  # fmt: skip
        result = trainer.train(cfg, on_event=on_event)
    if result.trained_tokens != sum(c[1] for c in counts):
        raise RuntimeError(f"loss tokens counted {sum(c[1] for c in counts)} != trainer's {result.trained_tokens}")


def run_peft(args, counts: list, clock: Clock, same_batches: bool) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from adapters.training.data import IGNORE, read_jsonl, tokenize

    tok = AutoTokenizer.from_pretrained(args.model_path)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    features = []
    for ex in read_jsonl(args.data):
        ids, labels = tokenize(tok, ex, MAX_LENGTH)
        features.append({"input_ids": ids, "labels": [IGNORE] + labels[1:]})  # as adapters.training.trainer.read_rows
    if same_batches:  # our trainer's first epoch, in order: a sequential sampler then makes exactly its batches
        from adapters.training.collate import plan_epoch

        plan = plan_epoch([len(f["input_ids"]) for f in features], args.batch_size, SEED, 0, group=True)
        features = [features[i] for step in plan for i in step]

    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        counts.append(batch_counts([f["input_ids"] for f in batch], [f["labels"] for f in batch]))
        width = max(len(f["input_ids"]) for f in batch)
        out = {
            "input_ids": torch.full((len(batch), width), pad_id),
            "attention_mask": torch.zeros(len(batch), width, dtype=torch.long),
            "labels": torch.full((len(batch), width), IGNORE),
        }
        for i, f in enumerate(batch):
            n = len(f["input_ids"])
            out["input_ids"][i, :n], out["labels"][i, :n] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"])
            out["attention_mask"][i, :n] = 1
        return out

    class Stamps(TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):
            clock.stamp()

    model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32)
    model.config.use_cache = False
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=args.steps, learning_rate=LR,
            lr_scheduler_type="cosine", warmup_steps=math.ceil(WARMUP_RATIO * args.steps), weight_decay=0.0,
            max_grad_norm=1.0, logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[],
            remove_unused_columns=False, use_cpu=True, seed=SEED, disable_tqdm=True, dataloader_num_workers=0,
            train_sampling_strategy="sequential" if same_batches else "random",
        )  # fmt: skip
        Trainer(model=model, args=targs, train_dataset=features, data_collator=collate, callbacks=[Stamps()]).train()
    del counts[args.steps :]  # the dataloader fetches one batch ahead


def run_full(args, counts: list, clock: Clock, checkpointing: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapters.cpu.allocator import return_freed_memory, trim_freed_memory
    from adapters.training.collate import collate, plan_epoch, read_rows
    from adapters.training.loss import loss_sum

    if checkpointing:  # the allocator policies of adapters.training.trainer, for the same memory behaviour
        return_freed_memory()
    tok = AutoTokenizer.from_pretrained(args.model_path)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    rows = read_rows(args.data, tok, MAX_LENGTH)
    model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32)
    model.config.use_cache = False
    if checkpointing:  # as adapters.training.trainer enables it
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    lengths = [len(r.input_ids) for r in rows]
    plan: list[list[int]] = []
    epoch = 0
    for _ in range(args.steps):
        if not plan:  # the trainer's own order: the same batches as (a)
            plan, epoch = plan_epoch(lengths, args.batch_size, SEED, epoch, group=True), epoch + 1
        batch = [rows[i] for i in plan.pop(0)]
        counts.append(batch_counts([r.input_ids for r in batch], [r.labels for r in batch]))
        n_loss = sum(r.n_loss for r in batch)
        (loss_sum(model, *collate(batch, pad_id, torch.device("cpu"))) / max(n_loss, 1)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        trim_freed_memory()
        clock.stamp()


def run_floor(args) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32)
    with torch.no_grad():
        model(input_ids=torch.ones(1, 16, dtype=torch.long), use_cache=False)


def child(args) -> None:
    """One run; prints its measurements as the last line of stdout, in JSON."""
    torch.set_num_threads(args.threads)
    counts: list[tuple[int, int, int]] = []
    clock = Clock()
    t0 = time.perf_counter()
    if args.child in ("ours", "ours_gc"):
        run_ours(args, counts, clock, checkpointing=args.child == "ours_gc")
    elif args.child in ("peft", "peft_same"):
        run_peft(args, counts, clock, same_batches=args.child == "peft_same")
    elif args.child in ("full", "full_gc"):
        run_full(args, counts, clock, checkpointing=args.child == "full_gc")
    else:
        run_floor(args)
    out = {"peak_rss_mib": peak_rss_mib(), "wall_s": time.perf_counter() - t0, "threads": torch.get_num_threads()}
    stamps = clock.stamps
    if stamps:
        if len(stamps) != args.steps or len(counts) != args.steps:
            raise RuntimeError(f"{len(stamps)} step ends and {len(counts)} batches for {args.steps} steps")
        timed = counts[UNTIMED_STEPS:]
        (w0, own0, busy0), (w1, own1, busy1) = stamps[UNTIMED_STEPS - 1], stamps[-1]
        seconds = w1 - w0
        input_tokens, loss_tokens, padded = (sum(c[k] for c in timed) for k in range(3))
        out.update(timed_steps=len(timed), timed_s=seconds, s_per_step=seconds / len(timed),
                   input_tok_per_s=input_tokens / seconds, loss_tok_per_s=loss_tokens / seconds,
                   padding=1 - input_tokens / padded, input_tokens=input_tokens, loss_tokens=loss_tokens,
                   own_cpu_pct=100 * (own1 - own0) / seconds,
                   other_cpu_pct=100 * max(0.0, (busy1 - busy0) - (own1 - own0)) / seconds,
                   step_ends=[s[0] for s in stamps], batches=counts)  # fmt: skip
    print(json.dumps(out))


# --- the parent: data, the runs one after another, the table -----------------------------------------------------


def spawn(mode: str, args, model_path: str, data: Path) -> dict:
    steps = args.memory_steps if mode in MEMORY_RUNS else args.steps
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--model-path", model_path,
           "--data", str(data), "--steps", str(steps), "--batch-size", str(args.batch_size),
           "--threads", str(args.threads)]  # fmt: skip
    print(f"running {RUNS[mode]}...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    if proc.returncode != 0:
        sys.exit(f"{mode} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "input_tok_per_s" in result:
        print(f"  {result['input_tok_per_s']:.1f} input tok/s, {result['s_per_step']:.2f} s/step, peak RSS "
              f"{result['peak_rss_mib']:.0f} MiB, other processes' CPU {result['other_cpu_pct']:.0f} %",
              flush=True)  # fmt: skip
        if result["other_cpu_pct"] > DISTURBED_PCT:
            print(f"  WARNING: other processes used {result['other_cpu_pct']:.0f} % of a core during the timed steps")
    else:
        print(f"  peak RSS {result['peak_rss_mib']:.0f} MiB", flush=True)
    return result


def combine(runs: list[dict]) -> dict:
    """One row from the rounds of a run: mean speed, highest peak RSS and other-CPU; every round kept in "rounds"."""
    out = {k: v for k, v in runs[-1].items() if k not in ("step_ends", "batches")} | {"rounds": runs}
    for key in ("input_tok_per_s", "loss_tok_per_s", "s_per_step"):
        if key in out:
            out[key] = sum(r[key] for r in runs) / len(runs)
    for key in ("peak_rss_mib", "other_cpu_pct"):
        if key in out:
            out[key] = max(r[key] for r in runs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="HF model dir (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="where the default model is converted")
    ap.add_argument("--steps", type=int, default=10, help=f"optimizer steps per run ({UNTIMED_STEPS} untimed)")
    ap.add_argument("--rounds", type=int, default=2, help="times (a)-(d) run, interleaved; their tok/s averaged")
    ap.add_argument("--memory-steps", type=int, default=8, help="steps of the gradient-checkpointing runs")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--examples", type=int, default=320, help="synthetic prompt/completion pairs")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads in every run")
    ap.add_argument("--skip", nargs="*", default=[], choices=list(RUNS), help="runs to leave out")
    ap.add_argument("--quick", action="store_true", help="smoke check: a tiny model, 4 steps of 4, (a)-(d) and (g)")
    ap.add_argument("--out", type=Path, default=None, help="JSON (default: benchmarks/results/train_speed.json)")
    ap.add_argument("--child", choices=list(RUNS), help=argparse.SUPPRESS)
    ap.add_argument("--model-path", help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    if min(args.steps, args.memory_steps) <= UNTIMED_STEPS:
        ap.error(f"--steps and --memory-steps must be more than {UNTIMED_STEPS}")
    out_path = args.out or (None if args.quick else RESULTS_DIR / "train_speed.json")
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)

    with tempfile.TemporaryDirectory(prefix="loraplex-train-speed-") as tmp:
        model_path = resolve_model_path(args.model, args.cache_dir)
        if args.quick:
            args.steps, args.memory_steps, args.examples, args.batch_size, args.rounds = 4, 4, 32, 4, 1
            args.skip = [*args.skip, *MEMORY_RUNS]
            model_path = make_tiny_model(Path(tmp) / "tiny", model_path)
        data = Path(tmp) / "train.jsonl"
        data.write_text("".join(json.dumps(ex) + "\n" for ex in synthetic_examples(args.examples)))
        runs: dict[str, list[dict]] = {}
        # the speed runs interleaved (a b c d a b c d ...), so that the machine's drift falls on all of them alike
        order = [m for _ in range(args.rounds) for m in SPEED_RUNS] + [m for m in RUNS if m not in SPEED_RUNS]
        for mode in order:
            if mode not in args.skip:
                runs.setdefault(mode, []).append(spawn(mode, args, model_path, data))
        results = {mode: combine(runs[mode]) for mode in RUNS if mode in runs}

    def ratio(a: str, b: str, key: str) -> float | None:
        return results[a][key] / results[b][key] if a in results and b in results else None

    def above_floor(a: str, b: str) -> float | None:
        if not all(k in results for k in (a, b, "floor")):
            return None
        floor = results["floor"]["peak_rss_mib"]
        return (results[a]["peak_rss_mib"] - floor) / (results[b]["peak_rss_mib"] - floor)

    ratios = {
        "tok/s (a)/(b) ours / PEFT+Trainer": ratio("ours", "peft", "input_tok_per_s"),
        "tok/s (a)/(c) ours / PEFT+Trainer, same batches": ratio("ours", "peft_same", "input_tok_per_s"),
        "tok/s (a)/(d) ours LoRA / full fine-tuning": ratio("ours", "full", "input_tok_per_s"),
        "peak RSS (a)/(d) LoRA / full": ratio("ours", "full", "peak_rss_mib"),
        "peak RSS (e)/(f) LoRA / full, gradient checkpointing": ratio("ours_gc", "full_gc", "peak_rss_mib"),
        "peak RSS above the floor (a)/(d)": above_floor("ours", "full"),
        "peak RSS above the floor (e)/(f)": above_floor("ours_gc", "full_gc"),
    }

    print(f"\n{args.steps} steps ({args.memory_steps} for (e), (f)) × batch {args.batch_size}, {UNTIMED_STEPS} "
          f"untimed; (a)-(d): mean of {args.rounds} interleaved rounds; "
          f"{args.examples} synthetic examples; rank-{RANK} LoRA (α = {ALPHA:g}) on {', '.join(TARGETS)}; fp32; "
          f"{args.threads} threads")  # fmt: skip
    rows = []
    for mode, r in results.items():
        timed = "input_tok_per_s" in r
        cells = [r[k] if timed else "—" for k in ("input_tok_per_s", "loss_tok_per_s", "s_per_step")]
        pad = f"{100 * r['padding']:.0f} %" if timed else "—"
        other = f"{r['other_cpu_pct']:.0f} %" if timed else "—"
        rows.append([RUNS[mode], *cells, pad, r["peak_rss_mib"], other])
    print_table(["run", "input tok/s", "loss tok/s", "s/step", "padding", "peak RSS MiB", "other CPU"], rows)
    print()
    print_table(["ratio", "value"], [[name, value] for name, value in ratios.items() if value is not None])
    speed = ratios["tok/s (a)/(b) ours / PEFT+Trainer"]
    if speed is not None:
        print(f"target ours / PEFT+Trainer ≥ 1: {speed:.2f} ({'met' if speed >= 1 else 'NOT met'})")
    for key in ("peak RSS (a)/(d) LoRA / full", "peak RSS (e)/(f) LoRA / full, gradient checkpointing"):
        if ratios[key] is not None:
            print(f"target {key} ≤ 0.5: {ratios[key]:.2f} ({'met' if ratios[key] <= 0.5 else 'NOT met'})")
    disturbed = [m for m, r in results.items() if r.get("other_cpu_pct", 0) > DISTURBED_PCT]
    if disturbed:
        print(f"WARNING: runs {', '.join(disturbed)} shared the CPU with other processes; rerun on an idle machine")

    if out_path:
        setup = dict(model=args.model or "SmolLM2-135M-Instruct", steps=args.steps, memory_steps=args.memory_steps,
                     rounds=args.rounds,
                     untimed_steps=UNTIMED_STEPS, batch_size=args.batch_size, examples=args.examples, rank=RANK,
                     alpha=ALPHA, target_modules=list(TARGETS), learning_rate=LR, threads=args.threads,
                     torch=torch.__version__, machine=platform.processor() or platform.machine())  # fmt: skip
        write_json(out_path, {"config": setup, "results": results, "ratios": ratios})


if __name__ == "__main__":
    main()
