"""What one client may take: request body caps, and per-key rate limits (429 in the error envelope).

Body caps (413): a declared Content-Length over the cap is refused before anything is read; a chunked body is
counted as it arrives and cut off at the cap, so no upload can fill the disk or the memory.

Per-key limits (API.md, Auth; `server.http.auth` reads them from the keys file): requests per minute and tokens
per minute over a moving window (the `limits` library, in memory), and requests generating at once. A refusal is
429 with `Retry-After`; every answer to a limited key carries OpenAI's `x-ratelimit-*` headers.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.http.auth import ApiKey
from server.http.errors import APIError, error_response


class BodySizeLimit:
    def __init__(self, app: ASGIApp, default: int, per_path: dict[str, int]):
        self.app, self.default, self.per_path = app, default, per_path

    def _limit(self, path: str) -> int:
        return next((v for p, v in self.per_path.items() if path == p or path.startswith(p + "/")), self.default)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope["path"])
        too_large = APIError(413, f"the request body is larger than the limit of {limit} bytes", "invalid_request_error")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await error_response(too_large)(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # an HTTPException: FastAPI passes it on as it is, whatever it was parsing
                    raise HTTPException(413, too_large.message)
            return message

        await self.app(scope, counted, send)


def _duration(seconds: float) -> str:
    """OpenAI's reset format: `1s`, `6m0s`, `20ms`."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    s = math.ceil(seconds)
    return f"{s // 60}m{s % 60}s" if s >= 60 else f"{s}s"


class RateLimits:
    """Each key's requests/min, tokens/min and concurrent requests (keys without limits pass untouched)."""

    def __init__(self) -> None:
        self._window = MovingWindowRateLimiter(MemoryStorage())
        self._running: Counter[str] = Counter()

    def _headers(self, key: ApiKey, kind: str, per_minute: int) -> dict[str, str]:
        stats = self._window.get_window_stats(RateLimitItemPerMinute(per_minute), kind, key.id)
        reset = stats.reset_time - time.time() if stats.remaining < per_minute else 0.0
        return {f"x-ratelimit-limit-{kind}": str(per_minute), f"x-ratelimit-remaining-{kind}": str(stats.remaining),
                f"x-ratelimit-reset-{kind}": _duration(reset)}  # fmt: skip

    def _hit(self, key: ApiKey, kind: str, per_minute: int, cost: int) -> dict[str, str]:
        item = RateLimitItemPerMinute(per_minute)
        if cost > per_minute:  # no Retry-After: waiting cannot make it fit
            raise APIError(429, f"Request too large: {cost} {kind} requested, over this key's limit of {per_minute} "
                           f"{kind} per minute. Ask for fewer (max_tokens, n).", code="rate_limit_exceeded",
                           headers=self._headers(key, kind, per_minute))  # fmt: skip
        if not self._window.hit(item, kind, key.id, cost=cost):
            headers = self._headers(key, kind, per_minute)
            wait = max(1, math.ceil(self._window.get_window_stats(item, kind, key.id).reset_time - time.time()))
            raise APIError(429, f"Rate limit reached: {per_minute} {kind} per minute for this key. Retry in {wait} s.",
                           code="rate_limit_exceeded", headers=headers | {"Retry-After": str(wait)})  # fmt: skip
        return self._headers(key, kind, per_minute)

    def on_request(self, key: ApiKey) -> dict[str, str]:
        """Count one request of `key` (429 over its rate); the headers its answer carries."""
        rpm = key.limits.requests_per_minute
        return self._hit(key, "requests", rpm, 1) if rpm else {}

    @contextmanager
    def admit(self, key: ApiKey, tokens: int, headers: dict[str, str] | None = None) -> Iterator[None]:
        """Count `tokens` (prompt plus requested completion tokens) against `key`'s tokens per minute and hold one of
        its concurrent requests while the block runs (429 over either); `headers` receives the token headers the
        answer carries (OpenAI sends them on every answer, with the request ones)."""
        if key.limits.tokens_per_minute:
            found = self._hit(key, "tokens", key.limits.tokens_per_minute, tokens)
            if headers is not None:
                headers.update(found)
        most = key.limits.max_concurrent
        if most is not None and self._running[key.id] >= most:
            raise APIError(429, f"Too many concurrent requests: this key may run {most} at once.",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"})  # fmt: skip
        self._running[key.id] += 1
        try:
            yield
        finally:
            self._running[key.id] -= 1
