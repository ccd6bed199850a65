"""Helpers of the engine tests: an engine thread on a tiny model with a blocking `run`, and HF's greedy tokens."""

from __future__ import annotations

import threading
from pathlib import Path

from adapters.peft_io import load_peft_adapter
from adapters.tiers.registry import AdapterRegistry
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.model import load_base_model
from server.engine.request import AdapterUse, GenerationRequest
from server.engine.sampling import SamplingParams

PROMPTS = ["The capital of France", "Hello world! How", "LoRA adapters are", "0 1 2 3", "user assistant"]
LONG = " ".join(PROMPTS)  # ~30 tokens of the tiny tokenizer


class Harness:
    """An engine thread on a tiny model, with a blocking `run` for tests."""

    def __init__(self, model_dir: Path, adapters: dict[str, Path], backend: str, max_num_seqs: int = 8,
                 background: bool = False, **config):  # fmt: skip
        """`background`: start serving at once and warm up (compile) while idle, as the server does."""
        self.base = load_base_model(str(model_dir), cache_dir=model_dir)
        config = dict(max_num_seqs=max_num_seqs, max_model_len=128, lora_pages=16, lora_page_size=8,
                      lora_backend=backend) | config  # fmt: skip
        self.engine = Engine(self.base, EngineConfig(**config))
        self.registry = AdapterRegistry()
        for name, d in adapters.items():
            self.registry.add(name, load_peft_adapter(d))
        self.progress: list[tuple[int, int]] = []
        warm = self.engine.warmup_in_background if background else self.engine.warmup
        warm(lambda done, total: self.progress.append((done, total)))
        self.engine.start()
        self.tok = self.base.tokenizer
        self._n = 0

    def request(self, prompt: str, adapters=(), max_tokens=10, emit=None, **params) -> GenerationRequest:
        self._n += 1
        uses = [AdapterUse(self.registry.get(n), w) for n, w in adapters]
        params.setdefault("temperature", 0)
        sampling = SamplingParams(max_tokens=max_tokens, **params)
        return GenerationRequest(f"r{self._n}", self.tok(prompt)["input_ids"], sampling, emit, uses)

    def submit(self, prompt: str, adapters=(), max_tokens=10, **params):
        done, out = threading.Event(), {"ids": [], "text": "", "reason": None, "error": None}

        def emit(o):
            out["ids"] += o.token_ids
            out["text"] += o.text
            if o.finish_reason:
                out["reason"], out["error"] = o.finish_reason, o.error
                done.set()

        req = self.request(prompt, adapters, max_tokens, emit, **params)
        self.engine.submit(req)
        return req.request_id, done, out

    def run(self, jobs: list[dict]) -> list[dict]:
        started = [self.submit(**j) for j in jobs]
        for _, done, _ in started:
            assert done.wait(60)
        return [o for _, _, o in started]


def hf_greedy(model, tok, prompt: str, n: int) -> list[int]:
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1] :].tolist()
