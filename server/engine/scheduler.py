"""The scheduler: which sequences wait, which run in which KV-cache rows, and which adapters they hold.

Running sequences occupy rows 0..n-1 of the KV cache: a finished sequence's row is refilled by the last one
(compaction), so every step reads a prefix of the cache as a view. Admission takes waiting sequences in arrival
order while rows and the prefill's token budget last, and leases each one's adapters in the device pool (S-LoRA's
unified pool: an adapter in use is never evicted). A sequence whose adapters do not fit waits for running ones to
finish, or is refused when nothing runs. A prompt longer than `prefill_chunk` becomes the partial sequence,
prefilled a chunk per step in the cache's last row while the others decode (vLLM's chunked prefill), one such
prompt at a time, in arrival order. With prefix caching, a prompt that starts with cached blocks gets their KV
copied into its row and only its rest is prefilled (`server.engine.prefix_cache`); prompts, and whole sequences
once they finish, leave their blocks behind for later ones. Only the engine thread calls this.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from adapters.peft_io import LoraWeights
from adapters.tiers.pool import LoraPool, PoolFull
from adapters.tiers.registry import Adapter
from server.engine.config import SchedulerConfig
from server.engine.kv_cache import SlotKVCache
from server.engine.prefix_cache import PrefixCache
from server.engine.request import AdapterUse, GenerationRequest
from server.engine.runner import AdapterPages
from server.engine.text import TextStream


@dataclass(eq=False)
class Sequence:
    """One request on its way through the engine."""

    req: GenerationRequest
    stream: TextStream
    generator: torch.Generator | None
    leases: list[tuple[AdapterUse, tuple[int, ...]]] = field(default_factory=list)
    """Each adapter this sequence holds in the device pool, with its pages."""
    output_ids: list[int] = field(default_factory=list)
    num_cached: int = 0
    """Tokens whose K/V are in the cache."""
    prefix: list = field(default_factory=list)
    """Cached prompt blocks found at admission, copied into the row when it is assigned."""

    def adapter_weights(self) -> list[tuple[Adapter, float]]:
        return [(use.adapter, use.weight) for use in self.req.adapters]

    def adapter_pages(self) -> AdapterPages:
        return [(use.adapter, pages, use.weight) for use, pages in self.leases]

    def single_adapter(self) -> tuple[Adapter, tuple[int, ...], LoraWeights] | None:
        """(adapter, pages, weights) when exactly one adapter serves this sequence, at weight 1; else None."""
        if len(self.leases) == 1 and self.leases[0][0].weight == 1.0:
            use, pages = self.leases[0]
            return use.adapter, pages, use.lora
        return None


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: LoraPool, cache: SlotKVCache, prefix: PrefixCache | None):
        self.config, self.pool, self.cache, self.prefix = config, pool, cache, prefix
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.partial: Sequence | None = None  # a long prompt being prefilled chunk by chunk
        self.chunk_row = config.max_num_seqs - 1  # the partial sequence's cache row

    @property
    def num_running(self) -> int:
        return len(self.running) + (self.partial is not None)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.partial)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def admit(self) -> tuple[list[Sequence], list[tuple[Sequence, str]]]:
        """(sequences for this step's prefill, in order; sequences refused with the reason). A prompt longer than
        `prefill_chunk` becomes the partial sequence instead (the others then have one row fewer)."""
        new: list[Sequence] = []
        refused: list[tuple[Sequence, str]] = []
        longest = 0
        chunk = self.config.prefill_chunk
        while self.waiting and len(self.running) + len(new) < self.config.max_num_seqs - (self.partial is not None):
            seq = self.waiting[0]
            prompt = seq.req.prompt_ids
            blocks = self.prefix.lookup(prompt, seq.adapter_weights()) if self.prefix else []
            n = len(prompt) - len(blocks) * (self.prefix.block_size if blocks else 0)  # tokens left to prefill
            long = 0 < chunk < n
            if long and self.partial is not None:
                break  # one chunked prompt at a time, in arrival order
            if not long and new and max(longest, n) * (len(new) + 1) > self.config.max_prefill_tokens:
                break
            try:
                self._lease_adapters(seq)
            except PoolFull as e:
                if self.running or new or self.partial:
                    break  # rows come free as running sequences finish
                self.waiting.popleft()
                refused.append((seq, str(e)))
                continue
            self.waiting.popleft()
            if self.prefix:
                self.prefix.count(len(prompt), len(prompt) - n)
            seq.prefix = blocks
            if long:
                self.partial = seq
                self._copy_prefix(seq, self.chunk_row)
                continue
            longest = max(longest, n)
            new.append(seq)
        # cold prompts first (they prefill from position 0 together), each adapter's next to each other (rows in
        # that order: a prefill or decode op reading one adapter's pages for several rows finds them in cache)
        new.sort(key=lambda s: (bool(s.prefix), [(u.adapter.key, u.weight) for u in s.req.adapters]))
        return new, refused

    def start(self, new: list[Sequence]) -> int:
        """Put admitted sequences into the next free rows (with the cached blocks they start with); returns the
        first one's row."""
        row0 = len(self.running)
        self.running.extend(new)
        for i, seq in enumerate(new):
            self._copy_prefix(seq, row0 + i)
        return row0

    def _copy_prefix(self, seq: Sequence, row: int) -> None:
        if seq.prefix:
            seq.num_cached = self.prefix.copy_in(seq.prefix, row)
            seq.prefix = []

    def remember(self, seq: Sequence, row: int) -> None:
        """Keep the blocks of `seq`'s tokens whose K/V are in cache row `row` for later prompts (prefix caching)."""
        if self.prefix is not None:
            tokens = (seq.req.prompt_ids + seq.output_ids)[: seq.num_cached]
            self.prefix.insert(tokens, seq.adapter_weights(), row)

    def finish_partial(self) -> Sequence:
        """The partial sequence, fully prefilled, joins the running rows."""
        s, self.partial = self.partial, None
        self.remember(s, self.chunk_row)
        if len(self.running) != self.chunk_row:
            self.cache.move_row(self.chunk_row, len(self.running), s.num_cached)
        self.running.append(s)
        return s

    def _lease_adapters(self, seq: Sequence) -> None:
        try:
            for use in seq.req.adapters:
                use.lora = use.lora or use.adapter.weights
                if use.lora is None:
                    raise PoolFull(f"the weights of adapter {use.adapter.name!r} are not in memory")
                seq.leases.append((use, self.pool.acquire(use.adapter, use.lora)))
        except PoolFull:
            self.release(seq)
            raise

    def release(self, seq: Sequence) -> None:
        """Give back the sequence's adapter leases."""
        for use, _ in seq.leases:
            self.pool.release(use.adapter)
        seq.leases = []

    def abort(self, ids: set[str]) -> list[Sequence]:
        """Remove the sequences of these request ids, wherever they are; returns them (leases released)."""
        gone = [s for s in self.waiting if s.req.request_id in ids]
        for seq in gone:
            self.waiting.remove(seq)
        running = [s for s in self.running if s.req.request_id in ids]
        self.retire(running, keep=False)
        gone += running
        if self.partial is not None and self.partial.req.request_id in ids:
            gone.append(self.partial)
            self.partial = None
        for seq in gone:
            self.release(seq)
        return gone

    def retire(self, finished: list[Sequence], keep: bool = True) -> None:
        """Release the finished running sequences' adapters and compact: the last running row fills each hole.
        With `keep`, their blocks stay in the prefix cache first."""
        for seq in finished:
            self.release(seq)
        gone = set(map(id, finished))
        if keep and self.prefix is not None:
            for row, seq in enumerate(self.running):
                if id(seq) in gone:
                    self.remember(seq, row)
        rows = sorted((i for i, s in enumerate(self.running) if id(s) in gone), reverse=True)
        for row in rows:
            last = len(self.running) - 1
            if row != last:
                mover = self.running[last]
                self.cache.move_row(last, row, mover.num_cached)
                self.running[row] = mover
            self.running.pop()

    def take_active(self) -> list[Sequence]:
        """Remove every running and partial sequence (a failed step or a shutdown); returns them, released."""
        active, self.running = self.running, []
        if self.partial is not None:
            active.append(self.partial)
            self.partial = None
        for seq in active:
            self.release(seq)
        return active
