"""SwitchLoRA against LoRA and full-rank training: a tiny Llama pre-trained from scratch, held-out loss at equal budget.

The claim tested (Zhou, Wang & Xu, arXiv 2406.06564; /work/shared/notes/switchlora.md): at the same number of
trainable parameters, SwitchLoRA (LoRA whose rank directions keep being switched, folding the old ones into the frozen
weights) learns much better than LoRA from a random initialization, approaching full-rank training.

Setup, the same for every run:
  - corpus: Python's own documentation, `pydoc_data.topics.topics` (79 topics, ~465 K characters, no download), in
    sorted-topic order, or with `--corpus stdlib` the standard library's own Python sources (up to --corpus-chars,
    8 M), cut into 4,096-character blocks; every 10th block is held out;
  - tokenizer: byte-level BPE (the `tokenizers` package) with a --vocab (2,048) vocabulary, trained on the training
    blocks only; both parts tokenized and cut into 128-token chunks;
  - model: `LlamaForCausalLM` from a config, hidden 256, 4 layers, 4 heads, MLP 688, tied embeddings, fp32, one
    random initialization (seed 0) shared by every run;
  - training: batches of 8 chunks in one seeded order (the same batches for every run), --steps steps, linear
    warm-up over --warmup (10 %) of the steps then cosine decay to 10 % of the peak learning rate, gradient clipping at 1.0,
    Adam(W) β = (0.9, 0.999) without weight decay; held-out loss = mean next-token cross-entropy over every held-out
    chunk at the end (and half-way, for the JSON).

The adapted layers are the seven linear layers of each block (q, k, v, o, gate, up, down). The embedding (tied with
lm_head) and the RMSNorm weights train fully in every method, as in the paper's pre-training setting, at one shared
learning rate (--embed-lr, 1e-2), so that the methods differ only in how the linear layers learn; each method's own
learning rate (a sweep of two or three) applies to those layers. Methods:
  - full: the linear weights trained directly (torch AdamW);
  - lora: `adapters.training.lora.inject_lora`, the trainer's layer (B = 0, A Kaiming-uniform), the random base
    weights frozen (torch AdamW);
  - switchlora: `adapters.training.switchlora` as the trainer uses it: `inject_switchlora` (the paper's non-zero A and B,
    with W absorbing −s·B·A at injection as in the authors' code, so every method starts from the same function),
    `StepAdamW` (per-vector steps), `SwitchScheduler` called after clipping and before the optimizer step, with the
    paper's schedule (interval0 = 40, ratio = 0.1, 5 warm steps);
  - switchlora_fast: the same with interval0 = 10 (the least 5 warm steps allow) and ratio = 0.5: the paper's
    schedule switches each rank direction ~80 times over its 40 k steps, but under once in a run this short;
  - switchlora_noswitch: the SwitchLoRA layers, init and optimizer, no switching: what switching itself adds;
  - switchlora_lorainit: the paper schedule on LoRA's init (A Kaiming-uniform, B and B's bank zero; the authors'
    `--init_lora_type origin_lora`): switching against plain LoRA with nothing else different.
LoRA-type runs use α = 1 (scaling 1/r, the scale SwitchLoRA's candidate initialization is designed for, as in the
authors' code) and rank --rank (32), so LoRA and SwitchLoRA train exactly the same parameters. The table shows every
run, the best of each method in bold; "train tok/s" counts steps 3..N (evaluations excluded) and "other CPU" is what
the rest of the machine used meanwhile (as in train_speed.py): above ~10 % that run's tok/s is not to be trusted (its
losses do not depend on it: every run is deterministic).

Usage: `python benchmarks/switchlora_scratch.py [--quick] [--steps N] [--rank R] [--methods ...] [--lrs ...]
[--corpus pydoc|stdlib]`. `--quick` runs 12
steps of lora and switchlora_fast at one learning rate to check that the script works; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import sysconfig
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/switchlora_scratch.py` anywhere

from adapters.targets import select_targets  # noqa: E402
from adapters.training.lora import inject_lora  # noqa: E402
from adapters.training.switchlora import StepAdamW, SwitchScheduler, inject_switchlora, switchlora_param_groups  # noqa: E402
from benchmarks.common import RESULTS_DIR, TARGETS, print_table, write_json  # noqa: E402
from benchmarks.train_speed import DISTURBED_PCT, cpu_seconds  # noqa: E402

SEQ, BLOCK_CHARS, HELD_OUT_EVERY, SEED = 128, 4096, 10, 0
MODEL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=SEQ, tie_word_embeddings=True)  # fmt: skip
LORA_ALPHA = 1.0  # scaling 1/r for LoRA and SwitchLoRA alike, as in the authors' code
PAPER_SWITCH = dict(interval0=40, ratio=0.1, warm_steps=5)
# method → its label, learning rates tried (for the linear layers) and SwitchLoRA schedule
METHODS = {
    "full": dict(label="full-rank", lrs=[1e-4, 3e-4, 1e-3]),
    "lora": dict(label="LoRA", lrs=[1e-3, 3e-3, 1e-2]),
    "switchlora": dict(label="SwitchLoRA, paper schedule (40, 0.1)", lrs=[3e-3, 1e-2], switch=PAPER_SWITCH),
    "switchlora_fast": dict(label="SwitchLoRA, fast schedule (10, 0.5)", lrs=[1e-2, 2e-2, 4e-2],
                            switch=dict(interval0=10, ratio=0.5, warm_steps=5)),
    "switchlora_noswitch": dict(label="SwitchLoRA init, no switching", lrs=[1e-3, 3e-3]),
    "switchlora_lorainit": dict(label="SwitchLoRA, LoRA init (B = 0), paper schedule", lrs=[1e-2], switch=PAPER_SWITCH,
                                init="lora"),
}  # fmt: skip


# --- data ----------------------------------------------------------------------------------------------------------


def corpus_text(corpus: str, max_chars: int) -> str:
    """The text of `corpus`: "pydoc", the pydoc topics in sorted order (~465 K characters), or "stdlib", the Python
    sources of this interpreter's standard library (its tests left out) in sorted path order, up to `max_chars`."""
    if corpus == "pydoc":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics))
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if rel[0] in ("test", "idlelib", "site-packages") or "tests" in rel:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text) + 2
        if size >= max_chars:
            break
    return "\n\n".join(parts)[:max_chars]


def split_corpus(corpus: str = "pydoc", max_chars: int = 8_000_000) -> tuple[str, str]:
    """(training text, held-out text): every HELD_OUT_EVERY-th block of `corpus_text` held out."""
    text = corpus_text(corpus, max_chars)
    blocks = [text[i : i + BLOCK_CHARS] for i in range(0, len(text), BLOCK_CHARS)]
    held = [b for i, b in enumerate(blocks) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    train = [b for i, b in enumerate(blocks) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    return "".join(train), "".join(held)


def tokenize_chunks(train_text: str, held_text: str, vocab: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(train chunks (n, SEQ), held-out chunks (m, SEQ), vocabulary size) with a BPE trained on the training text."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    paragraphs = train_text.split("\n\n")
    tok.train_from_iterator(paragraphs, vocab_size=vocab, min_frequency=2, show_progress=False)

    def chunks(text: str) -> torch.Tensor:
        ids = [i for enc in tok.encode_batch(text.split("\n\n")) for i in [*enc.ids, 0]]  # 0 separates paragraphs
        n = len(ids) // SEQ
        return torch.tensor(ids[: n * SEQ]).view(n, SEQ)

    return chunks(train_text), chunks(held_text), tok.get_vocab_size()


def batch_order(n_chunks: int, batch: int, steps: int) -> list[torch.Tensor]:
    """The chunk indices of every step: seeded shuffles, one epoch after another (the same for every run)."""
    g = torch.Generator().manual_seed(SEED)
    order: list[int] = []
    while len(order) < steps * batch:
        order += torch.randperm(n_chunks, generator=g).tolist()
    return [torch.tensor(order[s * batch : (s + 1) * batch]) for s in range(steps)]


# --- the runs ------------------------------------------------------------------------------------------------------


def build_model(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)  # one random initialization for every run
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **MODEL))


def prepare(method: str, model, rank: int, lr: float, embed_lr: float, steps: int):
    """Make `method`'s parameters trainable; returns (optimizer, switch scheduler or None, trainable parameters).

    The embeddings (tied with lm_head) and the norms train fully in every method, as in the paper's pre-training
    runs, at `embed_lr`; `lr` is for the linear layers (their weights, or their A and B)."""
    rest = [p for name, p in model.named_parameters() if "embed_tokens" in name or "norm" in name]
    if method == "full":
        linear = [p for name, p in model.named_parameters() if name.rsplit(".", 2)[-2] in TARGETS]
        groups = [{"params": linear}]
    elif method == "lora":
        layers = inject_lora(model, select_targets(model, list(TARGETS)), rank, alpha=LORA_ALPHA, dropout=0.0, seed=SEED)
        groups = [{"params": [p for layer in layers.values() for p in (layer.lora_A, layer.lora_B)]}]
    else:
        init = METHODS[method].get("init", "switchlora")
        layers = inject_switchlora(model, select_targets(model, list(TARGETS)), rank, alpha=LORA_ALPHA, seed=SEED, init=init)
        groups = switchlora_param_groups(layers)
    for p in rest:
        p.requires_grad_(True)  # inject_* froze the whole model
    groups.append({"params": rest, "lr": embed_lr})
    params = [p for g in groups for p in g["params"]]
    if len({id(p) for p in model.parameters() if p.requires_grad}) != len(params):
        raise RuntimeError("a trainable parameter is in no optimizer group")
    if method in ("full", "lora"):
        return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0), None, params
    optimizer = StepAdamW(groups, lr=lr)
    schedule = METHODS[method].get("switch")
    switch = SwitchScheduler(layers, optimizer, steps, seed=SEED, **schedule) if schedule else None
    return optimizer, switch, params


def lr_lambda(steps: int, warmup_frac: float = 0.1):
    warmup = max(1, round(warmup_frac * steps))

    def factor(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        progress = (t - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@torch.no_grad()
def held_out_loss(model, chunks: torch.Tensor, batch: int = 32) -> float:
    model.eval()
    total = 0.0
    for s in range(0, len(chunks), batch):
        x = chunks[s : s + batch]
        total += model(input_ids=x, labels=x).loss.item() * len(x)
    model.train()
    return total / len(chunks)


def run(method: str, lr: float, args, data: dict) -> dict:
    model = build_model(data["vocab"])
    optimizer, switch, params = prepare(method, model, args.rank, lr, args.embed_lr, args.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.steps, args.warmup))
    trainable = sum(p.numel() for p in {id(p): p for p in params}.values())
    evals_at = {round(args.steps / 2)}  # and at the end
    curve, losses, switched, train_s, other_s = [], [], 0, 0.0, 0.0
    model.train()
    for t, idx in enumerate(data["order"]):
        t0, (own0, busy0) = time.perf_counter(), cpu_seconds()
        x = data["train"][idx]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if switch is not None:
            switched += switch.step(t)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if t >= 2:  # the first steps warm up; evaluations are not timed either
            train_s += time.perf_counter() - t0
            own1, busy1 = cpu_seconds()
            other_s += max(0.0, (busy1 - busy0) - (own1 - own0))  # CPU the rest of the machine used meanwhile
        if not math.isfinite(losses[-1]):
            break
        if t + 1 in evals_at and t + 1 < args.steps:
            curve.append((t + 1, held_out_loss(model, data["held"])))
    final = held_out_loss(model, data["held"]) if math.isfinite(losses[-1]) else float("nan")
    curve.append((len(losses), final))
    n_layers = len(switch.layers) if switch else 0
    return dict(method=method, lr=lr, trainable=trainable, held_out_loss=final, perplexity=math.exp(min(final, 50)),
                train_loss=sum(losses[-10:]) / len(losses[-10:]), curve=curve, train_s=train_s,
                tok_per_s=(len(losses) - 2) * x.numel() / train_s, other_cpu_pct=100 * other_s / train_s,
                switched_per_layer_side=switched / 2 / n_layers if n_layers else 0)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    ap.add_argument("--batch-size", type=int, default=8, help="chunks of 128 tokens per step")
    ap.add_argument("--rank", type=int, default=32, help="LoRA / SwitchLoRA rank r")
    ap.add_argument("--warmup", type=float, default=0.1, help="linear warm-up, as a fraction of the steps")
    ap.add_argument("--embed-lr", type=float, default=1e-2, help="learning rate of the embedding and norms (all runs)")
    ap.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary size")
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--lrs", type=float, nargs="*", default=None,
                    help="one learning rate per entry of --methods, which may name a method more than once (default: each "
                    "method's sweep)")
    ap.add_argument("--corpus", choices=["pydoc", "stdlib"], default="pydoc",
                    help="pydoc topics (~465 K characters) or the standard library's Python sources")
    ap.add_argument("--corpus-chars", type=int, default=8_000_000, help="at most this much of the corpus")
    ap.add_argument("--quick", action="store_true", help="smoke check: 12 steps, two methods, one lr each, no JSON")
    ap.add_argument("--out", type=Path, default=None, help="JSON (default: benchmarks/results/switchlora_scratch.json)")
    args = ap.parse_args()
    sweep = {m: METHODS[m]["lrs"] for m in args.methods}
    if args.lrs is not None:
        if len(args.lrs) != len(args.methods):
            ap.error("--lrs takes one learning rate per method in --methods")
        sweep = {}
        for m, lr in zip(args.methods, args.lrs, strict=True):  # a method named twice runs at both rates
            sweep.setdefault(m, []).append(lr)
    if args.quick:
        args.steps, sweep = 12, {"lora": [1e-2], "switchlora_fast": [1e-2]}
    out_path = args.out or (None if args.quick else RESULTS_DIR / "switchlora_scratch.json")

    t0 = time.perf_counter()
    train_text, held_text = split_corpus(args.corpus, args.corpus_chars)
    train, held, vocab = tokenize_chunks(train_text, held_text, args.vocab)
    data = dict(train=train, held=held, vocab=vocab, order=batch_order(len(train), args.batch_size, args.steps))
    tokens = args.steps * args.batch_size * SEQ
    print(f"corpus: {len(train_text):,} training / {len(held_text):,} held-out characters → {len(train)} / "
          f"{len(held)} chunks of {SEQ} tokens (BPE vocabulary {vocab}); {args.steps} steps × {args.batch_size} "
          f"chunks = {tokens:,} tokens ({tokens / train.numel():.1f} epochs); prepared in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)  # fmt: skip

    results = []
    for method, lrs in sweep.items():
        for lr in lrs:
            print(f"training {METHODS[method]['label']} at lr {lr:g}...", flush=True)
            r = run(method, lr, args, data)
            print(f"  held-out loss {r['held_out_loss']:.3f} (train {r['train_loss']:.3f}), "
                  f"{r['trainable'] / 1e6:.2f} M trainable, {r['train_s']:.0f} s", flush=True)  # fmt: skip
            results.append(r)

    best: dict[str, dict] = {}
    for r in results:
        if r["method"] not in best or r["held_out_loss"] < best[r["method"]]["held_out_loss"]:
            best[r["method"]] = r
    ref = best.get("full")
    total_params = sum(p.numel() for p in build_model(vocab).parameters())
    print(f"\nLlama {MODEL['num_hidden_layers']} × {MODEL['hidden_size']} ({total_params / 1e6:.2f} M parameters, "
          f"vocabulary {vocab}), from scratch; rank {args.rank} (α = {LORA_ALPHA:g}) on {', '.join(TARGETS)}; "
          f"{args.steps} steps × {args.batch_size} × {SEQ} tokens; embedding and norms at lr "
          f"{args.embed_lr:g}")  # fmt: skip
    rows = []
    for r in results:
        mark = "**" if best[r["method"]] is r else ""
        gap = "—" if ref is None else f"{r['held_out_loss'] - ref['held_out_loss']:+.3f}"
        switched = f"{r['switched_per_layer_side'] / args.rank:.1f} r" if "switch" in METHODS[r["method"]] else "—"
        rows.append([METHODS[r["method"]]["label"], f"{r['lr']:g}", f"{r['trainable'] / 1e6:.2f} M",
                     f"{mark}{r['held_out_loss']:.3f}{mark}", f"{mark}{r['perplexity']:.1f}{mark}",
                     f"{r['train_loss']:.3f}", gap, switched, f"{r['tok_per_s']:,.0f}",
                     f"{r['other_cpu_pct']:.0f} %"])  # fmt: skip
    headers = ["method", "lr", "trainable", "held-out loss", "held-out ppl", "train loss (last 10)", "Δ vs best full",
               "switched / layer / side", "train tok/s", "other CPU"]  # fmt: skip
    print_table(headers, rows)
    disturbed = [f"{r['method']} at {r['lr']:g}" for r in results if r["other_cpu_pct"] > DISTURBED_PCT]
    if disturbed:
        print(f"WARNING: other processes used the CPU during {', '.join(disturbed)}: their tok/s are too low")
    lora = best.get("lora")
    for name in ("switchlora", "switchlora_fast"):
        if name in best and lora is not None:
            s, lo = best[name]["held_out_loss"], lora["held_out_loss"]
            verdict = "met" if s < lo else "NOT met"
            print(f"target {METHODS[name]['label']} < LoRA in held-out loss: {s:.3f} vs {lo:.3f} ({verdict})")

    if out_path:
        setup = dict(corpus=args.corpus, corpus_chars=len(train_text) + len(held_text), model=MODEL, vocab=vocab, seq=SEQ, steps=args.steps, batch_size=args.batch_size,
                     rank=args.rank, lora_alpha=LORA_ALPHA, embed_lr=args.embed_lr, warmup=args.warmup, methods=METHODS,
                     sweep=sweep,
                     train_chunks=len(train), held_out_chunks=len(held), torch=torch.__version__,
                     threads=torch.get_num_threads(), machine=platform.processor() or platform.machine())  # fmt: skip
        write_json(out_path, {"config": setup, "results": results})


if __name__ == "__main__":
    main()
