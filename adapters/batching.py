"""Training rows to batches: tokenized examples, packing, each epoch's step plan, padding, the loss.

As HF's data collators and samplers: batches pad on the right to their longest row, and rows of
similar length are grouped into the same step (`group_by_length`, its `LengthGroupedSampler`
windows of shuffled rows sorted by length) so that little compute goes to padding. Packing
concatenates examples into rows of up to max_length tokens with positions restarting at each
example, the format transformers' masks read as separate sequences (`find_packed_sequence_indices`:
no attention across examples). The loss is the summed next-token cross-entropy over label tokens;
the trainer divides it by the label-token count of a whole optimizer step. Only label tokens meet the
vocabulary, chunk by chunk (as Liger-Kernel's fused linear cross-entropy).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapters.data import IGNORE, DataError, read_jsonl, tokenize
from adapters.dense import linear_for

LOSS_CHUNK_ELEMENTS = 1 << 23  # logits per chunk of the loss (32 MiB in fp32; 170 tokens of a 49k vocabulary)
# config attributes of transformers models whose logits are not the head's plain output
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
GROUP_STEPS = 8  # steps' worth of shuffled rows sorted by length together (more: less padding, less randomness)


@dataclass
class Row:
    """One training row: an example, or several packed ones (then positions restart at each)."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None
    n_loss: int = field(init=False)
    """Tokens that carry loss."""

    def __post_init__(self) -> None:
        self.n_loss = sum(label != IGNORE for label in self.labels)


def read_rows(
    path: Path, tokenizer: PreTrainedTokenizerBase, max_length: int, max_examples: int | None = None
) -> list[Row]:
    """Tokenized examples. The first token of each predicts nothing (there is no token before it)."""
    rows = []
    for ex in read_jsonl(path, max_examples=max_examples):
        ids, labels = tokenize(tokenizer, ex, max_length)
        rows.append(Row(ids, [IGNORE] + labels[1:]))
    if not any(row.n_loss for row in rows):
        raise DataError([f"no example of {Path(path).name} keeps a completion token within max_length={max_length}"])
    return rows


def pack_rows(rows: list[Row], max_length: int, seed: int) -> list[Row]:
    """Concatenate rows (in a seeded order) into rows of up to max_length tokens, greedily.

    Each example keeps its own positions 0..n-1: transformers reads a position that does not
    follow its predecessor as a new sequence and masks attention across the boundary (its
    `find_packed_sequence_indices`), as long as no attention_mask is passed.
    """
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    groups: list[list[Row]] = []
    width = max_length  # of the row being filled
    for row in (rows[i] for i in order):
        if width + len(row.input_ids) > max_length:
            groups.append([])
            width = 0
        groups[-1].append(row)
        width += len(row.input_ids)
    return [
        Row(
            [t for r in group for t in r.input_ids],
            [t for r in group for t in r.labels],
            [t for r in group for t in range(len(r.input_ids))],
        )
        for group in groups
    ]


def plan_epoch(lengths: list[int], per_step: int, seed: int, epoch: int, group: bool) -> list[list[int]]:
    """The row indices of each optimizer step of one epoch: a seeded shuffle; with `group`, rows
    sorted by length within windows of GROUP_STEPS steps, the steps then shuffled."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch + 1)
    order = torch.randperm(len(lengths), generator=g).tolist()
    if group:
        window = per_step * GROUP_STEPS
        order = [
            i for s in range(0, len(order), window) for i in sorted(order[s : s + window], key=lambda i: -lengths[i])
        ]
    steps = [order[s : s + per_step] for s in range(0, len(order), per_step)]
    return [steps[i] for i in torch.randperm(len(steps), generator=g).tolist()] if group else steps


def collate(rows: list[Row], pad_id: int, device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(model inputs, labels) padded on the right to the longest row. Packed rows get position_ids
    and no attention_mask; their padding is one more sequence, positions from 0."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    positions = torch.arange(width).repeat(len(rows), 1)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r.input_ids), torch.tensor(r.labels), 1
        if r.position_ids is not None:
            positions[i, :n] = torch.tensor(r.position_ids)
            positions[i, n:] = torch.arange(width - n)
    inputs = {"input_ids": ids.to(device)}
    if rows[0].position_ids is None:
        inputs["attention_mask"] = mask.to(device)
    else:
        inputs["position_ids"] = positions.to(device)
    return inputs, labels.to(device)


def loss_sum(model: torch.nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the label tokens (labels[:, t] is predicted at t - 1).

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
    return ChunkedLinearCrossEntropy.apply(hidden, head.weight, head.bias, targets[where], chunk)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Σ cross-entropy(hidden @ weightᵀ + bias, targets), `chunk` rows at a time (Liger-Kernel's fused linear
    cross-entropy, in plain torch): the forward pass also computes the gradients of hidden, weight and bias,
    so no chunk's logits are kept or recomputed; backward only scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        total = hidden.new_zeros((), dtype=torch.float32)
        linear = linear_for(weight)  # oneDNN on the CPU in fp32 (adapters.dense)
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
        return (*grads, None, None)


def plain_head(model: torch.nn.Module, head: torch.nn.Module | None) -> bool:
    """Whether the model's logits are exactly `head(base_model(...).last_hidden_state)`."""
    scaled = any(getattr(model.config, a, None) not in (None, 1, 1.0) for a in LOGIT_TRANSFORMS)
    return (
        isinstance(model, PreTrainedModel) and model.base_model is not model  # not e.g. a PeftModel wrapping one
        and isinstance(head, torch.nn.Linear) and not scaled
    )  # fmt: skip


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module, rows: list[Row], batch_size: int, pad_id: int, device: torch.device
) -> float:
    """Mean loss per label token over `rows`, in eval mode, batched by length."""
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))
    total, tokens = 0.0, 0
    for s in range(0, len(order), batch_size):
        batch = [rows[i] for i in order[s : s + batch_size]]
        total += loss_sum(model, *collate(batch, pad_id, device)).item()
        tokens += sum(r.n_loss for r in batch)
    model.train()
    return total / tokens
