"""How the HTTP server listens and what it accepts; importable without torch (server.settings reads it)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, FilePath

Access = Literal["open", "key", "admin"]
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1"]


class HttpConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = Field(8000, ge=0, le=65535)
    """Port to listen on."""
    api_keys_file: FilePath | None = None
    """Lines `KEY [scope,scope] [tenant=NAME] [rpm=N] [tpm=N] [concurrent=N]` (scopes: inference, train, admin; default
    all); unset means no auth."""
    metrics_access: Access = "key"
    """Who may read /metrics when keys are configured: open (anyone), key (any valid key) or admin."""
    docs_access: Access = "key"
    """Who may read /docs, /redoc and /openapi.json when keys are configured: open, key or admin."""
    allowed_hosts: list[str] | None = None
    """Host header values accepted (Starlette's TrustedHostMiddleware; `*.example.com` patterns, `*` for any); unset:
    the loopback names while listening on a loopback address, else any."""
    max_request_bytes: int = Field(2 * 2**20, ge=1024)
    """Largest JSON request body (parsing one holds the event loop: ~50 ms at 2 MiB)."""
    max_upload_bytes: int = Field(512 * 2**20, ge=1024)
    """Largest adapter upload (the body, and an archive's decompressed size)."""
    drain_timeout: float = Field(30.0, ge=0)
    """Seconds SIGTERM lets running requests finish (and training jobs checkpoint); then streams end with an error."""

    def trusted_hosts(self) -> list[str]:
        """The Host header values accepted (see `allowed_hosts`)."""
        if self.allowed_hosts is not None:
            return self.allowed_hosts
        loopback = self.host in LOOPBACK_HOSTS or self.host.startswith("127.")
        return LOOPBACK_HOSTS + ([self.host] if self.host not in LOOPBACK_HOSTS else []) if loopback else ["*"]
