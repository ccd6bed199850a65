"""The OpenAI error envelope, for every non-2xx answer on /v1/*, and the one place where the errors of the layers
below (adapter catalog, job service) become HTTP statuses, so routes need not catch them.

An error nobody mapped becomes a 500 in the envelope, answered by `InternalErrors` without re-raising: uvicorn
closes a keep-alive connection whose app raised, and a client's connection should outlive one failed request.
Lists of problems are capped (`MAX_PROBLEMS`), so no error body grows with what a client sent."""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapters.peft_io import AdapterError
from adapters.tiers.registry import AdapterExists, AdapterNotFound
from server.catalog import AdapterNotOwned
from server.jobs.service import Conflict, JobRefused, NotFound

log = logging.getLogger(__name__)
MAX_PROBLEMS = 20

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
          405: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 503: "server_error"}


class APIError(Exception):
    """An answer other than 2xx, raised anywhere below the routes."""

    def __init__(self, status: int, message: str, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        message = message.encode("utf-8", "backslashreplace").decode()  # a lone surrogate echoed back stays JSON
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "server_error")
        self.headers = headers

    def envelope(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.envelope(), status_code=err.status, headers=err.headers)


def join_problems(problems: list[str]) -> str:
    """The problems as one message, at most `MAX_PROBLEMS` of them."""
    more = len(problems) - MAX_PROBLEMS
    return "; ".join(problems[:MAX_PROBLEMS]) + (f"; and {more} more" if more > 0 else "")


def _loc(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or None


def _not_found(e: NotFound) -> APIError:
    if e.what == "model":
        return APIError(404, f"The model '{e.id}' does not exist.", "invalid_request_error", "model", "model_not_found")
    if e.what == "job":
        return APIError(404, f"No fine-tuning job with id '{e.id}'.", "invalid_request_error", "fine_tuning_job_id")
    return APIError(404, f"No file with id '{e.id}'.", "invalid_request_error", "file_id")


# what the layers below raise → the answer (API.md, Conventions)
DOMAIN_ERRORS: dict[type[Exception], Callable[[Exception], APIError]] = {
    AdapterError: lambda e: APIError(400, "invalid adapter: " + join_problems(e.problems), param="file"),
    AdapterNotFound: lambda e: APIError(404, f"The adapter '{e.args[0]}' does not exist.", param="name",
                                        code="model_not_found"),  # fmt: skip
    AdapterExists: lambda e: APIError(409, f"an adapter named '{e.args[0]}' exists (use ?overwrite=true to replace it)",
                                      param="name", code="adapter_exists"),  # fmt: skip
    AdapterNotOwned: lambda e: APIError(403, f"The adapter '{e.args[0]}' belongs to another tenant.", "permission_error",
                                        "name", "not_owner"),  # fmt: skip
    JobRefused: lambda e: APIError(400, join_problems(e.problems), param=e.param),
    NotFound: _not_found,
    Conflict: lambda e: APIError(409, e.message, param=e.param, code=e.code),
}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    for kind, to_api in DOMAIN_ERRORS.items():

        async def _domain(request: Request, exc: Exception, to_api=to_api) -> JSONResponse:
            return error_response(to_api(exc))

        app.add_exception_handler(kind, _domain)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        message = "; ".join(f"{_loc(e['loc']) or 'body'}: {e['msg']}" for e in errors[:5])
        return error_response(APIError(422, message, "invalid_request_error", _loc(tuple(first["loc"]))))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        return error_response(APIError(exc.status_code, message, headers=getattr(exc, "headers", None)))



class InternalErrors:
    """ASGI middleware: any exception the app did not answer becomes a 500 in the envelope, not a re-raise (which
    would make uvicorn drop the connection); once a response has started there is nothing left to answer."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if not started:
                await error_response(APIError(500, "internal server error", "server_error"))(scope, receive, send)
