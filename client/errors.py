"""Exceptions raised by the clients, and the mapping from an error answer to one of them.

Every non-2xx answer on `/v1/*` carries the OpenAI envelope
`{"error": {"message", "type", "param", "code"}}` (API.md, "Conventions"); the HTTP status
picks the exception class, named and arranged as in the `openai` Python package: `APIStatusError` (with
`status_code`, `response`, `body`) and its subclasses per status, `InternalServerError` for 5xx,
`APIConnectionError` / `APITimeoutError` when no answer came (naming the URL tried).
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


class APIConnectionError(LoraplexError):
    """No answer: the server could not be reached (the message names the URL tried)."""

    def __init__(self, message: str, *, url: str | None = None) -> None:
        super().__init__(message)
        self.url = url


class APITimeoutError(APIConnectionError):
    """The server did not answer in time."""


class APIStatusError(LoraplexError):
    """An error answer (non-2xx); `response` is the httpx response and `body` its parsed JSON (or None)."""

    response: httpx.Response | None = None
    body: Any = None
    retry_after: float | None = None
    """The server's `Retry-After` hint in seconds, if it sent one."""


class BadRequestError(APIStatusError):
    """400: a bad value, e.g. prompt + max_tokens over the context length."""


class AuthenticationError(APIStatusError):
    """401: no API key, or a wrong one."""


class PermissionDeniedError(APIStatusError):
    """403: the key lacks the scope (`inference` or `admin`)."""


class NotFoundError(APIStatusError):
    """404: unknown model, adapter, file or job."""


class ConflictError(APIStatusError):
    """409: the adapter name exists and `overwrite` was not set."""


class PayloadTooLargeError(APIStatusError):
    """413: body or upload too large."""


class UnprocessableEntityError(APIStatusError):
    """422: the request violates the schema."""


class RateLimitError(APIStatusError):
    """429: the per-key rate limit was hit."""


class InternalServerError(APIStatusError):
    """5xx: the server failed (500), or a proxy in front of it (502, 504)."""


class ServiceUnavailableError(InternalServerError):
    """503: overloaded, loading or draining; `retry_after` is the server's hint in seconds, if any."""


class APIError(APIStatusError):
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


def error_from_response(response: httpx.Response) -> APIStatusError:
    """The exception for a non-2xx answer whose body has been read."""
    envelope = _parse_envelope(response.content)
    if envelope is None:
        text = response.content.decode("utf-8", errors="replace").strip()[:_MAX_QUOTED_BODY]
        message = text or response.reason_phrase or "error without a body"
        error: APIStatusError = APIError(message, status_code=response.status_code)
    else:
        cls = _ERROR_BY_STATUS.get(response.status_code, APIError)
        if cls is APIError and response.status_code >= 500:
            cls = InternalServerError
        error = cls(status_code=response.status_code, **envelope)
    error.response = response
    try:
        error.body = response.json()
    except ValueError:
        error.body = None
    error.retry_after = parse_retry_after(response.headers.get("retry-after"))
    return error


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
