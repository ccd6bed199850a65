"""The training loss: summed next-token cross-entropy over label tokens.

The trainer divides it by the label-token count of a whole optimizer step (transformers#34191: gradient
accumulation must equal a bigger batch). Only label tokens meet the vocabulary, chunk by chunk (as Liger-Kernel's
fused linear cross-entropy), through the matmul the caller chose once for the head's weight
(`adapters.cpu.onednn.linear_for`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from adapters.training.collate import Row, collate
from adapters.training.data import IGNORE

LOSS_CHUNK_ELEMENTS = 1 << 23  # logits per chunk of the loss (32 MiB in fp32; 170 tokens of a 49k vocabulary)
# config attributes of transformers models whose logits are not the head's plain output
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def loss_sum(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor, linear=F.linear
) -> torch.Tensor:
    """Summed next-token cross-entropy over the label tokens (labels[:, t] is predicted at t - 1); `linear` is the
    matmul with the head's weight (F.linear, or oneDNN's on the CPU).

    Only label tokens are projected onto the vocabulary, in chunks of LOSS_CHUNK_ELEMENTS logits whose
    gradients are taken at once (`ChunkedLinearCrossEntropy`): a batch's (tokens × vocabulary) logits, their
    log-softmax and gradients (~1 GiB at batch 8 × 150 tokens × 49k words in fp32) never exist at once.
    Models whose head is more than a plain projection (a logit scale or soft-capping) take the plain
    path: transformers' logits at the predicting positions (`logits_to_keep`).
    """
    targets = labels[:, 1:]
    head = model.get_output_embeddings()
    if not plain_head(model, head):
        keep = (targets != IGNORE).any(0).nonzero().squeeze(1)  # (K,) positions whose next token is learned
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits  # (B, K, vocab)
        return F.cross_entropy(
            logits.flatten(0, 1).float(), targets[:, keep].flatten(), ignore_index=IGNORE, reduction="sum"
        )
    where = targets != IGNORE
    hidden = model.base_model(**inputs, use_cache=False).last_hidden_state[:, :-1][where]  # (N, hidden)
    chunk = max(1, LOSS_CHUNK_ELEMENTS // head.out_features)
    return ChunkedLinearCrossEntropy.apply(hidden, head.weight, head.bias, targets[where], chunk, linear)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Σ cross-entropy(hidden @ weightᵀ + bias, targets), `chunk` rows at a time (Liger-Kernel's fused linear
    cross-entropy, in plain torch): the forward pass also computes the gradients of hidden, weight and bias,
    so no chunk's logits are kept or recomputed; backward only scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, linear):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for s in range(0, len(targets), chunk):
            h, t = hidden[s : s + chunk], targets[s : s + chunk]
            logits = linear(h, weight, bias).float()  # (C, vocab)
            lse = logits.logsumexp(-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if need_h or need_w or need_b:
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                g[torch.arange(len(t), device=g.device), t] -= 1.0  # d loss / d logits
                g = g.to(hidden.dtype)
                if need_h:
                    grad_h[s : s + chunk] = linear(g, weight.t(), None)  # g @ weight
                if need_w:
                    grad_w.addmm_(g.T, h)
                if need_b:
                    grad_b += g.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grads = tuple(None if g is None else g * grad_total for g in ctx.saved_tensors)
        return (*grads, None, None, None)


def plain_head(model: torch.nn.Module, head: torch.nn.Module | None) -> bool:
    """Whether the model's logits are exactly `head(base_model(...).last_hidden_state)`."""
    scaled = any(getattr(model.config, a, None) not in (None, 1, 1.0) for a in LOGIT_TRANSFORMS)
    return (
        isinstance(model, PreTrainedModel) and model.base_model is not model  # not e.g. a PeftModel wrapping one
        and isinstance(head, torch.nn.Linear) and not scaled
    )  # fmt: skip


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module, rows: list[Row], batch_size: int, pad_id: int, device: torch.device, linear=F.linear
) -> float:
    """Mean loss per label token over `rows`, in eval mode, batched by length."""
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))
    total, tokens = 0.0, 0
    for s in range(0, len(order), batch_size):
        batch = [rows[i] for i in order[s : s + batch_size]]
        total += loss_sum(model, *collate(batch, pad_id, device), linear).item()
        tokens += sum(r.n_loss for r in batch)
    model.train()
    return total / tokens
