"""Adapter-aware automatic prefix caching: the KV of prompt blocks kept for the requests that start the same way.

As vLLM's automatic prefix caching: a prompt is cut into blocks of `block_size` tokens, and block i is known by a
hash chained over the prefix, `h_i = hash(h_{i-1}, tokens of block i)`, started from the adapters the request
applies (their version keys and weights). A LoRA'd projection changes the keys and values of every later layer
(through the residual stream), so KV computed under one adapter set is never reused under another; the base
model's blocks are shared by base requests. Each block's tokens are kept too, so a hash collision can never
serve another prompt's KV.

The engine's KV cache is one row per running sequence, so blocks live in a pool of their own and are copied:
into a new sequence's row when its prompt starts with cached blocks (then only the rest is prefilled, from the
first uncached position), and out of a row once a prompt is prefilled. No running request reads the pool, so any
block can be evicted; eviction is least-recently-used, a chain's blocks touched from its end back to its start so
that a prefix is never evicted before its continuations. Blocks of a replaced or deleted adapter are dropped.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from adapters.cpu.allocator import lazy_zeros
from adapters.tiers.registry import Adapter
from server.engine.kv_cache import SlotKVCache

BLOCK_SIZE = 16  # tokens per cached block
ROOT = 0x1F3D5B79  # the hash a chain starts from, with the adapter set mixed in


@dataclass(eq=False)
class _Block:
    index: int  # in the pool
    key: int  # chained hash
    parent: int  # the previous block's key (or the chain's root)
    tokens: tuple[int, ...]
    adapters: tuple[Adapter, ...]


def chain_root(adapters: list[tuple[Adapter, float]]) -> tuple[int, tuple[Adapter, ...]]:
    """The hash a prompt's chain starts from under `adapters` [(adapter, weight)], and those adapters."""
    return hash((ROOT, tuple(sorted((a.key, w) for a, w in adapters)))), tuple(a for a, _ in adapters)


class PrefixCache:
    """Blocks of prompt KV, per attention module of the slot cache, with their chained-hash index."""

    def __init__(self, cache: SlotKVCache, blocks: int, block_size: int):
        self.cache, self.block_size, self.capacity = cache, block_size, blocks
        for m in cache.modules:
            kv_heads, head_dim = m.loraplex_k.shape[1], m.loraplex_k.shape[3]
            shape = (blocks, kv_heads, block_size, head_dim)
            m.register_buffer("loraplex_prefix_k", lazy_zeros(shape, cache.dtype, cache.device), persistent=False)
            m.register_buffer("loraplex_prefix_v", lazy_zeros(shape, cache.dtype, cache.device), persistent=False)
        self._free = list(range(blocks - 1, -1, -1))
        self._blocks: OrderedDict[int, _Block] = OrderedDict()  # by key, least recently used first
        self.queried_tokens = 0  # prompt tokens looked up, for the metrics
        self.hit_tokens = 0  # of those, found cached

    def __len__(self) -> int:
        return len(self._blocks)

    def lookup(self, tokens: list[int], adapters: list[tuple[Adapter, float]]) -> list[_Block]:
        """The longest chain of cached blocks `tokens` starts with, under `adapters`. At least one token is left
        uncached: the last prompt token's logits must still be computed."""
        key, _ = chain_root(adapters)
        found: list[_Block] = []
        bs = self.block_size
        for start in range(0, len(tokens) - 1 - bs + 1, bs):
            block_tokens = tuple(tokens[start : start + bs])
            key = hash((key, block_tokens))
            block = self._blocks.get(key)
            if block is None or block.tokens != block_tokens:
                break
            found.append(block)
        for block in reversed(found):  # the chain's end first: its start ends up most recently used
            self._blocks.move_to_end(block.key)
        return found

    def count(self, queried: int, hit: int) -> None:
        """Record one admitted prompt's length and how much of it was cached (for the metrics)."""
        self.queried_tokens += queried
        self.hit_tokens += hit

    def copy_in(self, blocks: list[_Block], row: int) -> int:
        """Copy `blocks` into positions 0.. of cache row `row`; returns the number of tokens copied."""
        if not blocks:
            return 0
        index = torch.tensor([b.index for b in blocks], device=self.cache.device)
        n = len(blocks) * self.block_size
        for m in self.cache.modules:
            for pool, rows in ((m.loraplex_prefix_k, m.loraplex_k), (m.loraplex_prefix_v, m.loraplex_v)):
                # (blocks, kv_heads, B, dim) -> (kv_heads, blocks·B, dim)
                rows[row, :, :n] = pool[index].transpose(0, 1).flatten(1, 2)
        return n

    def insert(self, tokens: list[int], adapters: list[tuple[Adapter, float]], row: int) -> None:
        """Keep the full blocks of `tokens` (whose K/V are in cache row `row`) that are not cached yet."""
        if any(a.retired for a, _ in adapters) or self.capacity == 0:
            return
        key, owners = chain_root(adapters)
        bs = self.block_size
        chain: list[int] = []
        new: list[tuple[_Block, int]] = []  # with its first position in the prompt
        for start in range(0, len(tokens) - bs + 1, bs):
            block_tokens = tuple(tokens[start : start + bs])
            parent, key = key, hash((key, block_tokens))
            if key not in self._blocks:
                index = self._allocate(protect=set(chain))
                if index is None:
                    break
                block = _Block(index, key, parent, block_tokens, owners)
                self._blocks[key] = block
                new.append((block, start))
            chain.append(key)
        for k in reversed(chain):  # the chain's end first: its start ends up most recently used
            self._blocks.move_to_end(k)
        if new:
            self._copy_out(new, row)

    def _allocate(self, protect: set[int]) -> int | None:
        if not self._free:
            victim = next((k for k in self._blocks if k not in protect), None)
            if victim is None:
                return None
            self._free.append(self._blocks.pop(victim).index)
        return self._free.pop()

    def _copy_out(self, blocks: list[tuple[_Block, int]], row: int) -> None:
        bs = self.block_size
        index = torch.tensor([b.index for b, _ in blocks], device=self.cache.device)
        positions = torch.tensor([s + j for _, s in blocks for j in range(bs)], device=self.cache.device)
        for m in self.cache.modules:
            for pool, rows in ((m.loraplex_prefix_k, m.loraplex_k), (m.loraplex_prefix_v, m.loraplex_v)):
                kv = rows[row][:, positions]  # (kv_heads, n·B, dim)
                pool[index] = kv.view(kv.shape[0], len(blocks), bs, kv.shape[2]).transpose(0, 1)

    def drop_retired(self) -> int:
        """Free the blocks computed under adapters that were replaced or deleted; returns how many."""
        gone = [k for k, b in self._blocks.items() if any(a.retired for a in b.adapters)]
        for k in gone:
            self._free.append(self._blocks.pop(k).index)
        return len(gone)
