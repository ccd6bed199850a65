"""Multi-LoRA tensor ops: the LoRA term of a batch whose rows use different adapters.

LoRA (Hu et al. 2021): `h = W0·x + scaling·B·A·x`, batched as in Punica (BGMV/SGMV), S-LoRA
(a unified pool of rank rows) and vLLM's `ops/torch_ops` (a plain-torch reference as the spec).

Operands of one layer (the pool is cut into pages of G consecutive rank rows):
    x:       (N, in)        — N tokens flattened across the batch
    lora_A:  (P, G, in)     — pages of A's rows; page 0 is zero
    lora_B:  (P, G, out)    — pages of B's columns (stored as rows, Bᵀ), each already multiplied by its scaling
    pages:   (N, K)         — the pages of each token's adapter(s), padded with page 0
    weights: (N, K, G)      — the weight of each row of those pages (1.0, a composition weight, 0 for padding)

Semantics (every op here returns the same value up to floating-point rounding):
    for each token i: out[i] = Σ_k Σ_g weights[i, k, g] · (x[i] @ lora_A[pages[i, k], g]) · lora_B[pages[i, k], g]
The pages may be stored in a narrower dtype than x (bf16 pages halve the bytes a decode step streams, vLLM's
`lora_dtype`); they are widened to x's dtype as they are read, and the arithmetic is x's.

`lora_reference` is that loop and the spec every fast path is tested against. The fast paths: `lora_gathered`
(every token gathers its own pages: decode, all rows different), `lora_segmented` (equal runs of tokens share
pages: prefill; one run for everything when all share them), `lora_grouped` (rows that share pages are grouped,
so each distinct set of pages is read once: decode with several rows per adapter, Punica's SGMV / S-LoRA),
`lora_gathered_in_order` (gathered over the rows taken adapter by adapter, where grouping does not pay).
`lora_linear` is the single-adapter term a trainer differentiates through (loralib's one-line forward): every token
on one adapter, A (r, in), B (out, r), its scale applied once:
    for each token i: out[i] = scaling · (x[i] @ lora_A.T) @ lora_B.T
which is `lora_reference` with one page set of A rows, Bᵀ rows times `scaling`, and weights 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_reference(
    x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, pages: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """The plain loop of the module docstring."""
    out = x.new_zeros(x.shape[0], lora_B.shape[-1])
    lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    for i in range(x.shape[0]):
        for k in range(pages.shape[1]):
            page = int(pages[i, k])
            for g in range(lora_A.shape[1]):
                out[i] += weights[i, k, g] * (x[i] @ lora_A[page, g]) * lora_B[page, g]
    return out


def lora_gathered(
    x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, pages: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Gather each token's pages, multiply and reduce (Punica's BGMV).

    Written as broadcast-multiply-sum so that under `torch.compile` inductor fuses the gather
    into the reduction and streams each page (G contiguous rows) once instead of copying it.
    """
    # xa: (N, K, G) — each token projected into its adapters' rank space
    xa = (lora_A[pages].to(x.dtype) * x[:, None, None, :]).sum(-1) * weights
    return (lora_B[pages].to(x.dtype) * xa[..., None]).sum((1, 2))


def lora_gathered_in_order(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    pages: torch.Tensor,
    weights: torch.Tensor,
    order: torch.Tensor,
    inverse: torch.Tensor,
) -> torch.Tensor:
    """`lora_gathered` over the rows of x taken in `order` (N,), with pages and weights given in that order; the
    result in x's order (`inverse`: the inverse permutation of `order`).

    With `order` putting each adapter's rows next to each other, each row after an adapter's first finds its pages
    in cache: the pages stream from memory once per adapter rather than once per row.
    """
    return lora_gathered(x[order], lora_A, lora_B, pages, weights)[inverse]


def lora_segmented(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    pages: torch.Tensor,
    weights: torch.Tensor,
    linear=F.linear,
) -> torch.Tensor:
    """Tokens in n equal segments of T, each one sequence with its own pages (prefill; Punica's SGMV): one BGEMM pair.

    pages (n, K) and weights (n, K, G) are per segment; x is (n·T, in). Each segment's pages are gathered
    once (K·G rows, not once per token) and two batched matmuls do the rest. The same value as
    `lora_gathered` with every segment's row repeated T times. A single segment (one sequence, or a whole
    prefill on the same pages) is two plain GEMMs through `linear` (F.linear, or the CPU's
    `adapters.cpu.onednn.onednn_linear`, much faster than a batched matmul at these narrow shapes).
    """
    n = pages.shape[0]
    a = lora_A[pages].flatten(1, 2).to(x.dtype)  # (n, K·G, in)
    bt = lora_B[pages].flatten(1, 2).to(x.dtype)  # (n, K·G, out)
    w = weights.flatten(1)  # (n, K·G)
    if n == 1:
        return linear(linear(x, a[0], None) * w, bt[0].T, None)
    xa = torch.bmm(x.view(n, -1, x.shape[1]), a.transpose(1, 2)) * w[:, None, :]  # (n, T, K·G)
    return torch.bmm(xa, bt).flatten(0, 1)


def lora_grouped(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    pages: torch.Tensor,
    weights: torch.Tensor,
    slots: torch.Tensor,
    inverse: torch.Tensor,
) -> torch.Tensor:
    """Rows grouped by the pages they apply: one BGEMM pair over u groups of at most m rows each.

    pages (u, K) and weights (u, K, G) are per group; `slots` (u, m) lists each group's rows of x (N, in), padded
    with the index N (a zero row); `inverse` (N,) is each row's place in `slots` flattened, u·m for a row in no
    group (it gets no LoRA term). The same value as `lora_gathered` with row i's pages those of its group.
    """
    a = lora_A[pages].flatten(1, 2).to(x.dtype)  # (u, K·G, in): each group's pages, read once
    bt = lora_B[pages].flatten(1, 2).to(x.dtype)  # (u, K·G, out)
    x_pad = torch.cat([x, x.new_zeros(1, x.shape[1])])[slots]  # (u, m, in)
    xa = torch.bmm(x_pad, a.transpose(1, 2)) * weights.flatten(1)[:, None, :]  # (u, m, K·G)
    y = torch.bmm(xa, bt).flatten(0, 1)  # (u·m, out)
    return torch.cat([y, y.new_zeros(1, y.shape[1])])[inverse]  # (N, out)


def lora_linear(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """One adapter's LoRA term for every row of x (..., in) -> (..., out): `(x @ Aᵀ @ Bᵀ) · scaling`."""
    return (x @ lora_A.T @ lora_B.T) * scaling
