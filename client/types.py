"""Typed response models: the OpenAI-shaped objects the loraplex server returns (see API.md).

Every model allows extra fields, so a server that adds a field never breaks an older client.
Shapes follow the OpenAI API reference (completions, chat, files, fine-tuning) plus the
loraplex `adapter` object.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class _Response(BaseModel):
    """Base of every response model: unknown fields are kept, not rejected."""

    model_config = ConfigDict(extra="allow")


class Model(_Response):
    """One entry of `GET /v1/models`: the base model, or an adapter with `parent` = base id."""

    id: str
    object: str = "model"
    created: int | None = None
    owned_by: str | None = None
    parent: str | None = None


class ModelList(_Response):
    object: str = "list"
    data: list[Model]


class Usage(_Response):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


# --- completions ---------------------------------------------------------------------------


class CompletionLogprobs(_Response):
    """Legacy completions logprobs: parallel lists, one entry per generated token."""

    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int] = []


class CompletionChoice(_Response):
    text: str
    index: int = 0
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(_Response):
    id: str
    object: str = "text_completion"
    created: int | None = None
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class CompletionChunk(_Response):
    """One SSE event of a streamed completion; with `include_usage` the last one has only usage."""

    id: str
    object: str = "text_completion"
    created: int | None = None
    model: str
    choices: list[CompletionChoice] = []
    usage: Usage | None = None


# --- chat ----------------------------------------------------------------------------------


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = []


class ChatCompletionLogprobs(_Response):
    content: list[TokenLogprob] | None = None


class ChatMessage(_Response):
    role: str
    content: str | None = None


class ChatCompletionChoice(_Response):
    index: int = 0
    message: ChatMessage
    finish_reason: str | None = None
    logprobs: ChatCompletionLogprobs | None = None


class ChatCompletion(_Response):
    id: str
    object: str = "chat.completion"
    created: int | None = None
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage | None = None


class ChatDelta(_Response):
    """The part of the assistant message a chunk adds; `role` comes only in the first chunk."""

    role: str | None = None
    content: str | None = None


class ChatCompletionChunkChoice(_Response):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: ChatCompletionLogprobs | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: str = "chat.completion.chunk"
    created: int | None = None
    model: str
    choices: list[ChatCompletionChunkChoice] = []
    usage: Usage | None = None


# --- adapters, files, fine-tuning jobs -----------------------------------------------------


class Adapter(_Response):
    """A registered LoRA adapter; `id` is its name, `parent` the base model id."""

    id: str
    object: str = "adapter"
    parent: str | None = None
    rank: int
    alpha: float
    target_modules: list[str]
    size_bytes: int
    sha256: str | None = None
    version: int
    created_at: int
    owned_by: str | None = None
    """The tenant that uploaded it ("system": the operator's)."""
    public: bool = False
    """Usable by every tenant, not only its owner."""


class FileObject(_Response):
    id: str
    object: str = "file"
    bytes: int
    filename: str
    purpose: str
    created_at: int


class JobError(_Response):
    message: str | None = None
    code: str | None = None
    param: str | None = None


class FineTuningJob(_Response):
    """A training job; `status` is one of queued, running, succeeded, failed, cancelled."""

    id: str
    object: str = "fine_tuning.job"
    status: str
    adapter_name: str
    model: str | None = None
    fine_tuned_model: str | None = None
    created_at: int
    started_at: int | None = None
    finished_at: int | None = None
    trained_tokens: int | None = None
    error: JobError | str | None = None
    metrics: dict[str, Any] | None = None
    seconds_used: float | None = None
    estimated_finish: int | None = None


class JobEvent(_Response):
    """One training log line; `data` carries step, loss and learning rate."""

    created_at: int
    level: str
    message: str
    data: dict[str, Any] | None = None
