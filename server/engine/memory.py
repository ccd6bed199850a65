"""The memory budget: how many KV-cache rows and LoRA pages fit in a share of the device's memory.

vLLM's `gpu_memory_utilization`: the budget is that share of the device's total memory (host memory on the CPU);
the weights and a measured activation peak come off it first, then the LoRA pool takes what its configured pages
need (at most a quarter of the rest), the prefix cache its configured tokens (at most half of what is left then),
and the KV cache the remainder, in whole rows of `max_model_len` tokens, up to `max_num_seqs`. The activation peak is measured by one forward of the largest prefill the scheduler admits
(`max_prefill_tokens`), before the cache and the pool exist: on CUDA the allocator's peak, on the CPU the growth of
the process's peak resident set.
"""

from __future__ import annotations

import logging
import os
import resource
from dataclasses import dataclass

import torch

from adapters.dtypes import torch_dtype
from adapters.targets import adaptable_layers, layer_shape
from server.engine.config import EngineConfig

log = logging.getLogger(__name__)

DEFAULT_CUDA_FRACTION = 0.9
LORA_SHARE = 0.25  # the most of what is left after weights and activations that the LoRA pool may take


class BudgetError(ValueError):
    """The budget cannot hold the model, its activations, one KV-cache row and one adapter of the largest rank."""


@dataclass
class MemoryPlan:
    """What the budget gives; all sizes in bytes."""

    budget: int
    weights: int
    activations: int
    kv_row: int
    kv_rows: int
    lora_page: int
    lora_pages: int
    prefix_tokens: int = 0
    kv_token: int = 0

    def describe(self) -> str:
        gib = 2**30
        return (f"memory budget {self.budget / gib:.2f} GiB: weights {self.weights / gib:.2f}, activations "
                f"{self.activations / gib:.2f}, KV cache {self.kv_rows} rows ({self.kv_rows * self.kv_row / gib:.2f}), "
                f"LoRA pool {self.lora_pages} pages ({self.lora_pages * self.lora_page / gib:.2f}), prefix cache "
                f"{self.prefix_tokens} tokens ({self.prefix_tokens * self.kv_token / gib:.2f})")  # fmt: skip


def device_memory(device: torch.device) -> int:
    """Total bytes of the device's memory (the host's on the CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def row_bytes(model: torch.nn.Module, max_len: int, dtype: torch.dtype) -> int:
    """KV-cache bytes of one sequence row: keys and values of every layer for max_len tokens."""
    c = model.config
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * kv_heads * max_len * head_dim * torch.empty((), dtype=dtype).element_size()


def page_bytes(model: torch.nn.Module, page_size: int, dtype: torch.dtype) -> int:
    """LoRA-pool bytes of one page: page_size rank rows of A and of B in every adaptable layer."""
    width = sum(sum(layer_shape(layer)) for layer in adaptable_layers(model).values())
    return width * page_size * torch.empty((), dtype=dtype).element_size()


def weight_bytes(model: torch.nn.Module, packed_copies: bool) -> int:
    """The model's parameters and buffers, plus oneDNN's packed copy of each linear weight where one is kept."""
    total = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    if packed_copies:
        total += sum(layer.weight.numel() * layer.weight.element_size() for layer in adaptable_layers(model).values())
        head = model.get_output_embeddings()
        total += head.weight.numel() * head.weight.element_size()
    return total


@torch.inference_mode()
def activation_peak(model: torch.nn.Module, tokens: int, device: torch.device) -> int:
    """Bytes a forward of `tokens` prompt tokens (last-token logits only) needs beyond the weights."""
    ids = torch.zeros(1, tokens, dtype=torch.long, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        model.get_output_embeddings()(model.base_model(input_ids=ids, use_cache=False).last_hidden_state[:, -1:])
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model.get_output_embeddings()(model.base_model(input_ids=ids, use_cache=False).last_hidden_state[:, -1:])
    return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024  # ru_maxrss is in KiB


def plan_memory(config: EngineConfig, model: torch.nn.Module, max_len: int, device: torch.device) -> MemoryPlan | None:
    """The plan for `config.memory_fraction` (None: unset on the CPU, where the configured sizes stand)."""
    fraction = config.memory_fraction or (DEFAULT_CUDA_FRACTION if device.type == "cuda" else None)
    if fraction is None:
        return None
    dtype = next(model.parameters()).dtype
    lora_dtype = dtype if config.lora_dtype == "auto" else torch_dtype(config.lora_dtype)
    packed = device.type == "cpu" and dtype == torch.float32 and config.pack_weights
    plan = MemoryPlan(
        budget=int(fraction * device_memory(device)),
        weights=weight_bytes(model, packed),
        activations=activation_peak(model, min(config.max_prefill_tokens, max_len), device),
        kv_row=row_bytes(model, max_len, dtype),
        kv_rows=0,
        lora_page=page_bytes(model, config.lora_page_size, lora_dtype),
        lora_pages=0,
    )
    free = plan.budget - plan.weights - plan.activations
    need_pages = 1 + -(-config.max_lora_rank // config.lora_page_size)  # the zero page and the largest adapter
    plan.lora_pages = min(config.lora_pages, max(need_pages, int(LORA_SHARE * free) // plan.lora_page))
    free_kv = free - plan.lora_pages * plan.lora_page
    plan.kv_token = plan.kv_row // max_len
    if config.prefix_caching:
        plan.prefix_tokens = min(config.prefix_cache_tokens, free_kv // 2 // plan.kv_token)
        free_kv -= plan.prefix_tokens * plan.kv_token
    plan.kv_rows = min(config.max_num_seqs, free_kv // plan.kv_row)
    if plan.kv_rows < 1 or free < need_pages * plan.lora_page:
        raise BudgetError(
            f"memory_fraction {fraction} of {device_memory(device) / 2**30:.1f} GiB leaves no room for one KV-cache row "
            f"of max_model_len {max_len} tokens ({plan.kv_row / 2**20:.0f} MiB) and a LoRA pool for max_lora_rank "
            f"{config.max_lora_rank} after the weights ({plan.weights / 2**30:.2f} GiB) and activations "
            f"({plan.activations / 2**30:.2f} GiB): raise memory_fraction or lower max_model_len / max_prefill_tokens"
        )
    log.info(plan.describe())
    return plan
