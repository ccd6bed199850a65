"""What the engine is built with, one small typed config per concern; importable without torch.

`server.settings.Settings` reads them all from the environment and the command line (it inherits every field,
so names, defaults and help texts exist once, here); tests and benchmarks build them directly. Each cross-field
rule lives in the config it concerns and names its fields.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from adapters.dtypes import DtypeName


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


Device = Literal["auto", "cuda", "cpu"]


class ModelConfig(_Config):
    """The base model: what, where, in which dtype."""

    model: str | None = None
    """Base model: an HF model directory or hub id; unset means the embedded SmolLM2-135M-Instruct."""
    device: Device = "auto"
    """cuda, cpu, or auto (cuda when present)."""
    dtype: Literal["auto", DtypeName] = "auto"
    """Weights and activations: auto (bfloat16 on CUDA, float32 on the CPU), float32, bfloat16 or float16."""


class SchedulerConfig(_Config):
    """Rows, lengths and queues: what the scheduler admits."""

    max_num_seqs: int = Field(32, ge=1)
    """Sequences decoded together at most (rows of the KV cache)."""
    max_model_len: int = Field(2048, ge=16)
    """Prompt plus output tokens of one sequence at most (capped by the model's context)."""
    max_prefill_tokens: int = Field(4096, ge=16)
    """Padded prompt tokens admitted in one prefill at most (one longer prompt still goes alone)."""
    prefill_chunk: int = Field(512, ge=0)
    """A longer prompt is prefilled this many tokens per engine step, decoding the others in between (vLLM's
    chunked prefill; one such prompt at a time, in the last KV-cache row); 0: in one forward; else at least 3."""
    max_waiting: int = Field(1024, ge=1)
    """Requests queued beyond the running batch before new ones get 503."""

    @model_validator(mode="after")
    def _check_chunk(self) -> SchedulerConfig:
        if self.prefill_chunk in (1, 2):
            raise ValueError("prefill_chunk must be 0 (off) or at least 3")
        return self


class PrefixConfig(_Config):
    """Automatic prefix caching: the KV of prompt blocks kept for the requests that start the same way."""

    prefix_caching: bool = True
    """Reuse the KV of prompt prefixes seen before (under the same adapters) instead of prefilling them again."""
    prefix_cache_tokens: int = Field(16384, ge=0)
    """Tokens of KV the prefix cache keeps at most (in blocks of 16), least recently used first out."""


class LoraConfig(_Config):
    """Adapters in memory: the host tier's budget and the device pool's pages."""

    lora_pages: int = Field(128, ge=2)
    """Pages of the device LoRA pool, shared by all resident adapters (a rank-16 adapter takes one page of 16)."""
    lora_page_size: int = Field(16, ge=1)
    """Rank rows per LoRA page."""
    lora_dtype: Literal["auto", DtypeName] = "auto"
    """dtype of the device LoRA pool: auto (the model's), float32, bfloat16 or float16 (bf16 halves the bytes a
    decode step reads, vLLM's lora_dtype; the arithmetic stays in the model's dtype)."""
    lora_backend: Literal["compiled", "eager"] = "compiled"
    """compiled (decoder layers compiled by torch.compile, LoRA kernels fused in) or eager."""
    decode_grouping: Literal["auto", "on", "off"] = "auto"
    """Decode steps whose rows share adapters: on, one LoRA shrink/expand per distinct adapter (segmented / grouped,
    Punica's SGMV); off, one per row (gathered, Punica's BGMV), the rows taken adapter by adapter so that each
    adapter's pages come from memory once. auto: on, except with the compiled backend on the CPU, where the fused
    gathered kernel is the faster at every decode shape measured (benchmarks/lora_ops.py)."""
    compile_in_background: bool = True
    """compiled backend: be ready at once, serving eagerly, and compile the decoder layer's graphs while the engine
    is idle (off: compile them all before /health/ready)."""
    max_lora_rank: int = Field(64, ge=1)
    """Largest adapter rank accepted."""
    host_adapter_bytes: int = Field(4 * 2**30, ge=0)
    """Host-memory budget for adapter weights; beyond it the least recently used are re-read from disk."""

    @model_validator(mode="after")
    def _check_rank_fits(self) -> LoraConfig:
        if self.max_lora_rank > (self.lora_pages - 1) * self.lora_page_size:
            raise ValueError(
                "max_lora_rank must fit in the LoRA pool: max_lora_rank <= (lora_pages - 1) * lora_page_size "
                f"({self.max_lora_rank} > ({self.lora_pages} - 1) * {self.lora_page_size})"
            )
        return self


class MergeConfig(_Config):
    """Automatic merging of a dominant adapter (dLoRA)."""

    auto_merge: bool = True
    """Fold an adapter into the base weights while it serves nearly all running sequences."""
    merge_threshold: float = Field(0.9, gt=0, le=1)
    """Share of the running sequences one adapter must hold, every step of the window, to be merged."""
    merge_window: int = Field(8, ge=1)
    """Decode steps observed before merging and before unmerging."""


class CpuConfig(_Config):
    """CPU-only policies, applied once at start-up where the device is the CPU."""

    pack_weights: bool = True
    """fp32 on the CPU: a oneDNN-packed copy of every frozen weight; faster decoding, but the weights' memory twice."""
    keep_freed_memory: bool = True
    """Freed memory stays in the process for reuse, one arena for all threads (faster CPU forwards and merges; the
    resident set keeps its peak)."""
    reserve_memory: bool = False
    """Write the KV cache, the prefix cache and the LoRA pool once at start-up, so that their memory is resident from
    the start (the footprint at ready is the footprint under load); else their pages are mapped in as they first
    fill, and the resident set grows towards the same size with traffic."""
    threads: int | None = Field(None, ge=1)
    """Torch intra-op threads for the engine (default: torch's choice)."""
    trim_interval: float = Field(10.0, ge=0)
    """With keep_freed_memory: seconds between returns of the kept heap's free pages to the OS (a few ms each; the
    next forwards fault their temporaries in again), so the resident set cannot creep; 0: never."""


class DeviceConfig(_Config):
    """What the engine may take of its device."""

    memory_fraction: float | None = Field(None, gt=0, le=1)
    """Share of the device's memory (host memory on the CPU) for the weights, activations, KV cache and LoRA pool
    (vLLM's gpu_memory_utilization): the cache's rows and the pool's pages are sized to fit it, max_num_seqs and
    lora_pages their upper bounds. Unset: 0.9 on CUDA; on the CPU the configured sizes, unchecked."""
    cuda_graphs: bool = False
    """CUDA: capture each decode step's forward as a CUDA graph, one per batch/length bucket (off until verified on
    a GPU: benchmarks/gpu_check.py)."""


class EngineConfig(DeviceConfig, CpuConfig, MergeConfig, LoraConfig, PrefixConfig, SchedulerConfig):
    """Everything the engine is built with (each piece reads its own concern's fields)."""
