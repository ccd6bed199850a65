"""Exceptions raised by the clients, and the mapping from an error answer to one of them.

Every non-2xx answer on `/v1/*` carries the OpenAI envelope
`{"error": {"message", "type", "param", "code"}}` (API.md, "Conventions"); the HTTP status
picks the exception class, as in the `openai` Python package.
"""

from __future__ import annotations

import email.utils
import json
import time
from typing import Any

import httpx


class LoraplexError(Exception):
    """Base of every error the server reports; `status_code` is None for a mid-stream error event."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.type = type
        self.param = param
        self.code = code

    def __str__(self) -> str:
        prefix = f"{self.status_code} " if self.status_code is not None else ""
        suffix = f" (code: {self.code})" if self.code else ""
        return f"{prefix}{self.message}{suffix}"


class BadRequestError(LoraplexError):
    """400: a bad value, e.g. prompt + max_tokens over the context length."""


class AuthenticationError(LoraplexError):
    """401: no API key, or a wrong one."""


class PermissionDeniedError(LoraplexError):
    """403: the key lacks the scope (`inference` or `admin`)."""


class NotFoundError(LoraplexError):
    """404: unknown model, adapter, file or job."""


class ConflictError(LoraplexError):
    """409: the adapter name exists and `overwrite` was not set."""


class PayloadTooLargeError(LoraplexError):
    """413: body or upload too large."""


class UnprocessableEntityError(LoraplexError):
    """422: the request violates the schema."""


class RateLimitError(LoraplexError):
    """429: the per-key rate limit was hit."""


class ServiceUnavailableError(LoraplexError):
    """503: overloaded or draining; `retry_after` is the server's hint in seconds, if any."""

    def __init__(self, message: str, *, retry_after: float | None = None, **fields: Any) -> None:
        super().__init__(message, **fields)
        self.retry_after = retry_after


class APIError(LoraplexError):
    """Any other status, or an error answer without the envelope (e.g. from a proxy)."""


_ERROR_BY_STATUS: dict[int, type[LoraplexError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: UnprocessableEntityError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}

# An error body that is not the envelope is quoted in the message, cut to this length.
_MAX_QUOTED_BODY = 200


def error_from_response(response: httpx.Response) -> LoraplexError:
    """The exception for a non-2xx answer whose body has been read."""
    envelope = _parse_envelope(response.content)
    if envelope is None:
        text = response.content.decode("utf-8", errors="replace").strip()[:_MAX_QUOTED_BODY]
        message = text or response.reason_phrase or "error without a body"
        return APIError(message, status_code=response.status_code)
    cls = _ERROR_BY_STATUS.get(response.status_code, APIError)
    if cls is ServiceUnavailableError:
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        return ServiceUnavailableError(retry_after=retry_after, status_code=response.status_code, **envelope)
    return cls(status_code=response.status_code, **envelope)


def error_from_event(payload: dict[str, Any]) -> LoraplexError:
    """The exception for a `data: {"error": {...}}` event sent after a stream started."""
    envelope = _fields_of(payload) or {"message": json.dumps(payload)}
    return LoraplexError(**envelope)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a `Retry-After` header: delta-seconds or an HTTP date (RFC 9110)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _parse_envelope(content: bytes) -> dict[str, Any] | None:
    try:
        body = json.loads(content)
    except ValueError:
        return None
    return _fields_of(body)


def _fields_of(body: Any) -> dict[str, Any] | None:
    """The envelope's fields as keyword arguments, or None if `body` is not the envelope."""
    if not isinstance(body, dict) or not isinstance(body.get("error"), dict):
        return None
    error = body["error"]
    message = error.get("message")
    return {
        "message": str(message) if message else "error without a message",
        "type": error.get("type"),
        "param": error.get("param"),
        "code": error.get("code"),
    }
