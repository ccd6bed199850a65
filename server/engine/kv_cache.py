"""A preallocated KV cache with one row per running sequence, and the attention that uses it.

Like gpt-fast's static cache, sized once: `max_seqs × max_len` tokens per layer, so memory never
grows. The engine keeps running sequences in rows 0..n-1 (it moves the last row into a finished
row's place), so every step reads the prefix `[:n, :, :kv_len]` as a view, without copies.

Each attention module owns its K/V buffers (`loraplex_k`, `loraplex_v`) and `slot_attention`,
registered as a transformers attention implementation, writes the new keys and values there
before attending (as vLLM's attention backends own the cache write). The model code stays
unchanged for any HF decoder (Llama, Mistral, Qwen2, GPT-2, ...), and because nothing is
indexed by layer number, one compiled decoder layer serves every layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from adapters.cpu.allocator import lazy_zeros

ATTN_IMPLEMENTATION = "loraplex_slots"


class SlotKVCache:
    """What the next forward writes, shared by every layer; speaks the `Cache.update` protocol."""

    is_compileable = False

    def __init__(self, max_seqs: int, max_len: int, dtype: torch.dtype, device: torch.device):
        self.max_seqs, self.max_len = max_seqs, max_len
        self.dtype, self.device = dtype, device
        self.modules: list[torch.nn.Module] = []
        # the next forward covers cache `rows`: from position 0 (prefill, positions None), or t tokens each at
        # `positions` (n, t) of rows row0..row0+n-1 (decode: t = 1, rows 0..n-1; a chunk of a long prompt: n = 1),
        # attending to their first kv_len positions
        self.positions: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None
        self.row0 = 0
        self.kv_len = 0

    def attach(self, attention: torch.nn.Module, kv_heads: int, head_dim: int) -> None:
        shape = (self.max_seqs, kv_heads, self.max_len, head_dim)
        # zeros that take memory as sequences fill them (adapters.cpu.allocator; a compiled layer's first call maps them in)
        attention.register_buffer("loraplex_k", lazy_zeros(shape, self.dtype, self.device), persistent=False)
        attention.register_buffer("loraplex_v", lazy_zeros(shape, self.dtype, self.device), persistent=False)
        attention.loraplex_cache = self
        self.modules.append(attention)

    def prepare_prefill(self, row0: int, n: int, length: int) -> None:
        """Next forward: rows row0..row0+n-1, tokens at positions 0..length-1."""
        self.positions, self.kv_len = None, length
        self.rows = torch.arange(row0, row0 + n, device=self.device)

    def prepare_extend(self, row0: int, positions: torch.Tensor, kv_len: int) -> None:
        """Next forward: rows row0..row0+n-1 whose caches hold their earlier tokens, t more each at `positions`
        (n, t), attending to positions [0, kv_len) (a decode step: rows 0..n-1, t = 1)."""
        self.positions, self.kv_len, self.row0 = positions, kv_len, row0
        self.rows = torch.arange(row0, row0 + positions.shape[0], device=positions.device)

    def update(self, key_states, value_states, *args, **kwargs):
        return key_states, value_states  # slot_attention writes them into the module's buffers

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy sequence row `src` into row `dst` (compaction after `dst` finished)."""
        for m in self.modules:
            m.loraplex_k[dst, :, :length] = m.loraplex_k[src, :, :length]
            m.loraplex_v[dst, :, :length] = m.loraplex_v[src, :, :length]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv_len


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Write this step's K/V into the module's cache rows, then SDPA (prefill: over the fresh K/V)."""
    c: SlotKVCache = module.loraplex_cache
    kb, vb = module.loraplex_k, module.loraplex_v
    if c.positions is None:  # prefill from position 0: attend to the fresh K/V, store them
        t = key.shape[2]
        kb[c.rows, :, :t] = key
        vb[c.rows, :, :t] = value
        # the runner's mask here is the causal one (prompts right-padded, padding after each prompt's tokens):
        # SDPA's own causal path computes it without reading the mask, 1.8× faster at 1,800 tokens
        attention_mask = None
        k, v = key, value
    else:  # (n, heads, t, dim) into rows × positions, then attend to each row's prefix (a view, not a copy)
        n = query.shape[0]
        kb[c.rows[:, None], :, c.positions] = key.transpose(1, 2)
        vb[c.rows[:, None], :, c.positions] = value.transpose(1, 2)
        k, v = kb[c.row0 : c.row0 + n, :, : c.kv_len], vb[c.row0 : c.row0 + n, :, : c.kv_len]
    out = F.scaled_dot_product_attention(
        query, k, v, attn_mask=attention_mask, is_causal=attention_mask is None, scale=scaling,
        enable_gqa=k.shape[1] != query.shape[1],
    )  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_IMPLEMENTATION, slot_attention)
