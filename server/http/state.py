"""The app's typed state, and the FastAPI dependencies through which routes reach it.

`AppState` is built by `create_app` (no import-time singletons); what needs the model (engine, catalog, OpenAI
serving) is filled in by the start-up thread once it is loaded. Routes take `State` (always) or `Ready` (503 until
the model is loaded and while draining); the API key and its scopes are `server.http.auth`'s.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from adapters.tiers.registry import AdapterRegistry
from adapters.tiers.store import AdapterStore
from server.catalog import AdapterCatalog
from server.engine.async_engine import AsyncEngine
from server.engine.engine import Engine
from server.engine.model import BaseModel
from server.http.auth import ApiKey
from server.http.errors import APIError
from server.http.limits import RateLimits
from server.http.metrics import Metrics
from server.http.openai import OpenAIServing
from server.jobs.service import JobService
from server.jobs.store import JobStore
from server.settings import Settings


@dataclass
class AppState:
    """Everything the routes reach."""

    settings: Settings
    store: AdapterStore
    jobs: JobStore
    job_service: JobService
    api_keys: dict[str, ApiKey] | None = None
    metrics: Metrics = field(default_factory=Metrics)
    rate_limits: RateLimits = field(default_factory=RateLimits)
    phase: str = "loading"
    """What start-up is doing (`/health/ready`): converting (the default model, once), loading, compiling (unless in
    the background), then ready or failed."""
    on_load_failure: Callable[[], None] | None = None
    """Called when start-up fails (`loraplex serve`: stop the server, exit non-zero)."""
    loop: asyncio.AbstractEventLoop | None = None
    """The server's event loop, for start-up code (in its own thread) that must run a coroutine there."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Adapters not registered at start-up: {name: why} (a corrupt stored adapter, an invalid directory)."""
    # filled in once the model is loaded
    registry: AdapterRegistry | None = None
    base: BaseModel | None = None
    engine: Engine | None = None
    async_engine: AsyncEngine | None = None
    catalog: AdapterCatalog | None = None
    serving: OpenAIServing | None = None
    load_error: str | None = None
    ready: bool = False
    draining: bool = False
    """SIGTERM came: /health/ready says so, new requests get 503, running ones finish until the drain deadline."""
    stopping: bool = False
    """The drain deadline passed: every stream still open ends now (job event streams too)."""


def app_state(request: Request) -> AppState:
    return request.app.state.loraplex


def ready_state(request: Request) -> AppState:
    """The state of a server that can serve: 503 with Retry-After while loading, after a failed load or draining."""
    st = app_state(request)
    if st.draining:
        raise APIError(503, "the server is shutting down", "server_error", headers={"Retry-After": "5"})
    if not st.ready:
        msg = f"the model failed to load: {st.load_error}" if st.load_error else "the model is still loading"
        raise APIError(503, msg, "server_error", headers={"Retry-After": "5"})
    return st


State = Annotated[AppState, Depends(app_state)]
Ready = Annotated[AppState, Depends(ready_state)]
