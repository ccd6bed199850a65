"""`create_app(settings)`: the FastAPI app, with no import-time singletons (`build_app`: the same app around another
start-up, as the Ray Serve ingress builds it).

The process listens at once; a start-up thread loads the base model, builds and warms the engine and the adapter
catalog (`/health/ready` says 503 until then). SIGTERM drains (`server.http.drain`, when served by `loraplex
serve`): new requests get 503 at once, running ones finish until `drain_timeout`, training workers checkpoint,
then the engine stops. Every request passes, outermost first: `InternalErrors` (a 500 that keeps the connection),
`AllowedHosts` (the Host header), `BodySizeLimit` (413), then the routes, whose API key is checked before their
body is read (`server.http.auth`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from adapters.peft_io import load_peft_adapter
from adapters.tiers.registry import AdapterRegistry
from adapters.tiers.store import AdapterStore
from server.catalog import AdapterCatalog
from server.engine.async_engine import AsyncEngine
from server.engine.config import CpuConfig, EngineConfig
from server.engine.engine import Engine
from server.engine.model import load_base_model, pick_device
from server.engine.platform import configure_process
from server.http.auth import AllowedHosts, load_api_keys
from server.http.engine_client import LocalEngine
from server.http.errors import InternalErrors, install_error_handlers
from server.http.limits import BodySizeLimit
from server.http.openai import OpenAIServing
from server.http.routes import adapters, completions, files, health, jobs, models, ui
from server.http.state import AppState
from server.jobs.config import JobsConfig
from server.jobs.service import JobService
from server.jobs.store import JobStore
from server.jobs.supervisor import ProcessLauncher
from server.settings import Settings

log = logging.getLogger(__name__)


def start_engine(state: AppState) -> None:
    """Load the model, build and warm the engine, the catalog and the OpenAI layer (runs in a thread). Each phase
    (converting, loading, compiling with its progress, ready) is a log line and `/health/ready`'s `phase`; a failure
    is one log line saying why (the traceback at debug level), and `state.on_load_failure()` is called."""
    s, started = state.settings, time.monotonic()

    def enter(phase: str) -> None:
        state.phase = phase
        log.info("start-up: %s (%.0f s)", phase, time.monotonic() - started)

    try:
        state.base = base = load_base_model(s.model, cache_dir=s.model_cache_dir, device=s.device, dtype=s.dtype,
                                            max_model_len=s.max_model_len, on_phase=enter)  # fmt: skip
        state.engine = engine = Engine(base, s.section(EngineConfig))
        prepare = engine.pool.prepare  # the host tier keeps adapters as the device pool copies them
        state.registry = AdapterRegistry(host_bytes=s.host_adapter_bytes, loader=lambda path: prepare(
            load_peft_adapter(path)))  # a host-tier miss: read again from disk (validated when it arrived)
        catalog = AdapterCatalog(state.store, state.registry, base.model_id, engine.layer_shapes(), s.max_lora_rank,
                                 on_retire=engine.drop_retired, prepare=prepare)  # fmt: skip
        state.skipped = catalog.skipped  # /health/ready reports them
        catalog.register_stored()
        if s.adapter_dir:
            catalog.register_directory(s.adapter_dir)
        log.info("adapters: %d registered, %d skipped", len(state.registry), len(catalog.skipped))
        compile_log = CompileLog(time.monotonic())
        if s.lora_backend == "compiled" and s.compile_in_background:
            engine.warmup_in_background(compile_log)  # ready now, eagerly; compiled once the engine has been idle
        elif s.lora_backend == "compiled":
            enter("compiling")
            engine.warmup(compile_log)
        else:
            engine.warmup()
        engine.start()
        _bind_metrics(state, engine)
        m = state.metrics
        state.async_engine = AsyncEngine(engine, s.max_waiting, m.ttft.observe, m.itl.observe)
        state.serving = OpenAIServing(base, LocalEngine(state.async_engine), catalog, engine.max_len, m)
        state.catalog = catalog
        state.ready = True
        state.phase = "ready"
        log.info("ready in %.0f s: %s on %s, http://%s:%d%s", time.monotonic() - started, base.model_id, base.device,
                 s.host, s.port, " (compiling in the background, serving eagerly meanwhile)" if engine.compiling else "")
    except Exception as e:  # reported by /health/ready and every request
        state.load_error = " ".join(f"{e.__class__.__name__}: {e}".split())[:500]
        log.error("start-up failed while %s: %s", state.phase, state.load_error)
        state.phase = "failed"
        log.debug("start-up failure", exc_info=True)
        if state.on_load_failure is not None:
            state.on_load_failure()


class CompileLog:
    """The compile phase's progress callback: a log line per compiled graph (they take seconds to minutes each on a
    CPU), the last one with the total time."""

    def __init__(self, started: float):
        self.started, self.last = started, -1

    def __call__(self, done: int, total: int) -> None:
        if done == self.last:
            return
        self.last = done
        took = time.monotonic() - self.started
        if done >= total:
            log.info("compiled %d/%d graphs in %.0f s: serving compiled", done, total, took)
        else:
            log.info("compiling: %d/%d graphs (%.0f s)", done, total, took)


def _bind_metrics(state: AppState, engine: Engine) -> None:
    """The engine's gauges and totals, read at scrape time."""
    m, pool, rows = state.metrics, engine.pool, engine.config.max_num_seqs
    m.bind(waiting=lambda: engine.num_waiting, running=lambda: engine.num_running,
           adapters_registered=lambda: len(state.registry), adapters_resident=pool.resident_count,
           kv_cache_rows=lambda: rows, kv_cache_usage=lambda: engine.num_running / rows,
           lora_pool_pages=lambda: engine.config.lora_pages,
           lora_pool_usage=lambda: pool.used_pages() / engine.config.lora_pages)  # fmt: skip
    m.bind_totals(adapter_loads=lambda: pool.loads, adapter_evictions=lambda: pool.evictions)
    if (prefix := engine.prefix) is not None:
        m.bind(prefix_blocks=lambda: len(prefix))
        m.bind_totals(prefix_cache_queried_tokens=lambda: prefix.queried_tokens,
                      prefix_cache_hit_tokens=lambda: prefix.hit_tokens)  # fmt: skip
    if merger := engine.merger:
        m.bind(merged=lambda: merger.merged is not None)
        m.bind_totals(adapter_merges=lambda: merger.merges, adapter_unmerges=lambda: merger.unmerges)
        m.live.merged_adapter = lambda: merger.merged.name if merger.merged is not None else None


def create_app(settings: Settings) -> FastAPI:
    # process-wide CPU policies, before any thread allocates (server.engine.platform)
    configure_process(settings.section(CpuConfig), pick_device(settings.device))
    return build_app(settings, start_engine, AdapterStore(settings.data_dir / "adapters"))


def build_app(settings: Settings, start: Callable[[AppState], None], store: AdapterStore,
              launcher: ProcessLauncher | None = None) -> FastAPI:  # fmt: skip
    """The app around `start(state)`, which fills in the model side of `state` in a start-up thread: `start_engine`
    loads the model in this process; the ingress of a Ray Serve application reaches engine replicas instead
    (`server.ray.ingress`, with its shared store and a launcher of training jobs as Ray tasks)."""
    jobs_db = JobStore(settings.data_dir / "jobs.db", settings.jobs_db_synchronous)
    job_service = JobService(
        jobs_db, settings.data_dir, settings.section(JobsConfig), settings.drain_timeout,
        model_path=lambda: state.base.path if state.ready else None, catalog=lambda: state.catalog, launcher=launcher,
    )  # fmt: skip
    state = AppState(
        settings=settings,
        store=store,
        jobs=jobs_db,
        job_service=job_service,
        api_keys=load_api_keys(settings.api_keys_file),
    )
    state.metrics.bind_jobs(jobs_db.count_by_status, lambda: jobs_db.list_jobs("running"))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.loop = asyncio.get_running_loop()
        loader = threading.Thread(target=start, args=(state,), name="loraplex-loader", daemon=True)
        loader.start()
        job_service.supervisor.start()
        yield
        state.draining = True
        if state.async_engine:
            state.async_engine.draining = True
        await job_service.supervisor.stop()
        loader.join()
        if state.engine:
            state.engine.stop()
        jobs_db.close()

    # the docs routes are served by routes.health, behind the docs_access setting
    app = FastAPI(title="loraplex", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.loraplex = state
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, default=settings.max_request_bytes,
                       per_path={"/v1/adapters": settings.max_upload_bytes,
                                 "/v1/files": settings.max_training_file_bytes})  # fmt: skip
    app.add_middleware(AllowedHosts, allowed_hosts=settings.trusted_hosts())
    app.add_middleware(InternalErrors)  # outermost of ours: after it only Starlette's ServerErrorMiddleware
    for routes in (health, models, completions, adapters, files, jobs):
        app.include_router(routes.router)
    ui.install(app)
    return app
