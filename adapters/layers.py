"""The multi-adapter linear layer and the token→pages mapping a forward pass gives it.

As in vLLM's `lora/layers` (layer wrappers over slot buffers, one shared token→adapter map per
step) with S-LoRA's unified paged pool: each wrapped layer keeps pages of G rank rows,
`lora_A (P, G, in)` and `lora_B (P, G, out)` (B's columns as rows); an adapter of rank r owns ⌈r/G⌉ pages (the
same page numbers in every layer) with its scaling folded into its B rows. Page 0 stays zero: the
"no adapter" page. A forward adds each token's LoRA term through the pages it names (see
`adapters.ops`). Different ranks cost only the pages they use, and a weighted composition of
adapters is just more pages with their weights: it batches like any other request.

The frozen base layer is whatever the caller chose once at wrap time (`wrap_multi_lora`'s `base`, e.g. oneDNN on
the CPU): the forward is `base_layer(x)` plus the LoRA term, with no backend test per call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from adapters.cpu.allocator import lazy_zeros
from adapters.cpu.onednn import linear_for
from adapters.ops import lora_gathered, lora_gathered_in_order, lora_grouped, lora_segmented
from adapters.targets import adaptable_layers, layer_shape, wrap_layers


class LoraMapping:
    """Which pool pages the tokens of the next forward pass apply; shared by every MultiLoraLinear of a model.

    `pages` (R, K) and `weights` (R, K, G) as in adapters.ops, rows by `mode`:
      - "gathered": one row per token (decode, every row its own pages), taken in the order `slots` (N,) if given
        (each adapter's tokens together), `inverse` its inverse permutation;
      - "segmented": one row per sequence whose tokens are consecutive segments of equal length (prefill), a single
        row when every sequence applies the same pages;
      - "grouped": one row per distinct set of pages, `slots` / `inverse` saying which tokens apply it (decode,
        several rows per adapter).
    It holds tensors, not callables, so a compiled forward sees the same code every step.
    """

    def __init__(self, check_targets: bool = True) -> None:
        # skip layers that none of the batch's adapters targets (a Python-set test: off when compiled)
        self.check_targets = check_targets
        self.clear()

    def set(self, pages: torch.Tensor, weights: torch.Tensor, adapters: frozenset[int], mode: str,
            slots: torch.Tensor | None = None, inverse: torch.Tensor | None = None) -> None:  # fmt: skip
        self.pages, self.weights, self.adapters, self.mode = pages, weights, adapters, mode
        self.slots, self.inverse = slots, inverse

    def clear(self) -> None:
        self.pages = self.weights = self.slots = self.inverse = None
        self.adapters: frozenset[int] = frozenset()
        self.mode = "gathered"


class MultiLoraLinear(nn.Module):
    """A frozen base linear plus the LoRA rows of every adapter the mapping names."""

    def __init__(
        self,
        base_layer: nn.Module,
        mapping: LoraMapping,
        pages: int,
        page_size: int,
        lora_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.base_layer = base_layer
        self.mapping = mapping
        self.in_features, self.out_features = layer_shape(base_layer)
        w = base_layer.weight
        # the pages in `lora_dtype` (default: the weight's), widened to the activations' dtype as they are read
        shape, dtype = (pages, page_size), lora_dtype or w.dtype
        self.register_buffer("lora_A", lazy_zeros((*shape, self.in_features), dtype, w.device))
        self.register_buffer("lora_B", lazy_zeros((*shape, self.out_features), dtype, w.device))
        # adapter keys with rows in this layer: a batch naming none of them skips the LoRA term
        self.adapters: set[int] = set()
        # the plain GEMMs of the LoRA term (a prefill on one set of pages), in the activations' dtype: the weight's
        self.lora_linear = linear_for(w)
        # what renews a derived copy of the base weight after it changed (oneDNN's packed weight), if it keeps one
        self.base_changed: Callable[[], None] = getattr(base_layer, "repack", lambda: None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        m = self.mapping
        if m.pages is None or (m.check_targets and self.adapters.isdisjoint(m.adapters)):
            return y
        x2 = x.reshape(-1, self.in_features)  # (N, in) — N tokens flattened across the batch
        if m.mode == "segmented":
            delta = lora_segmented(x2, self.lora_A, self.lora_B, m.pages, m.weights, self.lora_linear)
        elif m.mode == "grouped":
            delta = lora_grouped(x2, self.lora_A, self.lora_B, m.pages, m.weights, m.slots, m.inverse)
        elif m.slots is not None:
            delta = lora_gathered_in_order(x2, self.lora_A, self.lora_B, m.pages, m.weights, m.slots, m.inverse)
        else:
            delta = lora_gathered(x2, self.lora_A, self.lora_B, m.pages, m.weights)
        return y + delta.view(y.shape).to(y.dtype)

    def write_rows(self, key: int, rows: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> None:
        """Copy one adapter's A (r, in) and B (out, r) into the flat pool rows `rows` (r,) (asynchronously from
        pinned host memory; see `LoraWeights.prepared`)."""
        bt = lora_B.T if scaling == 1.0 else lora_B.T * scaling
        for pool, src, width in ((self.lora_A, lora_A, self.in_features), (self.lora_B, bt, self.out_features)):
            pool.view(-1, width)[rows] = src.to(pool.device, non_blocking=True).to(pool.dtype)
        self.adapters.add(key)

    def clear_pages(self, key: int, pages: torch.Tensor) -> None:
        self.lora_A[pages] = 0
        self.lora_B[pages] = 0
        self.adapters.discard(key)


def wrap_multi_lora(
    model: nn.Module,
    mapping: LoraMapping,
    pages: int,
    page_size: int,
    lora_dtype: torch.dtype | None = None,
    base: Callable[[nn.Module], nn.Module] = lambda layer: layer,
) -> dict[str, MultiLoraLinear]:
    """Wrap every target layer of `model` (adapters.targets) in place; `base(layer)` is what computes each frozen
    layer (the layer itself, or e.g. `adapters.cpu.onednn.cpu_linear`'s choice). Returns {module path: wrapper}."""
    wrap = lambda layer: MultiLoraLinear(base(layer), mapping, pages, page_size, lora_dtype)  # noqa: E731
    return wrap_layers(model, adaptable_layers(model), wrap)
