"""The HTTP ingress of the Ray Serve application: the single-process app's routes, with no model behind them.

`Ingress` is a Serve deployment whose ASGI app is `server.http.app.build_app` (the routes, errors, auth and limits of
`loraplex serve`), started by `start_ingress` instead of a model load: it asks an engine replica for the model's card
(id, tokenizer, context length, adaptable layers), then builds the shared catalog over the store
(`server.ray.catalog`) and the OpenAI layer over `RemoteEngine` (`server.ray.routing`). So the ingress parses and
checks every request (chat template, tokens, context length, unknown adapters: 404) and validates every upload, and
the engine replicas only generate. Training jobs are supervised here and run as Ray tasks (`server.ray.jobs`).
Every response carries `x-loraplex-replica`: the engine replica that generated it, else `ingress:<this replica>`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import MutableHeaders

from server.http.app import build_app
from server.http.openai import OpenAIServing
from server.http.state import AppState
from server.ray.catalog import SharedCatalog
from server.ray.jobs import RayLauncher
from server.ray.routing import SERVED_BY, RemoteEngine
from server.ray.store import SharedStore
from server.settings import Settings

log = logging.getLogger(__name__)
REPLICA_HEADER = "x-loraplex-replica"


def start_ingress(state: AppState, engine: RemoteEngine, timeout: float = 600.0) -> None:
    """Fill in the model side of the ingress's state from an engine replica (runs in the start-up thread)."""
    s = state.settings
    try:
        deadline = time.monotonic() + timeout
        while True:  # Serve starts the ingress with the engine replicas: the first may still be loading
            try:
                # on the ingress's event loop: with Serve's router there (RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0,
                # part of RAY_SERVE_THROUGHPUT_OPTIMIZED) a call waited on from this thread would never be sent
                call = asyncio.wait_for(engine.describe(), 30)
                card = asyncio.run_coroutine_threadsafe(call, state.loop).result()
                break
            except Exception as e:
                if time.monotonic() > deadline or state.draining:
                    raise
                log.info("waiting for an engine replica (%s)", e.__class__.__name__)
                time.sleep(1)
        catalog = SharedCatalog(state.store, card.model_id, card.layer_shapes, card.max_rank)
        if s.adapter_dir:
            asyncio.run(catalog.import_directory(s.adapter_dir))
        engine.on_retry = state.metrics.replica_retries.inc
        state.base, state.catalog, state.engine = card, catalog, engine
        state.serving = OpenAIServing(card, engine, catalog, card.max_model_len, state.metrics)
        state.ready = True
        log.info("ingress ready: %s", card.model_id)
    except Exception as e:  # reported by /health/ready and every request
        log.exception("the ingress could not reach an engine replica")
        state.load_error = f"{e.__class__.__name__}: {e}"


class ReplicaHeader:
    """ASGI middleware: `x-loraplex-replica` on every response (the engine replica that served it, else `default`)."""

    def __init__(self, app, default: str):
        self.app, self.default = app, default

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        served: list[str] = []
        token = SERVED_BY.set(served)

        async def send_with_replica(message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REPLICA_HEADER] = served[-1] if served else self.default
            await send(message)

        try:
            await self.app(scope, receive, send_with_replica)
        finally:
            SERVED_BY.reset(token)


@serve.ingress()
class Ingress:
    """The ingress deployment (`server.ray.app` gives it its Serve options)."""

    def __init__(self, settings: Settings, store_uri: str, engine: DeploymentHandle):
        self.settings, self.store_uri, self.engine = settings, store_uri, engine

    def __serve_build_asgi_app__(self) -> FastAPI:
        s = self.settings
        remote = RemoteEngine(self.engine, s.max_waiting, s.adapter_affinity)
        store = SharedStore(self.store_uri, s.model_cache_dir / "store")
        app = build_app(s, partial(start_ingress, engine=remote), store, RayLauncher(s.job_num_cpus, s.job_num_gpus))
        app.add_middleware(ReplicaHeader, default="ingress:" + serve.get_replica_context().replica_id.unique_id)
        return app
