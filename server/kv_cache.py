"""A preallocated KV cache with one row per running sequence, and the attention that reads it.

Like gpt-fast's static cache, sized once: `max_seqs × max_len` tokens per layer, so memory never
grows. The engine keeps running sequences in rows 0..n-1 (it moves the last row into a finished
row's place), so every step reads the prefix `[:n, :, :kv_len]` as a view, without copies.

The cache speaks transformers' `Cache.update` protocol, and `slot_attention` is registered as
an attention implementation, so any HF decoder that uses both (Llama, Mistral, Qwen2, GPT-2,
...) runs unchanged on top of it; the engine passes the 4D mask itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

ATTN_IMPLEMENTATION = "loraplex_slots"


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA over the cache view; GQA without materialising repeated K/V."""
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=key.shape[1] != query.shape[1]
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_IMPLEMENTATION, slot_attention)


class SlotKVCache:
    """Per-layer K/V of shape (max_seqs, kv_heads, max_len, head_dim), allocated at first use."""

    is_compileable = False

    def __init__(self, num_layers: int, max_seqs: int, max_len: int, dtype: torch.dtype, device: torch.device):
        self.max_seqs, self.max_len = max_seqs, max_len
        self.dtype, self.device = dtype, device
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        # what the next forward writes: rows [row0, row0 + n), at `positions` (decode) or from 0 (prefill)
        self._row0 = 0
        self._n = 0
        self._positions: torch.Tensor | None = None
        self._kv_len = 0

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.keys + self.values if t is not None)

    def prepare_prefill(self, row0: int, n: int, length: int) -> None:
        """Next forward: rows row0..row0+n-1, tokens at positions 0..length-1."""
        self._row0, self._n, self._positions, self._kv_len = row0, n, None, length

    def prepare_decode(self, positions: torch.Tensor, kv_len: int) -> None:
        """Next forward: rows 0..len(positions)-1, one token each, at `positions`."""
        self._row0, self._n, self._positions, self._kv_len = 0, positions.shape[0], positions, kv_len
        self._rows = torch.arange(positions.shape[0], device=positions.device)

    def _allocate(self, layer_idx: int, like: torch.Tensor) -> None:
        shape = (self.max_seqs, like.shape[1], self.max_len, like.shape[3])
        self.keys[layer_idx] = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.values[layer_idx] = torch.zeros(shape, dtype=self.dtype, device=self.device)

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        # key_states: (n, kv_heads, T, head_dim)
        if self.keys[layer_idx] is None:
            self._allocate(layer_idx, key_states)
        k, v = self.keys[layer_idx], self.values[layer_idx]
        rows = slice(self._row0, self._row0 + self._n)
        if self._positions is None:
            t = key_states.shape[2]
            k[rows, :, :t] = key_states
            v[rows, :, :t] = value_states
        else:
            k[self._rows, :, self._positions] = key_states[:, :, 0]
            v[self._rows, :, self._positions] = value_states[:, :, 0]
        return k[rows, :, : self._kv_len], v[rows, :, : self._kv_len]

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy sequence row `src` into row `dst` (compaction after `dst` finished)."""
        for k, v in zip(self.keys, self.values):
            if k is not None:
                k[dst, :, :length] = k[src, :, :length]
                v[dst, :, :length] = v[src, :, :length]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len
