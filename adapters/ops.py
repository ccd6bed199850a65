"""Multi-LoRA tensor ops: the LoRA term of a batch whose rows use different adapters.

LoRA (Hu et al. 2021): `h = W0·x + scaling·B·A·x`, batched as in Punica (BGMV/SGMV), S-LoRA
(a unified pool of rank rows) and vLLM's `ops/torch_ops` (a plain-torch reference as the spec).

Operands of one layer (the pool is cut into pages of G consecutive rank rows):
    x:       (N, in)        — N tokens flattened across the batch
    lora_a:  (P, G, in)     — pages of A rows; page 0 is zero
    lora_bt: (P, G, out)    — pages of Bᵀ rows, each already multiplied by its adapter's scaling
    idx:     (N, K)         — the pages of each token's adapter(s), padded with page 0
    weights: (N, K, G)      — the weight of each row of those pages (1.0, a composition weight, 0 for padding)

Semantics (every op here returns the same value up to floating-point rounding):
    for each token i: out[i] = Σ_k Σ_g weights[i, k, g] · (x[i] @ lora_a[idx[i, k], g]) · lora_bt[idx[i, k], g]
The pages may be stored in a narrower dtype than x (bf16 pages halve the bytes a decode step streams, vLLM's
`lora_dtype`); they are widened to x's dtype as they are read, and the arithmetic is x's.

`lora_reference` is that loop and the spec every fast path is tested against. `lora_linear` is the
single-adapter term a trainer differentiates through (loralib's one-line forward): every token on
one adapter, A (r, in), B (out, r), its scale applied once:
    for each token i: out[i] = scaling · (x[i] @ lora_a.T) @ lora_b.T
which is `lora_reference` with one page set of A rows, Bᵀ rows times `scaling`, and weights 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_reference(
    x: torch.Tensor, lora_a: torch.Tensor, lora_bt: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """The plain loop of the module docstring."""
    out = x.new_zeros(x.shape[0], lora_bt.shape[-1])
    lora_a, lora_bt = lora_a.to(x.dtype), lora_bt.to(x.dtype)
    for i in range(x.shape[0]):
        for k in range(idx.shape[1]):
            page = int(idx[i, k])
            for g in range(lora_a.shape[1]):
                out[i] += weights[i, k, g] * (x[i] @ lora_a[page, g]) * lora_bt[page, g]
    return out


def lora_gathered(
    x: torch.Tensor, lora_a: torch.Tensor, lora_bt: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Gather each token's pages, multiply and reduce (Punica's BGMV).

    Written as broadcast-multiply-sum so that under `torch.compile` inductor fuses the gather
    into the reduction and streams each page (G contiguous rows) once instead of copying it.
    """
    # xa: (N, K, G) — each token projected into its adapters' rank space
    xa = (lora_a[idx].to(x.dtype) * x[:, None, None, :]).sum(-1) * weights
    return (lora_bt[idx].to(x.dtype) * xa[..., None]).sum((1, 2))


def lora_batched(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_bt: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
    linear=F.linear,
) -> torch.Tensor:
    """Tokens in n equal runs of T, each run one request with its own pages (prefill): one BGEMM pair.

    idx (n, K) and weights (n, K, G) are per run; x is (n·T, in). Each run's pages are gathered
    once (K·G rows, not once per token) and two batched matmuls do the rest. The same value as
    `lora_gathered` with every run's row repeated T times. A single run (one request, or a whole
    prefill on the same pages) is two plain GEMMs through `linear` (F.linear, or the CPU's
    `adapters.dense.onednn_linear`, 2-3× MKL's batched kernel at these narrow shapes).
    """
    n = idx.shape[0]
    a = lora_a[idx].flatten(1, 2).to(x.dtype)  # (n, K·G, in)
    bt = lora_bt[idx].flatten(1, 2).to(x.dtype)  # (n, K·G, out)
    w = weights.flatten(1)  # (n, K·G)
    if n == 1:
        return linear(linear(x, a[0], None) * w, bt[0].T, None)
    xa = torch.bmm(x.view(n, -1, x.shape[1]), a.transpose(1, 2)) * w[:, None, :]  # (n, T, K·G)
    return torch.bmm(xa, bt).flatten(0, 1)


def lora_linear(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """One adapter's LoRA term for every row of x (..., in) -> (..., out): `(x @ Aᵀ @ Bᵀ) · scaling`."""
    return (x @ lora_a.T @ lora_b.T) * scaling
