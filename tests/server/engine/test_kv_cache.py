"""The slot KV cache and its attention against plain SDPA over the full keys and values: a prefill, decode steps of
rows at different lengths (per-row lengths, grouped query heads, no boolean mask), a chunk after a cached prefix,
padding rows that write to a scratch row, and row moves."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from server.engine.kv_cache import SlotKVCache, slot_attention

ROWS, HEADS, KV_HEADS, DIM, MAX_LEN = 3, 4, 2, 8, 32


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor) -> torch.Tensor:
    """SDPA of queries at `q_positions` (t,) over keys 0..len(k)-1, each seeing keys up to its position."""
    mask = torch.arange(k.shape[2]) <= q_positions[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2)


def test_prefill_decode_chunk_and_move_match_plain_attention():
    g = torch.Generator().manual_seed(0)
    cache = SlotKVCache(ROWS + 1, MAX_LEN, torch.float32, torch.device("cpu"))  # + the padding's scratch row
    attn = nn.Module()
    cache.attach(attn, KV_HEADS, DIM)
    rand = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    # prefill rows 0..2 with 6 tokens each: attends to its own fresh keys, causally
    k_all, v_all = rand(ROWS, KV_HEADS, MAX_LEN, DIM), rand(ROWS, KV_HEADS, MAX_LEN, DIM)
    q = rand(ROWS, HEADS, 6, DIM)
    cache.prepare_prefill(0, ROWS, 6)
    out, _ = slot_attention(attn, q, k_all[:, :, :6], v_all[:, :, :6], attention_mask=None)
    torch.testing.assert_close(out, reference(q, k_all[:, :, :6], v_all[:, :, :6], torch.arange(6)))
    # one decode step: rows at position 6 (their key joins the cached ones), a fourth entry padding into the scratch
    # row; keys up to a bucket of 16, each row attending to its own 7
    q = rand(ROWS + 1, HEADS, 1, DIM)
    pos = torch.tensor([[6], [6], [6], [0]])
    scratch_before = attn.loraplex_k[:ROWS].clone()
    k_new = torch.cat([k_all[:, :, 6:7], rand(1, KV_HEADS, 1, DIM)])
    v_new = torch.cat([v_all[:, :, 6:7], rand(1, KV_HEADS, 1, DIM)])
    cache.prepare_decode(torch.tensor([0, 1, 2, ROWS]), pos, torch.tensor([7, 7, 7, 1]), 16)
    out, _ = slot_attention(attn, q, k_new, v_new, attention_mask=None)
    torch.testing.assert_close(out[:ROWS], reference(q[:ROWS], k_all[:, :, :7], v_all[:, :, :7], torch.tensor([6])))
    assert torch.equal(attn.loraplex_k[:ROWS, :, :6], scratch_before[:, :, :6])  # the padding wrote elsewhere
    assert torch.equal(attn.loraplex_k[ROWS, :, 0], k_new[ROWS, :, 0])
    # a chunk of 4 tokens at positions 7..10 in row 2 alone, after its cached prefix
    q = rand(1, HEADS, 4, DIM)
    pos = torch.arange(7, 11)[None]
    cache.prepare_extend(2, pos, 11)
    out, _ = slot_attention(attn, q, k_all[2:, :, 7:11], v_all[2:, :, 7:11], attention_mask=None)
    torch.testing.assert_close(out, reference(q, k_all[2:, :, :11], v_all[2:, :, :11], torch.arange(7, 11)))
    assert torch.equal(attn.loraplex_k[2, :, :11], k_all[2, :, :11])
    # compaction: row 2 moves into row 0 and is read back there
    cache.move_row(2, 0, 11)
    assert torch.equal(attn.loraplex_k[0, :, :11], k_all[2, :, :11]) and torch.equal(attn.loraplex_v[0, :, :11], v_all[2, :, :11])


def test_rows_at_different_lengths_see_only_their_own_prefix():
    g = torch.Generator().manual_seed(1)
    cache = SlotKVCache(2, MAX_LEN, torch.float32, torch.device("cpu"))
    attn = nn.Module()
    cache.attach(attn, KV_HEADS, DIM)
    attn.loraplex_k.normal_(generator=g)
    attn.loraplex_v.normal_(generator=g)
    q, k, v = (torch.randn(2, h, 1, DIM, generator=g) for h in (HEADS, KV_HEADS, KV_HEADS))
    pos = torch.tensor([[3], [9]])  # row 0 has 3 cached tokens, row 1 has 9
    cache.prepare_decode(torch.tensor([0, 1]), pos, pos[:, 0] + 1, 16)
    out, _ = slot_attention(attn, q, k, v, attention_mask=None)
    for row, p in enumerate((3, 9)):
        keys, values = attn.loraplex_k[row : row + 1, :, : p + 1], attn.loraplex_v[row : row + 1, :, : p + 1]
        torch.testing.assert_close(out[row : row + 1], reference(q[row : row + 1], keys, values, torch.tensor([p])))
