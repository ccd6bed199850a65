"""What a training run is given and what it returns: `TrainConfig`, `count_steps`, `TrainResult`.

The contract between the trainer (`adapters.trainer`) and whoever starts runs, importable without
the training machinery. Each field has a one-line docstring, as litgpt's `args.py`; invalid
fields raise one ValueError naming each of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters.switchlora import INITS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
METHODS = ("lora", "switchlora")
LOG_WINDOW = 10  # optimizer steps whose mean loss is TrainResult.train_loss


@dataclass
class TrainConfig:
    """One training run; invalid fields raise ValueError naming each of them."""

    model: str
    """HF model directory (or hub id) of the base model."""
    train_file: Path
    """JSONL training examples (adapters.data: prompt/completion or messages)."""
    out_dir: Path
    """Where the PEFT adapter is written (adapter_config.json + adapter_model.safetensors)."""
    validation_file: Path | None = None
    """JSONL examples for the validation loss (same shapes as train_file)."""
    method: str = "lora"
    """"lora" or "switchlora" (arXiv 2406.06564, exported to a LoRA by truncated SVD)."""
    rank: int = 8
    """LoRA rank r."""
    alpha: float = 16.0
    """LoRA alpha: the term is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the LoRA branch's input (lora only)."""
    target_modules: list[str] | None = None
    """Leaf names of the layers to adapt (q_proj, ...); None = every nn.Linear / Conv1D except lm_head."""
    n_epochs: int = 3
    """Passes over the training file."""
    max_steps: int | None = None
    """Optimizer steps; when set it overrides n_epochs."""
    learning_rate: float = 2e-4
    """Peak learning rate."""
    batch_size: int = 8
    """Examples (or packed rows) per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    warmup_ratio: float = 0.03
    """Fraction of the steps spent warming the learning rate up from 0 (rounded up)."""
    lr_scheduler: str = "cosine"
    """Decay after warm-up: cosine | linear | constant."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay."""
    max_grad_norm: float | None = 1.0
    """Clip the gradients' total norm to this (None = no clipping)."""
    max_length: int = 1024
    """Tokens per example (longer ones are truncated) and per packed row."""
    packing: bool = False
    """Concatenate examples into rows of up to max_length tokens; they do not attend to each other."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass, and fix glibc's mmap threshold so that freed ones leave
    the resident set at once (adapters.memory): the least memory (~1.1 GiB peak for the default model,
    LoRA, batch 8 × 155 tokens), each step slower."""
    eval_every: int | None = None
    """Optimizer steps between evaluations; None = at the end of each epoch (with a validation file)."""
    early_stopping_patience: int | None = None
    """Evaluations without improvement before stopping; the best adapter is the one exported."""
    seed: int = 0
    """Seeds the adapter's initialization, the data order and dropout."""
    dtype: str = "float32"
    """The base model's dtype: float32 | bfloat16 | float16 (lora's A and B train in float32)."""
    export_rank: int | None = None
    """switchlora: rank of the exported adapter (None = rank)."""
    switch_interval: float = 40.0
    """switchlora: initial steps between switches of the same rank direction (interval0)."""
    switch_ratio: float = 0.1
    """switchlora: the switching rate falls to 0.3 of its start at this fraction of the steps."""
    switch_warm_steps: int = 5
    """switchlora: steps a switched vector's counterpart stays frozen."""
    switch_init: str = "switchlora"
    """switchlora: "switchlora" (the paper's non-zero A and B) or "lora" (the authors' origin_lora: B = 0)."""
    checkpoint_dir: Path | None = None
    """Where checkpoints go; a checkpoint already there is resumed from."""
    checkpoint_every: int = 50
    """Optimizer steps between checkpoints."""
    max_examples: int | None = None
    """Refuse training files with more examples than this."""

    def __post_init__(self) -> None:
        for name in ("train_file", "out_dir", "validation_file", "checkpoint_dir"):
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))

    def problems(self) -> list[str]:
        """Every invalid field, named."""
        p = []
        if self.method not in METHODS:
            p.append(f"method must be one of {list(METHODS)}, got {self.method!r}")
        if self.lr_scheduler not in SCHEDULERS:
            p.append(f"lr_scheduler must be one of {list(SCHEDULERS)}, got {self.lr_scheduler!r}")
        if self.dtype not in DTYPES:
            p.append(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        at_least_1 = ("rank", "n_epochs", "max_steps", "batch_size", "grad_accum", "eval_every")
        at_least_1 += ("early_stopping_patience", "checkpoint_every", "export_rank", "max_examples")
        for name in at_least_1:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                p.append(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("alpha", "learning_rate", "max_grad_norm", "switch_interval", "switch_ratio"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                p.append(f"{name} must be > 0, got {value!r}")
        if not 0 <= self.dropout < 1:
            p.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not 0 <= self.warmup_ratio <= 1:
            p.append(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio!r}")
        if self.weight_decay < 0:
            p.append(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.max_length < 2:
            p.append(f"max_length must be >= 2, got {self.max_length!r}")
        if self.target_modules is not None and not self.target_modules:
            p.append("target_modules must name at least one layer (or be None for all)")
        if self.method == "switchlora":
            if self.dropout:
                p.append("dropout is not supported with method 'switchlora'")
            if self.switch_init not in INITS:
                p.append(f"switch_init must be one of {list(INITS)}, got {self.switch_init!r}")
            if self.switch_warm_steps < 0 or self.switch_interval < 2 * self.switch_warm_steps:
                p.append("switch_interval must be >= 2 * switch_warm_steps (and switch_warm_steps >= 0)")
        return p


def count_steps(cfg: TrainConfig, n_examples: int) -> int:
    """Optimizer steps the run will take. With packing this is an upper bound (rows <= examples);
    `train` reports the exact total in its events."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return cfg.n_epochs * math.ceil(n_examples / (cfg.batch_size * cfg.grad_accum))


@dataclass
class TrainResult:
    """How a run ended."""

    status: str
    """"completed" | "stopped" (should_stop gave a reason) | "early_stopped"."""
    reason: str | None
    """should_stop's reason, or why training stopped early."""
    steps: int
    """Optimizer steps taken (resumed steps included)."""
    total_steps: int
    """Optimizer steps the run was planned for."""
    trained_tokens: int
    """Tokens that carried loss, summed over the run."""
    train_loss: float | None
    """Mean loss of the last LOG_WINDOW optimizer steps."""
    eval_loss: float | None
    """Validation loss of the exported adapter (the best one with early stopping)."""
    out_dir: Path | None
    """The exported adapter; None when stopped."""
    energy_retained: float | None
    """switchlora: the fraction of ΔW's energy the exported rank kept."""
