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

`lora_reference` is that loop and the spec every fast path is tested against.
"""

from __future__ import annotations

import torch


def lora_reference(
    x: torch.Tensor, lora_a: torch.Tensor, lora_bt: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """The plain loop of the module docstring."""
    out = x.new_zeros(x.shape[0], lora_bt.shape[-1])
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
    xa = (lora_a[idx] * x[:, None, None, :]).sum(-1) * weights
    return (lora_bt[idx] * xa[..., None]).sum((1, 2))


def lora_segmented(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_bt: torch.Tensor,
    seg_idx: list[torch.Tensor],
    seg_weights: list[torch.Tensor],
    bounds: list[int],
) -> torch.Tensor:
    """Tokens in contiguous segments that share their rows (Punica's SGMV): one GEMM pair each.

    Segment k covers tokens bounds[k]:bounds[k+1] and uses pages seg_idx[k] (K_k,) with row
    weights seg_weights[k] (K_k, G); an empty segment (base tokens) is skipped. The loop runs
    over segments (requests in a prefill), each a real matrix multiply.
    """
    out = x.new_zeros(x.shape[0], lora_bt.shape[-1])
    for k, pages in enumerate(seg_idx):
        if pages.numel() == 0:
            continue
        lo, hi = bounds[k], bounds[k + 1]
        a = lora_a[pages].flatten(0, 1)  # (K_k·G, in)
        bt = lora_bt[pages].flatten(0, 1)  # (K_k·G, out)
        out[lo:hi] = ((x[lo:hi] @ a.T) * seg_weights[k].flatten()) @ bt
    return out
