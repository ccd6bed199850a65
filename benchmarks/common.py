"""What both benchmarks share: the prompts, random rank-16 adapters, the model path, the table.

The adapters are LoRA (Hu et al. 2021) with PEFT's usual targets on a Llama-style model (q, k,
v, o, gate, up, down), random but seeded: A ~ N(0, 1/in) as PEFT's Kaiming-style init gives, B
~ N(0, 0.01²) instead of zero, so every adapter changes the output a little and no kernel can
skip it. Speed does not depend on the values, only on the shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
from torch import nn

from adapters.peft_io import LoraModule, LoraWeights, save_peft_adapter
from server.engine.model import prepare_default_model

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE_DIR = REPO / ".loraplex" / "cache"
RESULTS_DIR = REPO / "benchmarks" / "results"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK = 16
ALPHA = 32

# 16 chat questions of different lengths, so prompts pad differently as in real traffic
PROMPTS = [
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about autumn leaves.",
    "List three uses of a paperclip.",
    "How do I reverse a list in Python?",
    "What is the difference between weather and climate?",
    "Give me a short motivational quote for a Monday morning.",
    "Summarize the plot of Romeo and Juliet in one paragraph.",
    "Why do cats purr?",
    "Translate 'good morning, how are you?' into Spanish.",
    "What are the main ingredients of a classic margherita pizza?",
    "Describe the water cycle to a ten-year-old.",
    "Suggest a name for a friendly robot.",
    "How many legs does a spider have, and why?",
    "What should I pack for a weekend hiking trip in the mountains?",
    "Tell me a fun fact about octopuses.",
]


def add_server_args(ap: argparse.ArgumentParser) -> None:
    """--model, --cache-dir and --backend, as both benchmarks take them."""
    ap.add_argument(
        "--model", default=None, help="HF model dir or hub id (default: the embedded SmolLM2-135M-Instruct)"
    )
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="where the default model is converted")
    ap.add_argument("--backend", default="compiled", choices=["compiled", "eager"], help="the engine's LoRA backend")


def adapter_name(i: int) -> str:
    return f"bench-{i:02d}"


def resolve_model_path(model: str | None, cache_dir: Path) -> str:
    """The directory (or hub id) the server would load: the default model is converted once if missing."""
    return str(prepare_default_model(cache_dir)) if model is None else model


def chat_prompt_ids(tokenizer, n: int) -> list[list[int]]:
    """The first n prompts, chat-templated and tokenized as the server's chat endpoint does."""
    out = []
    for i in range(n):
        messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def target_shapes(model: nn.Module, targets: tuple[str, ...] = TARGETS) -> dict[str, tuple[int, int]]:
    """{module path: (in, out)} of the model's nn.Linear layers named like `targets`."""
    return {
        name: (mod.in_features, mod.out_features)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    }


def make_random_adapters(
    shapes: dict[str, tuple[int, int]], n: int, rank: int = RANK, alpha: int = ALPHA, seed: int = 0
) -> list[LoraWeights]:
    """n seeded random adapters over every module of `shapes`: A ~ N(0, 1/in), B ~ N(0, 0.01²)."""
    adapters = []
    for i in range(n):
        gen = torch.Generator().manual_seed(seed + i)
        modules = {}
        for module, (in_f, out_f) in shapes.items():
            a = torch.randn(rank, in_f, generator=gen) / in_f**0.5
            b = torch.randn(out_f, rank, generator=gen) * 0.01
            modules[module] = LoraModule(lora_A=a, lora_B=b, scaling=alpha / rank)
        targets = sorted({m.rsplit(".", 1)[-1] for m in shapes})
        adapters.append(
            LoraWeights(config={"r": rank, "lora_alpha": alpha, "target_modules": targets}, modules=modules)
        )
    return adapters


def write_peft_adapters(adapters: list[LoraWeights], directory: Path, base_model: str | None = None) -> list[Path]:
    """Save each adapter as a PEFT directory `<directory>/<adapter_name(i)>`."""
    paths = []
    for i, weights in enumerate(adapters):
        path = Path(directory) / adapter_name(i)
        save_peft_adapter(weights, path, base_model=base_model)
        paths.append(path)
    return paths


def summarize(values: list[float]) -> dict:
    """Median (what the tables show), best (highest) and every run of a throughput."""
    return {"median": statistics.median(values), "best": max(values), "runs": values}


def print_table(headers: list[str], rows: list[list[object]]) -> None:
    """A markdown table: floats with 2 decimals below 10, else 1."""

    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for row in rows:
        print("| " + " | ".join(cell(v) for v in row) + " |")


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")


def resident(pid: int | str = "self") -> dict[str, int]:
    """A process's resident set (VmRSS) and its parts (RssAnon: heap and tensors, RssFile: mapped files), bytes."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon", "RssFile")}


# --- a server subprocess ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_server(port: int, log_path: Path, model: str | None, env: dict[str, str]) -> subprocess.Popen:
    """`python -m server` on 127.0.0.1:`port`, configured only by `env` (LORAPLEX_* variables), logging to `log_path`."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")} | env
    if model:
        full["LORAPLEX_MODEL"] = model
    cmd = [sys.executable, "-m", "server", "--port", str(port), "--log-level", "warning"]
    with log_path.open("w") as log:
        return subprocess.Popen(cmd, cwd=REPO, env=full, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(proc: subprocess.Popen, url: str, timeout: float, log_path: Path, compiled: bool = True) -> None:
    """Wait for `/health/ready` 200 and, with `compiled`, for the compiled backend's background warm-up to finish
    (until then the server answers eagerly and compiles whenever it is idle: a measurement would see neither)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            r = httpx.get(f"{url}/health/ready", timeout=5)
            if r.status_code == 200 and not (compiled and "compiling" in r.json()):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server was not ready within {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
