"""What a training run is given and what it returns: `Hyperparameters`, `TrainConfig`, `count_steps`, `TrainResult`.

The contract between the trainer (`adapters.training.trainer`) and whoever starts runs (`loraplex train`, the job
API), importable without torch. `Hyperparameters` holds what a user may set, with its one set of defaults and
limits; `TrainConfig` adds what a run needs besides (model, files, directories). Each field has a one-line
docstring, as litgpt's `args.py`; an invalid config raises one ValueError (pydantic's ValidationError) naming
every field that is wrong.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from adapters.dtypes import DtypeName

Method = Literal["lora", "switchlora"]
Scheduler = Literal["cosine", "linear", "constant"]
SwitchInit = Literal["switchlora", "lora"]
LOG_WINDOW = 10  # optimizer steps whose mean loss is TrainResult.train_loss


class Hyperparameters(BaseModel):
    """What a user may set for a run (`loraplex train` options, a job's `method.hyperparameters`); every float finite."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)

    rank: int = Field(8, ge=1)
    """LoRA rank r."""
    alpha: float | None = Field(None, gt=0, le=2**16)
    """LoRA alpha: the term is scaled by alpha / rank (default: 2 × rank)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA branch's input (lora only)."""
    target_modules: list[str] | None = Field(None, min_length=1)
    """Leaf names of the layers to adapt (q_proj, ...); None = every linear layer except lm_head."""
    n_epochs: int | None = Field(None, ge=1)
    """Passes over the training file; None (auto): enough for about 300 example passes, 1 to 25 (`auto_epochs`)."""
    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps; when set it overrides n_epochs."""
    learning_rate: float = Field(2e-3, gt=0, le=10)
    """Peak learning rate (the default learns 30 facts in one run: benchmarks/facts.py)."""
    batch_size: int = Field(4, ge=1)
    """Examples (or packed rows) per micro-batch."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    """Fraction of the steps spent warming the learning rate up from 0 (rounded up)."""
    lr_scheduler: Scheduler = "cosine"
    """Decay after warm-up: cosine | linear | constant."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW's decoupled weight decay."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the gradients' total norm to this (None = no clipping)."""
    max_length: int = Field(1024, ge=8)
    """Tokens per example (longer ones are truncated) and per packed row."""
    packing: bool = False
    """Concatenate examples into rows of up to max_length tokens; they do not attend to each other."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass, and return freed memory to the OS at once (the least memory,
    each step slower)."""
    eval_every: int | None = Field(None, ge=1)
    """Optimizer steps between evaluations; None = at the end of each epoch (with a validation file)."""
    early_stopping_patience: int | None = Field(None, ge=1)
    """Evaluations without improvement before stopping; the best adapter is the one exported."""
    export_rank: int | None = Field(None, ge=1)
    """switchlora: rank of the exported adapter (None = rank)."""
    switch_interval: float = Field(40.0, gt=0)
    """switchlora: initial steps between switches of the same rank direction (interval0)."""
    switch_ratio: float = Field(0.1, gt=0, le=1)
    """switchlora: the switching rate falls to 0.3 of its start at this fraction of the steps."""
    switch_warm_steps: int = Field(5, ge=0)
    """switchlora: steps a switched vector's counterpart stays frozen."""
    switch_init: SwitchInit = "switchlora"
    """switchlora: "switchlora" (the paper's non-zero A and B) or "lora" (the authors' origin_lora: B = 0)."""
    checkpoint_every: int = Field(50, ge=1)
    """Optimizer steps between checkpoints."""

    @model_validator(mode="after")
    def _default_alpha(self) -> Hyperparameters:
        if self.alpha is None:
            self.alpha = 2.0 * self.rank
        return self


class TrainConfig(Hyperparameters):
    """One training run."""

    model: str
    """HF model directory (or hub id) of the base model."""
    train_file: Path
    """JSONL training examples (adapters.training.data: prompt/completion or messages)."""
    out_dir: Path
    """Where the PEFT adapter is written (adapter_config.json + adapter_model.safetensors)."""
    validation_file: Path | None = None
    """JSONL examples for the validation loss (same shapes as train_file)."""
    method: Method = "lora"
    """"lora" or "switchlora" (arXiv 2406.06564, exported to a LoRA by truncated SVD)."""
    seed: int = 0
    """Seeds the adapter's initialization, the data order and dropout."""
    dtype: DtypeName = "float32"
    """The base model's dtype: float32 | bfloat16 | float16 (lora's A and B train in float32)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the run puts its copy of the model: auto (cuda when present), cpu or cuda."""
    checkpoint_dir: Path | None = None
    """Where checkpoints go; a checkpoint already there is resumed from."""
    max_examples: int | None = Field(None, ge=1)
    """Refuse training files with more examples than this."""

    @model_validator(mode="after")
    def _check_method(self) -> TrainConfig:
        if problems := method_problems(self.method, self):
            raise ValueError("; ".join(problems))
        return self


METHOD_ONLY = {"lora": {"dropout"}, "switchlora": {"export_rank", "switch_interval", "switch_ratio", "switch_warm_steps",
                                                   "switch_init"}}  # fmt: skip
"""Hyperparameters that only one method reads."""


def method_hyperparameters(method: Method, values: dict) -> dict:
    """`values` (a Hyperparameters dump) without the fields only other methods read."""
    others = set().union(*(fields for m, fields in METHOD_ONLY.items() if m != method))
    return {k: v for k, v in values.items() if k not in others}


def method_problems(method: Method, hp: Hyperparameters) -> list[str]:
    """What keeps `hp` from working with `method` (every rule that spans fields), each naming its fields."""
    problems = []
    if method == "switchlora":
        if hp.dropout:
            problems.append("dropout is not supported with method 'switchlora'")
        if hp.switch_interval < 2 * hp.switch_warm_steps:
            problems.append("switch_interval must be >= 2 * switch_warm_steps")
    return problems


AUTO_EXAMPLE_PASSES = 300  # n_epochs auto: a 30-example file is seen 10 times, 300 examples or more once


def auto_epochs(n_examples: int) -> int:
    """`n_epochs` when it is left to choose (OpenAI's "auto" also picks by the file's size): small files get more
    passes, so that a few dozen facts are learned in one default run."""
    return min(25, max(1, math.ceil(AUTO_EXAMPLE_PASSES / max(n_examples, 1))))


def count_steps(cfg: Hyperparameters, n_examples: int) -> int:
    """Optimizer steps the run will take. With packing this is an upper bound (rows <= examples);
    `train` reports the exact total in its events."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    epochs = cfg.n_epochs or auto_epochs(n_examples)
    return epochs * math.ceil(n_examples / (cfg.batch_size * cfg.grad_accum))


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
