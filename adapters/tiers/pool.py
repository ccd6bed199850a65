"""The device tier: pages of every wrapped layer, lent to adapters while requests use them.

S-LoRA's unified memory pool, kept simple: an adapter of rank r takes ⌈r/G⌉ free pages of G
rank rows (the same page numbers in every layer; pages need not be contiguous because the ops
gather by page), so adapters of different ranks share the pool without fragmentation.
Resident adapters stay after their last request (a warm cache) and are evicted
least-recently-used when pages run out; an adapter in use is never evicted. Only the engine
thread calls this.

Page numbers are host integers (a step stages them without reading the device). On CUDA an adapter's rows are
copied on a stream of the pool's own from pinned host memory (`prepare` makes the host tier's copy pinned,
pre-cast and pre-scaled), and the next forward waits for that copy on the device (`wait_loaded`), not the host
(S-LoRA and LoRAX prefetch adapters the same way).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass

import torch

from adapters.layers import MultiLoraLinear
from adapters.peft_io import LoraWeights
from adapters.tiers.registry import Adapter


class PoolFull(RuntimeError):
    """Not enough free pages, even after evicting every adapter not in use."""


@dataclass
class _Resident:
    adapter: Adapter
    weights: LoraWeights
    pages: tuple[int, ...]
    users: int = 0


class LoraPool:
    """Allocates pages to adapters and copies their weights into every wrapped layer."""

    def __init__(self, layers: dict[str, MultiLoraLinear], pages: int, page_size: int, device: torch.device):
        self.layers = layers
        self.pages = pages
        self.page_size = page_size
        self.device = device
        self._free = list(range(pages - 1, 0, -1))  # page 0 is the zero page
        self._resident: OrderedDict[int, _Resident] = OrderedDict()
        self.loads = 0
        self.evictions = 0
        first = next(iter(layers.values()), None)
        self.dtype = first.lora_A.dtype if first is not None else torch.float32
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._loaded: torch.cuda.Event | None = None

    def prepare(self, weights: LoraWeights) -> LoraWeights:
        """`weights` as the host tier keeps them: in the pool's dtype, scaling folded into B, pinned on CUDA (so a
        load is one asynchronous copy per matrix). Any thread may call it."""
        return weights.prepared(self.dtype, pin=self.device.type == "cuda")

    def wait_loaded(self) -> None:
        """Make the device's current stream wait for the adapter copies issued so far (no host wait)."""
        if self._loaded is not None:
            torch.cuda.current_stream(self.device).wait_event(self._loaded)
            self._loaded = None

    def resident_count(self) -> int:
        return len(self._resident)

    def resident_keys(self) -> frozenset[int]:
        """Keys of the adapters whose pages are in the pool now. Any thread may call it: the copy is one C-level
        call, retried in the rare case the engine thread changed the table during it."""
        while True:
            try:
                return frozenset(self._resident)
            except RuntimeError:  # "dictionary changed size during iteration"
                continue

    def used_pages(self) -> int:
        """Pages lent to resident adapters (of `pages - 1`: page 0 is the zero page)."""
        return self.pages - 1 - len(self._free)

    def pages_for(self, rank: int) -> int:
        return max(1, -(-rank // self.page_size))

    def acquire(self, adapter: Adapter, weights: LoraWeights) -> tuple[int, ...]:
        """Make `adapter` (whose host weights are `weights`) resident and count one more user; returns its pages."""
        res = self._resident.get(adapter.key)
        if res is None:
            res = self._load(adapter, weights)
        res.users += 1
        self._resident.move_to_end(adapter.key)
        return res.pages

    def release(self, adapter: Adapter) -> None:
        res = self._resident[adapter.key]
        res.users -= 1
        if res.users == 0 and adapter.retired:
            self._unload(adapter.key)

    def _load(self, adapter: Adapter, weights: LoraWeights) -> _Resident:
        need = self.pages_for(weights.rank)
        if need > self.pages - 1:
            raise PoolFull(f"adapter {adapter.name!r} needs {need} pages, the pool has {self.pages - 1}")
        unused = [k for k, r in self._resident.items() if r.users == 0]  # least recently used first
        if len(self._free) + sum(len(self._resident[k].pages) for k in unused) < need:  # evict nothing in vain
            raise PoolFull(f"no free LoRA pages for adapter {adapter.name!r}: the resident adapters are in use")
        for victim in unused:
            if len(self._free) >= need:
                break
            self._unload(victim)
            self.evictions += 1
        pages = tuple(self._free.pop() for _ in range(need))
        flat = [p * self.page_size + g for p in pages for g in range(self.page_size)]
        with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
            rows = torch.tensor(flat, device=self.device)
            for module, lm in weights.modules.items():
                self.layers[module].write_rows(adapter.key, rows[: lm.rank], lm.lora_A, lm.lora_B, lm.scaling)
            if self._stream is not None:
                self._loaded = torch.cuda.Event()
                self._loaded.record(self._stream)
        res = _Resident(adapter=adapter, weights=weights, pages=pages)
        self._resident[adapter.key] = res
        self.loads += 1
        return res

    def _unload(self, key: int) -> None:
        res = self._resident.pop(key)
        pages = torch.tensor(res.pages, device=self.device)
        for module in res.weights.modules:
            self.layers[module].clear_pages(key, pages)
        self._free.extend(res.pages)

    def drop_unused(self) -> None:
        """Free the pages of retired adapters that no request uses any more."""
        for key, res in list(self._resident.items()):
            if res.adapter.retired and res.users == 0:
                self._unload(key)
