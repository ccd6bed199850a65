"""API keys and scopes (API.md, Conventions: Auth).

The keys file holds one key a line, optionally followed by its scopes, comma-separated
(`inference`, `admin`; default both). Blank lines and `#` comments are skipped.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from fastapi import Request

from server.http.errors import APIError

SCOPES = ("inference", "admin")


def load_api_keys(path: Path | None) -> dict[str, set[str]] | None:
    """{key: scopes}, or None when no keys file is configured (no auth)."""
    if path is None:
        return None
    keys: dict[str, set[str]] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, _, rest = line.partition(" ")
        scopes = {s.strip() for s in rest.split(",") if s.strip()} or set(SCOPES)
        unknown = scopes - set(SCOPES)
        if unknown:
            raise ValueError(f"api_keys_file line {n}: unknown scopes {sorted(unknown)}")
        keys[key] = scopes
    if not keys:
        raise ValueError("api_keys_file holds no keys")
    return keys


def check_key(keys: dict[str, set[str]] | None, request: Request, scope: str) -> None:
    if keys is None:
        return
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else ""
    scopes = next((s for k, s in keys.items() if hmac.compare_digest(k.encode(), token.encode())), None)
    if not token or scopes is None:
        raise APIError(401, "Missing or invalid API key: send 'Authorization: Bearer <key>'.", "authentication_error",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    if scope not in scopes:
        raise APIError(403, f"This API key lacks the '{scope}' scope.", "permission_error", code="insufficient_scope")
