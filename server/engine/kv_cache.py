"""A preallocated KV cache with one row per running sequence, and the attention that uses it.

Like gpt-fast's static cache, sized once: `rows × max_len` tokens per layer, so memory never
grows. The engine keeps running sequences in rows 0..n-1 (it moves the last row into a finished
row's place), so every step reads the prefix `[:n, :, :kv_len]` as a view, without copies.

Each attention module owns its K/V buffers (`loraplex_k`, `loraplex_v`) and `slot_attention`,
registered as a transformers attention implementation (with no mask function: the model hands it no mask),
writes the new keys and values there before attending (as vLLM's attention backends own the cache write). The
model code stays unchanged for any HF decoder (Llama, Mistral, Qwen2, GPT-2, ...), and because nothing is
indexed by layer number, one compiled decoder layer serves every layer.

Attention after a cached prefix (a decode step, a chunk of a long prompt) takes each row's length, not a boolean
mask: the rows' lengths become one additive bias per forward, and the query heads that share a KV head are grouped
into its query rows (`(n, kv_heads, groups·t, dim)`), so SDPA sees equal head counts and never expands the KV heads.
That keeps CUDA on its memory-efficient kernel (flash rejects a bias, and the efficient kernel unequal head counts)
where a boolean mask with `enable_gqa` falls back to the math kernel. A prefill from position 0 is exactly causal
and runs SDPA's own causal path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from adapters.cpu.allocator import lazy_zeros

ATTN_IMPLEMENTATION = "loraplex_slots"


class SlotKVCache:
    """What the next forward writes and reads, shared by every layer; speaks the `Cache.update` protocol."""

    is_compileable = False

    def __init__(self, rows: int, max_len: int, dtype: torch.dtype, device: torch.device):
        self.rows_total, self.max_len = rows, max_len
        self.dtype, self.device = dtype, device
        self.modules: list[torch.nn.Module] = []
        # the next forward: from position 0 (prefill: `positions` None), or t tokens each at `positions` (n, t) of
        # cache rows `rows` (n,), attending to the first kv_len positions of rows row0..row0+n-1 through `bias`
        self.positions: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None
        self.row0 = 0
        self.kv_len = 0
        self.bias: torch.Tensor | None = None

    def attach(self, attention: torch.nn.Module, kv_heads: int, head_dim: int) -> None:
        shape = (self.rows_total, kv_heads, self.max_len, head_dim)
        # zeros that take memory as sequences fill them (adapters.cpu.allocator; a compiled layer's first call maps
        # them in)
        attention.register_buffer("loraplex_k", lazy_zeros(shape, self.dtype, self.device), persistent=False)
        attention.register_buffer("loraplex_v", lazy_zeros(shape, self.dtype, self.device), persistent=False)
        attention.loraplex_cache = self
        self.modules.append(attention)

    def prepare_prefill(self, row0: int, n: int, length: int) -> None:
        """Next forward: rows row0..row0+n-1, tokens at positions 0..length-1."""
        self.positions, self.kv_len, self.row0, self.bias = None, length, row0, None
        self.rows = torch.arange(row0, row0 + n, device=self.device)

    def prepare_decode(self, rows: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor, kv_len: int) -> None:
        """Next forward: one token per entry at `positions` (b, 1), written to cache rows `rows` (b,) (padding
        entries to a scratch row), entry i attending to the first lengths[i] keys of row i (i < b) among kv_len."""
        self.positions, self.rows, self.row0, self.kv_len = positions, rows, 0, kv_len
        valid = torch.arange(kv_len, device=lengths.device) < lengths[:, None]  # (b, kv_len)
        self.bias = _bias(valid[:, None, None, :], self.dtype)  # (b, 1, 1, kv_len): the same for every query row

    def prepare_extend(self, row0: int, positions: torch.Tensor, kv_len: int) -> None:
        """Next forward: rows row0..row0+n-1 hold their earlier tokens, t more each at `positions` (n, t), each
        attending to the keys up to its own position (a later chunk of a long prompt, prompts after a cached
        prefix)."""
        self.positions, self.row0, self.kv_len = positions, row0, kv_len
        self.rows = torch.arange(row0, row0 + positions.shape[0], device=positions.device)
        valid = torch.arange(kv_len, device=positions.device) <= positions[:, :, None]  # (n, t, kv_len)
        self.bias = _bias(valid[:, None], self.dtype)  # (n, 1, t, kv_len)

    def update(self, key_states, value_states, *args, **kwargs):
        return key_states, value_states  # slot_attention writes them into the module's buffers

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy sequence row `src` into row `dst` (compaction after `dst` finished)."""
        for m in self.modules:
            m.loraplex_k[dst, :, :length] = m.loraplex_k[src, :, :length]
            m.loraplex_v[dst, :, :length] = m.loraplex_v[src, :, :length]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv_len


def _bias(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where `valid`, -inf elsewhere: an additive attention bias."""
    return torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill_(~valid, float("-inf"))


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Write this step's K/V into the module's cache rows, then SDPA (prefill: over the fresh K/V)."""
    c: SlotKVCache = module.loraplex_cache
    kb, vb = module.loraplex_k, module.loraplex_v
    if c.positions is None:  # prefill from position 0: attend to the fresh K/V, store them
        t = key.shape[2]
        kb[c.rows, :, :t] = key
        vb[c.rows, :, :t] = value
        # prompts are right-padded, padding after each prompt's tokens: exactly SDPA's causal path
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                             enable_gqa=key.shape[1] != query.shape[1])  # fmt: skip
        return out.transpose(1, 2).contiguous(), None
    # (n, kv_heads, t, dim) into rows × positions, then attend to each row's prefix (a view, not a copy)
    n, heads, t, dim = query.shape
    kb[c.rows[:, None], :, c.positions] = key.transpose(1, 2)
    vb[c.rows[:, None], :, c.positions] = value.transpose(1, 2)
    k, v = kb[c.row0 : c.row0 + n, :, : c.kv_len], vb[c.row0 : c.row0 + n, :, : c.kv_len]
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    # the query heads of one KV head as its query rows (head j uses KV head j // groups, as transformers' repeat_kv)
    q = query.reshape(n, kv_heads, groups * t, dim)
    bias = c.bias if t == 1 else c.bias.repeat(1, 1, groups, 1)  # rows (group, token): each token's row per group
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scaling)
    return out.view(n, heads, t, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_IMPLEMENTATION, slot_attention)
