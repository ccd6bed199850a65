"""What goes into the engine and what comes out: one request, the adapters it applies, each increment of output."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from adapters.peft_io import LoraWeights
from adapters.tiers.registry import Adapter
from server.engine.sampling import SamplingParams, TokenLogprob


@dataclass
class AdapterUse:
    """An adapter a request applies, with its weight (1.0 unless composing) and its host weights."""

    adapter: Adapter
    weight: float = 1.0
    lora: LoraWeights | None = None  # pinned by the request; defaults to the adapter's host copy


@dataclass
class RequestOutput:
    """One increment of a request's output."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


@dataclass
class GenerationRequest:
    """One sequence to generate: prompt tokens, sampling, adapters; `emit` is called from the engine thread."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[RequestOutput], None]
    adapters: list[AdapterUse] = field(default_factory=list)
