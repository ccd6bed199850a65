"""loraplex client: typed sync and async Python clients for the loraplex HTTP API (API.md).

Depends on httpx, pydantic, httpx-sse (server-sent events) and tenacity (retries) only; it never imports the
server or torch. Named as the `openai` package is: errors by status (`RateLimitError`, `NotFoundError`, ...,
`APIConnectionError`), `max_retries` with backoff honouring `Retry-After`.

    from client import LoraplexClient

    with LoraplexClient("http://127.0.0.1:8000") as lp:
        print(lp.completions("my-adapter", "Hello", max_tokens=16).choices[0].text)
"""

from ._async import AsyncLoraplexClient
from ._sync import LoraplexClient
from .errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InternalServerError,
    LoraplexError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
    UnprocessableEntityError,
)
from .types import (
    Adapter,
    ChatCompletion,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionLogprobs,
    ChatDelta,
    ChatMessage,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    FileObject,
    FineTuningJob,
    JobError,
    JobEvent,
    Model,
    ModelList,
    TokenLogprob,
    TopLogprob,
    Usage,
)

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "InternalServerError",
    "Adapter",
    "AsyncLoraplexClient",
    "AuthenticationError",
    "BadRequestError",
    "ChatCompletion",
    "ChatCompletionChoice",
    "ChatCompletionChunk",
    "ChatCompletionChunkChoice",
    "ChatCompletionLogprobs",
    "ChatDelta",
    "ChatMessage",
    "Completion",
    "CompletionChoice",
    "CompletionChunk",
    "CompletionLogprobs",
    "ConflictError",
    "FileObject",
    "FineTuningJob",
    "JobError",
    "JobEvent",
    "LoraplexClient",
    "LoraplexError",
    "Model",
    "ModelList",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServiceUnavailableError",
    "TokenLogprob",
    "TopLogprob",
    "UnprocessableEntityError",
    "Usage",
]
