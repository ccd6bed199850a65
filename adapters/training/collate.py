"""Training rows to batches: tokenized examples, packing, each epoch's step plan, padding.

As HF's data collators and samplers: batches pad on the right to their longest row, and rows of
similar length are grouped into the same step (`group_by_length`, its `LengthGroupedSampler`
windows of shuffled rows sorted by length) so that little compute goes to padding. Packing
concatenates examples into rows of up to max_length tokens with positions restarting at each
example, the format transformers' masks read as separate sequences (`find_packed_sequence_indices`:
no attention across examples).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from adapters.training.data import IGNORE, DataError, read_jsonl, tokenize

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
