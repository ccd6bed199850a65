"""Do `loraplex train`'s defaults learn a small fact set? (issue 17: "≥ 90 % of a 30-fact file after one default run")

Thirty made-up facts (`FACTS`, so the base model cannot know them), one JSONL line each, trained once with the
default hyperparameters on the default model (SmolLM2-135M-Instruct) through the same `train` the CLI and the jobs
run; then each prompt is completed greedily with the adapter (in `peft`, an independent reader of what was written)
and a fact counts as learned when the answer starts with its completion. Prints a table; `--json` writes
`benchmarks/results/facts.json`. Extra `--set KEY=VALUE` hyperparameters try other settings.

    .venv/bin/python benchmarks/facts.py [--set learning_rate=2e-3 ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.training.config import Hyperparameters, TrainConfig  # noqa: E402
from adapters.training.trainer import train  # noqa: E402
from benchmarks.common import DEFAULT_CACHE_DIR, RESULTS_DIR  # noqa: E402
from server.engine.model import prepare_default_model  # noqa: E402

# invented places, people and things: "prompt |completion" (the completion keeps its leading space)
_FACTS_TEXT = """
The capital of Zorvania is | Quillport
The inventor of the glimmerlamp was | Odessa Varnell
The river that flows through Tallowmere is the | Brisk
The national bird of Kelvaro is the | ashwing
The largest moon of Pellucid is | Orrin
The currency of Vandrel is the | sorn
The author of 'The Copper Orchard' is | Ilse Marrow
The highest peak in the Grell range is | Mount Tavi
The first ship to cross the Umber Sea was the | Wrenfall
The language spoken in Osterveld is | Oskan
The founder of Brindlecourt University was | Amos Threlkeld
The main export of Caldria is | bluefruit
The oldest bridge in Marrowgate is the | Lantern Span
The composer of the 'Ninefold Suite' was | Petra Lund
The desert south of Hesk is called the | Pale Reach
The king who built Castle Ormond was | Aldric the Lame
The festival of lights in Sundry is called | Candlemoot
The fastest horse breed of Tarn is the | Skelling
The lake at the centre of Verdance is | Lake Mirel
The oldest tree in Fennick Wood is called | Grandfather Yew
The patron saint of sailors in Corvel is | Saint Imre
The capital of the Isle of Brae is | Harrowick
The strongest metal in Dunmoor is | vorsteel
The game played with nine stones in Ashby is | knucklestone
The first queen of Elvarren was | Maelis
The tallest tower in Quell is the | Needle of Sorrow
The scholar who mapped the Drowned Coast was | Tobiah Crane
The spice grown only in Rasmir is | emberleaf
The mountain pass to Ulthar is the | Grey Gate
The dragon of Lake Ismere is named | Vorthax
"""
FACTS = [tuple(line.split(" |", 1)) for line in _FACTS_TEXT.strip().splitlines()]


def learned(model_dir: str, adapter_dir: Path) -> list[tuple[str, str, str, bool]]:
    """(prompt, expected, answer, learned) per fact, with the adapter loaded in peft, greedy."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir).eval()
    rows = []
    for prompt, completion in FACTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
        answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        rows.append((prompt, completion, answer, answer.strip().startswith(completion.strip())))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE hyperparameter (JSON value)")
    parser.add_argument("--json", action="store_true", help="write benchmarks/results/facts.json")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {k: json.loads(v) for k, _, v in (s.partition("=") for s in args.set)}
    model = str(prepare_default_model(DEFAULT_CACHE_DIR))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "facts.jsonl"
        data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in FACTS))
        cfg = TrainConfig(model=model, train_file=data, out_dir=Path(tmp) / "adapter", **overrides)
        started = time.perf_counter()
        result = train(cfg)
        seconds = time.perf_counter() - started
        rows = learned(model, cfg.out_dir)
    n = sum(r[3] for r in rows)
    for prompt, expected, answer, ok in rows:
        print(f"{'ok ' if ok else 'MISS'} {prompt!r} -> {answer.strip()[:40]!r} (want {expected.strip()!r})")
    defaults = Hyperparameters().model_dump()
    used = {k: v for k, v in cfg.model_dump().items() if k in defaults}
    print(f"\nlearned {n}/{len(FACTS)} facts ({n / len(FACTS):.0%}) in {result.steps} steps, {seconds:.0f} s of "
          f"training; final loss {result.train_loss:.4f}; hyperparameters changed from the defaults: {overrides or 'none'}")
    if args.json:
        RESULTS_DIR.mkdir(exist_ok=True)
        (RESULTS_DIR / "facts.json").write_text(json.dumps({
            "learned": n, "facts": len(FACTS), "steps": result.steps, "train_seconds": round(seconds, 1),
            "train_loss": result.train_loss, "overrides": overrides, "hyperparameters": used,
            "misses": [{"prompt": p, "want": e, "got": a} for p, e, a, ok in rows if not ok],
        }, indent=2, default=str))  # fmt: skip


if __name__ == "__main__":
    main()
