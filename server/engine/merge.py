"""Automatic merge and unmerge of a dominant adapter (dLoRA, OSDI '24; the LoRA paper's merge).

When one adapter serves (nearly) every running sequence for `window` decode steps, its LoRA
delta is folded into the base weights, `W' = W + s·B·A`, so its requests pay nothing extra.
The batch still serves every other request correctly: their deltas are taken relative to the
merged weights, i.e. each other row also applies the merged adapter's pages with weight -1 (a
composition that includes it at weight w applies w - 1). The merge writes the weights in place, after
copying them to the host (pinned on CUDA): no tensor a forward reads is ever replaced, so compiled graphs
and captured CUDA graphs keep reading the same memory. When traffic mixes again the copies are written
back: unmerging restores the base bit for bit, however many cycles run. A layer that keeps a derived copy
of its weight (oneDNN's packed layout, CPU only) renews it through `MultiLoraLinear.base_changed`.
"""

from __future__ import annotations

import logging
from collections import Counter, deque

import torch
from transformers.pytorch_utils import Conv1D

from adapters.layers import MultiLoraLinear
from adapters.peft_io import LoraWeights
from adapters.tiers.pool import LoraPool
from adapters.tiers.registry import Adapter

log = logging.getLogger(__name__)
UNMERGE_MARGIN = 0.2  # hysteresis: unmerge only when the share falls this far below the threshold


class AutoMerger:
    def __init__(self, layers: dict[str, MultiLoraLinear], pool: LoraPool, threshold: float, window: int):
        self.layers, self.pool = layers, pool
        self.threshold, self.window = threshold, window
        self.merged: Adapter | None = None
        self.merged_pages: tuple[int, ...] | None = None
        self._backups: dict[str, torch.Tensor] = {}  # each merged layer's weight before the merge, on the host
        self._history: deque[tuple[Adapter | None, float]] = deque(maxlen=window)
        self.merges = 0
        self.unmerges = 0
        self.refused: set[int] = set()  # keys of adapters whose merge would have made a weight non-finite

    def observe(self, singles: list[tuple[Adapter, tuple[int, ...], LoraWeights] | None]) -> None:
        """One decode step's rows: (adapter, its pages, its weights) for a row served by exactly one
        adapter at weight 1, else None. Merges or unmerges between steps when the traffic says so."""
        counts = Counter(s[0] for s in singles if s is not None)
        top, n = counts.most_common(1)[0] if counts else (None, 0)
        self._history.append((top, n / max(len(singles), 1)))
        if self.merged is not None:
            share = sum(sh for a, sh in self._history if a is self.merged) / len(self._history)
            if self.merged.retired or share < self.threshold - UNMERGE_MARGIN:
                self.unmerge()
        elif (top is not None and not top.retired and len(self._history) == self.window
              and all(a is top and sh >= self.threshold for a, sh in self._history)):
            _, pages, weights = next(s for s in singles if s is not None and s[0] is top)
            self.merge(top, pages, weights)

    def merge(self, adapter: Adapter, pages: tuple[int, ...], weights: LoraWeights) -> None:
        """Fold `adapter` into the base weights, unless that makes any weight NaN or Inf: then every weight is
        restored from its backup, the merge refused (for good, for this version) and logged."""
        if adapter.key in self.refused:
            return
        self.pool.acquire(adapter, weights)  # held while merged
        index = torch.tensor(pages, device=self.pool.device)
        finite = torch.ones((), dtype=torch.bool, device=self.pool.device)
        for module in weights.modules:
            layer = self.layers[module]
            a = layer.lora_A[index].flatten(0, 1)  # (K·G, in)
            bt = layer.lora_B[index].flatten(0, 1)  # (K·G, out): Bᵀ, scaling folded in
            w = layer.base_layer.weight
            backup = torch.empty(w.shape, dtype=w.dtype, pin_memory=w.is_cuda)
            self._backups[module] = backup.copy_(w.detach(), non_blocking=True)
            # W += B·A in place, (out, in); Conv1D stores (in, out)
            lhs, rhs = (a.T, bt) if isinstance(layer.base_layer, Conv1D) else (bt.T, a)
            w.detach().addmm_(lhs.to(w.dtype), rhs.to(w.dtype))
            finite &= torch.isfinite(w).all()
        if not bool(finite):  # the merge's one read from the device
            for module, backup in self._backups.items():
                self.layers[module].base_layer.weight.detach().copy_(backup)
            self._backups.clear()
            self.pool.release(adapter)
            self.refused.add(adapter.key)
            self._history.clear()
            log.error("refused to merge adapter %r (version %d): the merged weights would not be finite",
                      adapter.name, adapter.version)
            return
        for module in weights.modules:
            self.layers[module].base_changed()
        self.merged, self.merged_pages = adapter, pages
        self._history.clear()
        self.merges += 1

    def unmerge(self) -> None:
        for module, backup in self._backups.items():
            layer = self.layers[module]
            layer.base_layer.weight.detach().copy_(backup, non_blocking=True)
            layer.base_changed()
        self._backups.clear()
        self.pool.release(self.merged)
        self.merged, self.merged_pages = None, None
        self._history.clear()
        self.unmerges += 1

    def corrected(self, uses: list[tuple[Adapter, tuple[int, ...], float]]) -> list[tuple[tuple[int, ...], float]]:
        """The (pages, weight) a row must apply on top of the current (possibly merged) weights."""
        m = self.merged
        if m is None:
            return [(p, w) for _, p, w in uses]
        out = [(p, w) for a, p, w in uses if a is not m]
        wm = sum(w for a, _, w in uses if a is m)
        if wm != 1.0:
            out.append((self.merged_pages, wm - 1.0))
        return out
