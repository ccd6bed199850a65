"""All configuration: one pydantic-settings `Settings`, read from `LORAPLEX_*` and the CLI.

It builds the small per-concern dataclasses (EngineConfig, ...) that are passed down; nothing
below `server/` reads the environment.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.engine import EngineConfig
from server.model import DTYPES


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORAPLEX_", extra="ignore")

    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = 8000
    """Port to listen on."""
    model: str | None = None
    """Base model: an HF model directory or hub id; unset means the embedded SmolLM2-135M-Instruct."""
    adapter_dir: Path | None = None
    """Every subdirectory holding a PEFT adapter is loaded at start under the subdirectory's name."""
    data_dir: Path = Path(".loraplex")
    """Uploaded adapters, training files and the job database."""
    cache_dir: Path | None = None
    """Where the converted default model is kept (default: <data_dir>/cache)."""
    api_keys_file: Path | None = None
    """Lines `KEY [scope,scope]` (scopes: inference, admin; default both); unset means no auth."""
    metrics_require_key: bool = False
    """Whether /metrics needs an API key (when keys are configured)."""
    device: str = "auto"
    """cuda, cpu, or auto (cuda when present)."""
    dtype: str = "float32"
    """Weights and activations: float32, bfloat16 or float16."""
    max_model_len: int = Field(2048, ge=16)
    """Prompt plus output tokens of one sequence at most (capped by the model's context)."""
    max_num_seqs: int = Field(32, ge=1)
    """Sequences decoded together at most."""
    max_prefill_tokens: int = Field(4096, ge=16)
    """Padded prompt tokens admitted in one prefill at most."""
    prefill_chunk: int = Field(512, ge=0)
    """A longer prompt is prefilled this many tokens per engine step, decoding the others in between (0: at once)."""
    max_waiting: int = Field(1024, ge=1)
    """Requests queued beyond the running batch before new ones get 503."""
    lora_pages: int = Field(128, ge=2)
    """Pages of the device LoRA pool (a rank-16 adapter takes one page of 16 rank rows)."""
    lora_page_size: int = Field(16, ge=1)
    """Rank rows per LoRA page."""
    max_lora_rank: int = Field(64, ge=1)
    """Largest adapter rank accepted."""
    max_upload_bytes: int = Field(512 * 2**20, ge=1024)
    """Largest adapter upload (body, and an archive's decompressed size)."""
    max_request_bytes: int = Field(16 * 2**20, ge=1024)
    """Largest JSON request body elsewhere."""
    host_adapter_bytes: int = Field(4 * 2**30, ge=0)
    """Host-memory budget for adapter weights; beyond it the least recently used are re-read from disk."""
    lora_backend: str = "compiled"
    """'compiled' (decoder layers compiled, LoRA kernels fused in) or 'eager'."""
    lora_dtype: str = "auto"
    """dtype of the device LoRA pool: auto (the model's), float32, bfloat16 or float16 (half the bytes per step)."""
    pack_weights: bool = True
    """fp32 on the CPU: a oneDNN-packed copy of every frozen weight; faster decoding, but the weights' memory twice."""
    keep_freed_memory: bool = True
    """Freed memory stays in the process for reuse, one arena for all threads (faster CPU forwards and merges; the
    resident set keeps its peak)."""
    auto_merge: bool = True
    """Fold an adapter into the base weights while it serves nearly all running sequences (dLoRA)."""
    merge_threshold: float = Field(0.9, gt=0, le=1)
    """Share of the running sequences one adapter must hold, every step of the window, to be merged."""
    merge_window: int = Field(8, ge=1)
    """Decode steps observed before merging and before unmerging."""
    threads: int | None = None
    """Torch intra-op threads for the engine (default: torch's choice)."""
    drain_timeout: float = Field(30.0, ge=0)
    """Seconds SIGTERM waits for running requests before exiting."""
    max_training_file_bytes: int = Field(64 * 2**20, ge=1024)
    """Largest training or validation file upload."""
    max_training_examples: int = Field(100_000, ge=1)
    """Most examples in one training file."""
    max_train_steps: int = Field(20_000, ge=1)
    """Most optimizer steps one job may take."""
    max_job_seconds: float = Field(6 * 3600, gt=0)
    """Longest wall-clock time one job may train (a job may ask for less with max_seconds)."""
    max_concurrent_jobs: int = Field(1, ge=1)
    """Jobs training at the same time; more wait in the queue."""
    training_threads: int = Field(max(1, (os.cpu_count() or 2) // 2), ge=1)
    """Torch threads of each training worker process (serving keeps the rest)."""
    training_nice: int = Field(10, ge=0, le=19)
    """Niceness of training worker processes: serving keeps priority on shared cores."""

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.lora_backend not in ("compiled", "eager"):
            raise ValueError("lora_backend must be 'compiled' or 'eager'")
        if self.dtype not in DTYPES:
            raise ValueError("dtype must be float32, bfloat16 or float16")
        if self.lora_dtype != "auto" and self.lora_dtype not in DTYPES:
            raise ValueError("lora_dtype must be auto, float32, bfloat16 or float16")
        if self.max_lora_rank > (self.lora_pages - 1) * self.lora_page_size:
            raise ValueError("max_lora_rank must fit in the LoRA pool: max_lora_rank <= (lora_pages - 1) * lora_page_size")
        if self.prefill_chunk in (1, 2):
            raise ValueError("prefill_chunk must be 0 (off) or at least 3")
        return self

    @property
    def model_cache_dir(self) -> Path:
        return self.cache_dir or self.data_dir / "cache"

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            max_num_seqs=self.max_num_seqs,
            max_model_len=self.max_model_len,
            max_prefill_tokens=self.max_prefill_tokens,
            prefill_chunk=self.prefill_chunk,
            lora_pages=self.lora_pages,
            lora_page_size=self.lora_page_size,
            lora_backend=self.lora_backend,
            lora_dtype=self.lora_dtype,
            pack_weights=self.pack_weights,
            keep_freed_memory=self.keep_freed_memory,
            auto_merge=self.auto_merge,
            merge_threshold=self.merge_threshold,
            merge_window=self.merge_window,
        )
