"""API keys, scopes, tenants and per-key limits (API.md, Conventions: Auth), checked before the body is read.

The keys file holds one key a line: `KEY [scope,scope] [tenant=NAME] [rpm=N] [tpm=N] [concurrent=N]`. Scopes are
`inference` (generate; list and use the adapters it can see), `train` (upload, delete, publish and train its own
adapters and files) and `admin` (everything, every tenant); none given means all three. Keys of one `tenant` share
what they create (default: each key is a tenant of its own, named from a hash of the key, never the key itself).
`rpm`, `tpm` and `concurrent` are the key's requests per minute, tokens per minute (prompt plus requested
completion tokens) and requests generating at once. Blank lines and `#` comments are skipped.

FastAPI reads and parses a request's body before it solves the route's dependencies, so the key is checked by the
route class (`AuthRoute`), which runs before FastAPI's handler: a request without a valid key costs the server its
headers, not its body.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from fastapi.routing import APIRoute
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.http.errors import APIError, error_response
from server.tenants import OPERATOR, Tenant

SCOPES = ("inference", "train", "admin")
_LIMIT_OPTIONS = {"rpm": "requests_per_minute", "tpm": "tokens_per_minute", "concurrent": "max_concurrent"}


@dataclass(frozen=True)
class KeyLimits:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None


@dataclass(frozen=True)
class ApiKey:
    """What a request's key may do; never holds the key itself."""

    id: str
    """A name for logs and rate-limit buckets: `key-` and a hash of the key."""
    tenant: str | None
    scopes: frozenset[str]
    limits: KeyLimits = field(default_factory=KeyLimits)

    @property
    def admin(self) -> bool:
        return "admin" in self.scopes

    def allows(self, scope: str) -> bool:
        return self.admin or scope in self.scopes

    @property
    def as_tenant(self) -> Tenant:
        return Tenant(self.tenant, admin=self.admin)


NO_AUTH = ApiKey(id="anonymous", tenant=OPERATOR.id, scopes=frozenset(SCOPES))  # no keys file: everything allowed


def _key_id(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def load_api_keys(path: Path | None) -> dict[str, ApiKey] | None:
    """{key: ApiKey}, or None when no keys file is configured (no auth)."""
    if path is None:
        return None
    keys: dict[str, ApiKey] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        key, scopes, options = words[0], set(), {}
        for word in words[1:]:
            name, eq, value = word.partition("=")
            if not eq:
                scopes |= {s.strip() for s in word.split(",") if s.strip()}
            elif name == "tenant" and value:
                options["tenant"] = value
            elif name in _LIMIT_OPTIONS and value.isdigit() and int(value) > 0:
                options[_LIMIT_OPTIONS[name]] = int(value)
            else:
                raise ValueError(f"api_keys_file line {n}: bad option {word!r} (tenant=NAME, rpm=N, tpm=N, concurrent=N)")
        unknown = scopes - set(SCOPES)
        if unknown:
            raise ValueError(f"api_keys_file line {n}: unknown scopes {sorted(unknown)} (known: {', '.join(SCOPES)})")
        tenant = options.pop("tenant", None) or _key_id(key)
        keys[key] = ApiKey(_key_id(key), tenant, frozenset(scopes or SCOPES), KeyLimits(**options))
    if not keys:
        raise ValueError("api_keys_file holds no keys")
    return keys


def authenticate(keys: dict[str, ApiKey] | None, request: Request, scopes: tuple[str, ...] = ()) -> ApiKey:
    """The request's key (401 if missing or unknown), which must allow one of `scopes` (403) when any are named."""
    if keys is None:
        return NO_AUTH
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else ""
    found = None
    for k, v in keys.items():  # compare with every key: the time taken tells nothing about which matched
        if hmac.compare_digest(k.encode(), token.encode()):
            found = v
    if not token or found is None:
        raise APIError(401, "Missing or invalid API key: send 'Authorization: Bearer <key>'.", "authentication_error",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    if scopes and not any(found.allows(s) for s in scopes):
        raise APIError(403, f"This API key lacks the '{scopes[0]}' scope.", "permission_error", code="insufficient_scope")
    return found


def require(*scopes: str):
    """A route dependency naming the scopes (any one suffices) its route needs; `AuthRoute` checks them before the
    body is read, and the dependency then gives the route the request's `ApiKey`."""

    def dep(request: Request) -> ApiKey:
        return request.state.api_key

    dep.scopes = scopes  # read by AuthRoute
    return Depends(dep)


def _caller(request: Request) -> ApiKey:
    return request.state.api_key


Caller = Annotated[ApiKey, Depends(_caller)]
"""The request's key, for routes that act on what its tenant owns (checked by `AuthRoute`)."""


class AuthRoute(APIRoute):
    """A route whose API key and scope are checked before FastAPI reads the body (see the module docstring), then
    its per-key request rate (`on_request(request, key)`, the app's rate limiter, which adds its headers)."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()
        scopes = tuple(s for d in self.dependencies for s in getattr(d.dependency, "scopes", ()))

        async def checked(request: Request) -> Response:
            st = request.app.state.loraplex
            if st.draining:
                raise APIError(503, "the server is shutting down", "server_error", headers={"Retry-After": "5"})
            key = authenticate(st.api_keys, request, scopes)
            request.state.api_key = key
            headers = st.rate_limits.on_request(key)
            response = await handler(request)
            response.headers.update(headers)
            return response

        return checked


class AllowedHosts:
    """ASGI middleware: Starlette's `TrustedHostMiddleware` decides which Host headers are accepted (DNS rebinding:
    a web page must not reach a server on the loopback through a name it controls); a refusal is a 400 in the
    error envelope."""

    def __init__(self, app: ASGIApp, allowed_hosts: list[str]):
        self.app = app
        self.check = TrustedHostMiddleware(self._accepted, allowed_hosts=allowed_hosts, www_redirect=False)

    @staticmethod
    async def _accepted(scope: Scope, receive: Receive, send: Send) -> None:
        scope["loraplex.host_accepted"] = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def discard(message: Message) -> None:  # the middleware's own plain-text refusal
            pass

        await self.check(scope, receive, discard)
        if scope.pop("loraplex.host_accepted", False):
            await self.app(scope, receive, send)
        else:
            err = APIError(400, "the Host header names a host this server does not answer for (allowed_hosts)",
                           "invalid_request_error", code="invalid_host")  # fmt: skip
            await error_response(err)(scope, receive, send)
