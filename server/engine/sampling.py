"""Next-token choice for a batch of rows, each with its own sampling parameters.

Greedy (`temperature == 0`), temperature and nucleus (top_p) sampling are vectorised over the
batch. Each sampling row draws its one uniform number from its own `torch.Generator`, so what a
seeded request gets does not depend on which rows share its batch. Logprobs are those of the
model's distribution (log-softmax of the raw logits), as OpenAI and vLLM report them. Nothing here
reads the device: whether any row samples is the caller's host-side knowledge, and the chosen tokens
(with their logprobs) come back in one copy (`packed` / `unpack`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """What one request asks of decoding."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: frozenset[int] = frozenset()  # a set: each new token is looked up in it
    ignore_eos: bool = False
    min_tokens: int = 0
    # None: no logprobs; k >= 0: the chosen token's logprob plus the top k alternatives
    logprobs: int | None = None

    def __post_init__(self) -> None:
        self.stop_token_ids = frozenset(self.stop_token_ids)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def sample(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    top_ps: torch.Tensor,
    generators: list[torch.Generator | None],
    banned: torch.Tensor | None = None,
    any_sampled: bool = True,
) -> torch.Tensor:
    """Choose one token per row. logits: (B, V) float32; banned: (B, V) bool or None; `any_sampled`: whether any
    row's temperature is above 0 (known on the host: no read of `temperatures`)."""
    if banned is not None:
        logits = logits.masked_fill(banned, float("-inf"))
    greedy = logits.argmax(-1)
    if not any_sampled:
        return greedy
    sampled_rows = temperatures > 0
    t = torch.where(sampled_rows, temperatures, torch.ones_like(temperatures))
    probs = torch.softmax(logits / t[:, None], dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    cum = sorted_p.cumsum(-1)
    # nucleus: keep the smallest prefix whose mass reaches top_p (the first token always stays)
    sorted_p = sorted_p.masked_fill(cum - sorted_p >= top_ps[:, None], 0.0)
    cum = sorted_p.cumsum(-1)
    u = torch.stack(
        [torch.rand((), generator=g, device=logits.device) if g is not None else torch.rand((), device=logits.device) for g in generators]
    )
    pick = torch.searchsorted(cum, (u * cum[:, -1])[:, None]).clamp_max(cum.shape[1] - 1)
    chosen = order.gather(1, pick).squeeze(1)
    return torch.where(sampled_rows, chosen, greedy)


def packed(logits: torch.Tensor, tokens: torch.Tensor, k: int | None) -> torch.Tensor:
    """One tensor to copy to the host: per row the token, and with k its logprob and the top-k (ids, logprobs):
    (B, 1) or (B, 2 + 2k) float64 (token ids below 2^53 are exact)."""
    if k is None:
        return tokens[:, None]
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, tokens[:, None])
    top_v, top_i = logp.topk(k, dim=-1) if k > 0 else (logp[:, :0], tokens[:, None][:, :0])
    return torch.cat([tokens[:, None].double(), chosen.double(), top_i.double(), top_v.double()], 1)


def unpack(row: list[float], k: int | None) -> tuple[int, TokenLogprob | None]:
    """A row of `packed`, back on the host: (token, its logprob and top-k, or None without k)."""
    token = int(row[0])
    if k is None:
        return token, None
    ids, values = row[2 : 2 + k], row[2 + k :]
    return token, TokenLogprob(token_id=token, logprob=row[1], top=[(int(i), v) for i, v in zip(ids, values)])
