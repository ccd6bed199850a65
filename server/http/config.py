"""How the HTTP server listens and what it accepts; importable without torch (server.settings reads it)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class HttpConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = Field(8000, ge=0, le=65535)
    """Port to listen on."""
    api_keys_file: Path | None = None
    """Lines `KEY [scope,scope]` (scopes: inference, admin; default both); unset means no auth."""
    metrics_require_key: bool = False
    """Whether /metrics needs an API key (when keys are configured)."""
    max_request_bytes: int = Field(16 * 2**20, ge=1024)
    """Largest JSON request body."""
    max_upload_bytes: int = Field(512 * 2**20, ge=1024)
    """Largest adapter upload (the body, and an archive's decompressed size)."""
    drain_timeout: float = Field(30.0, ge=0)
    """Seconds SIGTERM waits for running requests (and training jobs to checkpoint) before exiting."""
