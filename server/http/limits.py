"""Request body caps (413 in the error envelope), enforced while the body streams in.

A declared Content-Length over the cap is refused before anything is read; a chunked body is
counted as it arrives and cut off at the cap, so no upload can fill the disk or the memory.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

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
                if seen > limit:
                    raise too_large
            return message

        await self.app(scope, counted, send)
