"""`create_app(settings)`: the FastAPI app, with no import-time singletons.

The process listens at once; the base model loads in a background thread (`/health/ready` says
503 until it is loaded and warmed up). Shutdown (SIGTERM) drains: uvicorn stops accepting,
running requests finish within `drain_timeout`, then the engine stops.
"""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fastapi import FastAPI

from adapters.memory import keep_freed_memory
from adapters.names import is_valid_name
from adapters.peft_io import AdapterError, describe_peft_adapter, load_peft_adapter
from adapters.registry import AdapterExists, AdapterRegistry
from adapters.store import AdapterStore, file_sha256
from server.async_engine import AsyncEngine
from server.auth import load_api_keys
from server.engine import Engine
from server.errors import install_error_handlers
from server.job_store import JobStore
from server.jobs import JobRunner, RunnerConfig
from server.limits import BodySizeLimit
from server.metrics import Metrics
from server.model import BaseModel, load_base_model
from server.serving import Serving
from server.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class AppState:
    """Everything the routes reach, filled in once the model is loaded."""

    settings: Settings
    store: AdapterStore
    registry: AdapterRegistry
    jobs: JobStore
    runner: JobRunner | None = None
    metrics: Metrics = field(default_factory=Metrics)
    name_locks: dict = field(default_factory=dict)  # adapter name → asyncio.Lock for writes
    api_keys: dict[str, set[str]] | None = None
    base: BaseModel | None = None
    engine: Engine | None = None
    async_engine: AsyncEngine | None = None
    serving: Serving | None = None
    load_error: str | None = None
    ready: bool = False
    draining: bool = False


def load_adapter_dir(state: AppState, directory: Path) -> None:
    """Register every subdirectory of `directory` that holds a PEFT adapter, under its name."""
    for sub in sorted(p for p in directory.iterdir() if p.is_dir()):
        if not (sub / "adapter_config.json").exists():
            continue
        if not is_valid_name(sub.name):
            log.error("skipping adapter directory %s: not a valid adapter name", sub.name)
            continue
        try:
            weights = load_peft_adapter(sub, state.engine.layer_shapes(), state.settings.max_lora_rank)
            files = [sub / "adapter_config.json", sub / "adapter_model.safetensors"]
            state.registry.add(sub.name, weights, path=sub, sha256=file_sha256(files[1]),
                               size_bytes=sum(f.stat().st_size for f in files))
            log.info("loaded adapter %s (rank %d)", sub.name, weights.rank)
        except AdapterError as e:
            log.error("skipping adapter %s: %s", sub.name, e)
        except AdapterExists:
            log.error("skipping adapter directory %s: an uploaded adapter has that name", sub.name)


def load_store(state: AppState) -> None:
    """Register the uploaded adapters kept in the store (validated at upload; weights read on use)."""
    for stored in state.store.load_all():
        rank, alpha, targets = describe_peft_adapter(stored.path)
        state.registry.add_stored(stored.name, stored.version, rank, alpha, targets, path=stored.path,
                                  sha256=stored.sha256, size_bytes=stored.size_bytes, created_at=stored.created_at)


def start_engine(state: AppState) -> None:
    """Load the model, build and warm the engine, load --adapter-dir (runs in a thread)."""
    s = state.settings
    try:
        if s.threads:
            torch.set_num_threads(s.threads)
        state.base = load_base_model(s.model, cache_dir=s.model_cache_dir, device=s.device, dtype=s.dtype, max_model_len=s.max_model_len)
        state.engine = Engine(state.base, s.engine_config())
        load_store(state)
        if s.adapter_dir:
            load_adapter_dir(state, s.adapter_dir)
        state.engine.warmup()
        state.engine.start()
        state.async_engine = AsyncEngine(state.engine, state.metrics, s.max_waiting)
        state.serving = Serving(state.base, state.async_engine, state.registry, state.engine.max_len,
                                state.engine.layer_shapes())
        e, pool = state.engine, state.engine.pool
        state.metrics.bind(
            waiting=lambda: e.num_waiting,
            running=lambda: e.num_running,
            adapters_registered=lambda: len(state.registry),
            adapters_resident=pool.resident_count,
            adapter_loads=lambda: pool.loads,
            adapter_evictions=lambda: pool.evictions,
        )
        if e.merger:
            m = e.merger
            state.metrics.bind(merged=lambda: m.merged is not None, merges=lambda: m.merges, unmerges=lambda: m.unmerges)
        state.ready = True
        log.info("ready: %s on %s", state.base.model_id, state.base.device)
    except Exception as e:  # reported by /health/ready and every request
        log.exception("model loading failed")
        state.load_error = f"{e.__class__.__name__}: {e}"


def create_app(settings: Settings) -> FastAPI:
    if settings.keep_freed_memory:
        keep_freed_memory()  # before any thread allocates: one arena for all (adapters.memory)
    state = AppState(
        settings=settings,
        store=AdapterStore(settings.data_dir / "adapters"),
        registry=AdapterRegistry(host_bytes=settings.host_adapter_bytes),
        api_keys=load_api_keys(settings.api_keys_file),
        jobs=JobStore(settings.data_dir / "jobs.db"),
    )
    state.metrics.bind_jobs(state.jobs.count_by_status)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = threading.Thread(target=start_engine, args=(state,), name="loraplex-loader", daemon=True)
        loader.start()
        from server.api_jobs import register_trained

        state.runner = JobRunner(
            state.jobs,
            RunnerConfig(settings.data_dir, settings.max_concurrent_jobs, settings.training_threads,
                         nice=settings.training_nice, stop_timeout=settings.drain_timeout),
            model_path=lambda: state.base.path if state.ready else None,
            register=lambda job, adapter_dir: register_trained(state, job, adapter_dir),
        )
        state.runner.start()
        yield
        state.draining = True
        if state.async_engine:
            state.async_engine.draining = True
        await state.runner.stop()
        loader.join()
        if state.engine:
            state.engine.stop()
        state.jobs.close()

    app = FastAPI(title="loraplex", lifespan=lifespan)
    app.state.loraplex = state
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, default=settings.max_request_bytes,
                       per_path={"/v1/adapters": settings.max_upload_bytes,
                                 "/v1/files": settings.max_training_file_bytes})
    from server import api, api_adapters, api_jobs  # the routes reach the state through the app

    app.include_router(api.router)
    app.include_router(api_adapters.router)
    app.include_router(api_jobs.router)
    return app
