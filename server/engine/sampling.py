"""Next-token choice for a batch of rows, each with its own sampling parameters.

Greedy (`temperature == 0`), temperature and nucleus (top_p) sampling are vectorised over the
batch. Each sampling row draws its one uniform number from its own `torch.Generator`, so what a
seeded request gets does not depend on which rows share its batch. Logprobs are those of the
model's distribution (log-softmax of the raw logits), as OpenAI and vLLM report them.
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
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    # None: no logprobs; k >= 0: the chosen token's logprob plus the top k alternatives
    logprobs: int | None = None


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
) -> torch.Tensor:
    """Choose one token per row. logits: (B, V) float32; banned: (B, V) bool or None."""
    if banned is not None:
        logits = logits.masked_fill(banned, float("-inf"))
    greedy = logits.argmax(-1)
    sampled_rows = temperatures > 0
    if not bool(sampled_rows.any()):
        return greedy
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


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> list[TokenLogprob]:
    """The chosen token's logprob and the top-k of each row."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, tokens[:, None]).squeeze(1).tolist()
    top_v, top_i = logp.topk(max(k, 1), dim=-1) if k > 0 else (None, None)
    out = []
    for r, tok in enumerate(tokens.tolist()):
        top = list(zip(top_i[r].tolist(), top_v[r].tolist())) if k > 0 else []
        out.append(TokenLogprob(token_id=tok, logprob=chosen[r], top=top))
    return out
