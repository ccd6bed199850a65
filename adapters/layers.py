"""The multi-adapter linear layer and what a forward pass tells it about adapters.

As in vLLM's `lora/layers` (layer wrappers over slot buffers, one shared token→adapter map per
step) with S-LoRA's unified paged pool: each wrapped layer keeps pages of G rank rows,
`lora_a (P, G, in)` and `lora_bt (P, G, out)`; an adapter of rank r owns ⌈r/G⌉ pages (the same
page numbers in every layer) with its scaling folded into its Bᵀ rows. Page 0 stays zero: the
"no adapter" page. A forward adds each token's LoRA term through the pages it names (see
`adapters.ops`). Different ranks cost only the pages they use, and a weighted composition of
adapters is just more pages with their weights: it batches like any other request.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from adapters.dense import linear_for, onednn_linear, pack_weight, uses_onednn
from adapters.memory import lazy_zeros
from adapters.ops import lora_batched, lora_gathered


class LoraBatch:
    """The token→pages map of one forward pass, shared by every MultiLoraLinear of a model.

    `idx` (R, K) and `weights` (R, K, G) as in adapters.ops, with one row per token (decode:
    `per_request` False) or one row per request whose tokens are consecutive runs of equal length
    (prefill: `per_request` True; a single row when every request uses the same pages). It holds
    tensors, not callables, so a compiled forward sees the same code every step.
    """

    def __init__(self, check_targets: bool = True) -> None:
        # skip layers that none of the batch's adapters targets (a Python-set test: off when compiled)
        self.check_targets = check_targets
        self.clear()

    def set(self, idx: torch.Tensor, weights: torch.Tensor, adapters: frozenset[int], per_request: bool) -> None:
        self.idx, self.weights, self.adapters, self.per_request = idx, weights, adapters, per_request

    def clear(self) -> None:
        self.idx = self.weights = None
        self.adapters: frozenset[int] = frozenset()
        self.per_request = False


def layer_shape(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a GPT-2 Conv1D (weight stored (in, out))."""
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.weight.shape[1]
    return layer.in_features, layer.out_features


class MultiLoraLinear(nn.Module):
    """A frozen base linear plus the LoRA rows of every adapter the batch names."""

    def __init__(
        self,
        base_layer: nn.Module,
        batch: LoraBatch,
        pages: int,
        page_size: int,
        pack: bool = True,
        lora_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.base_layer = base_layer
        self.batch = batch
        self.in_features, self.out_features = layer_shape(base_layer)
        w = base_layer.weight
        # the pages in `lora_dtype` (default: the weight's), widened to the activations' dtype as they are read
        shape, dtype = (pages, page_size), lora_dtype or w.dtype
        self.register_buffer("lora_a", lazy_zeros((*shape, self.in_features), dtype, w.device))
        self.register_buffer("lora_bt", lazy_zeros((*shape, self.out_features), dtype, w.device))
        # adapter keys with rows in this layer: a batch naming none of them skips the LoRA term
        self.adapters: set[int] = set()
        # fp32 nn.Linear on the CPU: oneDNN's kernels rather than MKL's (adapters.dense), on a packed copy of the
        # weight unless `pack` is off (it costs the weight's memory again); a plain attribute, not a buffer: it is
        # no state of the model. Conv1D keeps its addmm.
        self.onednn = isinstance(base_layer, nn.Linear) and uses_onednn(w)
        self.packed = pack_weight(w) if self.onednn and pack else None
        # the plain GEMMs of the LoRA term (a prefill on one set of pages), in the activations' dtype: the weight's
        self.lora_linear = linear_for(w)

    def repack(self) -> None:
        """Pack the base weight anew after it changed (a merge); a no-op for layers without a packed copy."""
        if self.packed is not None:
            self.packed = pack_weight(self.base_layer.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.onednn:
            y = onednn_linear(x, self.base_layer.weight if self.packed is None else self.packed, self.base_layer.bias)
        else:
            y = self.base_layer(x)
        b = self.batch
        if b.idx is None or (b.check_targets and self.adapters.isdisjoint(b.adapters)):
            return y
        x2 = x.reshape(-1, self.in_features)  # (N, in) — N tokens flattened across the batch
        if b.per_request:
            delta = lora_batched(x2, self.lora_a, self.lora_bt, b.idx, b.weights, self.lora_linear)
        else:
            delta = lora_gathered(x2, self.lora_a, self.lora_bt, b.idx, b.weights)
        return y + delta.view(y.shape).to(y.dtype)

    def write_rows(self, key: int, rows: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> None:
        """Copy one adapter's A (r, in) and B (out, r) into the flat pool rows `rows` (r,)."""
        self.lora_a.view(-1, self.in_features)[rows] = lora_a.to(self.lora_a)
        self.lora_bt.view(-1, self.out_features)[rows] = (lora_b.T * scaling).to(self.lora_bt)
        self.adapters.add(key)

    def clear_pages(self, key: int, pages: torch.Tensor) -> None:
        self.lora_a[pages] = 0
        self.lora_bt[pages] = 0
        self.adapters.discard(key)


def inject_multi_lora(
    model: nn.Module,
    batch: LoraBatch,
    pages: int,
    page_size: int,
    exclude: tuple[str, ...] = ("lm_head",),
    pack: bool = True,
    lora_dtype: torch.dtype | None = None,
) -> dict[str, MultiLoraLinear]:
    """Wrap every linear / Conv1D layer of `model` (except `exclude`) in place (`pack`, `lora_dtype`: see
    MultiLoraLinear).

    Returns {module path: wrapper}; the paths are those of the unwrapped model, which are the
    names PEFT writes in its keys.
    """
    targets = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, (nn.Linear, Conv1D)) and name.rsplit(".", 1)[-1] not in exclude
    ]
    wrapped = {}
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper = MultiLoraLinear(mod, batch, pages, page_size, pack, lora_dtype)
        setattr(parent, child, wrapper)
        wrapped[name] = wrapper
    return wrapped
