"""The Ray Serve application: an ingress deployment (no model) in front of N engine replicas, one shared store.

- `build_app(settings)`: the application, every Serve option made from the settings.
- `build(args)`: the same for `serve run server.ray.app:build replicas=2 model=...` and the `import_path` of a Serve
  config file (`server/ray/serve.yaml`); `args` are settings by name, the `LORAPLEX_*` environment applies too.
- `start(settings)` / `run(settings)`: what `loraplex serve --replicas N` does: join the cluster in `RAY_ADDRESS`, or
  start a local single-node Ray instance (stopped on exit; Ray's token authentication on, as Ray starts local
  instances), and serve the application on `--host`/`--port` (127.0.0.1 by default).

`max_ongoing_requests` of an engine replica is what its engine takes: its running batch plus its queue (not Serve's
default of 5). The multiplexed capacity of a replica (`@serve.multiplexed`) is what its LoRA pool holds at
`max_lora_rank`; requests reach the replicas through `server.ray.routing.AdapterAffinityRouter`.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import ray
from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from server.engine.model import DEFAULT_MODEL_ID
from server.ray.ingress import Ingress
from server.ray.replica import EngineReplica
from server.ray.routing import AdapterAffinityRouter
from server.settings import Settings

log = logging.getLogger(__name__)
APP_NAME = "loraplex"
SERVE_THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
"""Ray Serve's throughput-optimized mode (`ClusterConfig.serve_throughput_optimized`), less its direct ingress."""


def store_uri(settings: Settings) -> str:
    """The shared adapter store: `adapter_store`, else `<data_dir>/adapters` (where `loraplex serve` keeps them)."""
    return settings.adapter_store or str(settings.data_dir / "adapters")


def replica_capacity(settings: Settings) -> int:
    """Adapters (or adapter sets) a replica keeps loaded for routing: its LoRA pool's pages at `max_lora_rank`."""
    if settings.max_adapters_per_replica:
        return settings.max_adapters_per_replica
    pages = -(-settings.max_lora_rank // settings.lora_page_size)
    return max(1, (settings.lora_pages - 1) // pages)


def resolved(settings: Settings) -> Settings:
    """`settings` with its paths absolute (replicas start in other working directories, on other nodes) and the
    default model converted once here rather than by every replica at the same time."""
    update: dict[str, Any] = {"data_dir": settings.data_dir.resolve()}
    for key in ("cache_dir", "adapter_dir", "api_keys_file"):
        if getattr(settings, key) is not None:
            update[key] = getattr(settings, key).resolve()
    if settings.model and Path(settings.model).exists():
        update["model"] = str(Path(settings.model).resolve())
    settings = settings.model_copy(update=update)
    if settings.model in (None, DEFAULT_MODEL_ID):
        from server.engine.model import prepare_default_model

        settings = settings.model_copy(update={"model": str(prepare_default_model(settings.model_cache_dir))})
    return settings


def engine_options(settings: Settings) -> dict[str, Any]:
    """The Serve options of the engine deployment."""
    s = settings
    options: dict[str, Any] = {
        "name": "LoraplexEngine", "max_ongoing_requests": s.max_num_seqs + s.max_waiting,  # its batch and its queue
        "ray_actor_options": {"num_cpus": s.replica_num_cpus, "num_gpus": s.replica_num_gpus},
        "graceful_shutdown_timeout_s": s.drain_timeout, "health_check_period_s": 2,
        "request_router_config": RequestRouterConfig(request_router_class=AdapterAffinityRouter),
    }  # fmt: skip
    if s.max_replicas is None:
        return options | {"num_replicas": s.replicas or 1}
    return options | {"autoscaling_config": {
        "min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
        "target_ongoing_requests": s.target_ongoing_requests or s.max_num_seqs,
    }}  # fmt: skip


def build_app(settings: Settings) -> Application:
    s = resolved(settings)
    uri = store_uri(s)
    engine = serve.deployment(EngineReplica, **engine_options(s)).bind(s, uri, replica_capacity(s))
    ingress = serve.deployment(
        Ingress, name="LoraplexIngress", num_replicas=1, max_ongoing_requests=100_000,
        ray_actor_options={"num_cpus": 0}, graceful_shutdown_timeout_s=s.drain_timeout,
    )  # fmt: skip
    return ingress.bind(s, uri, engine)


def build(args: dict[str, Any]) -> Application:
    """The application builder of `serve run` / `serve deploy`: `args` are settings by name."""
    return build_app(Settings(**args))


@dataclass
class Cluster:
    """A running application: its URL, and whether this process started the Ray instance under it."""

    url: str
    owns_ray: bool

    def stop(self) -> None:
        if self.owns_ray:
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete(APP_NAME)


def start(settings: Settings, timeout: float = 900.0, **ray_options: Any) -> Cluster:
    """Serve the application: on the cluster in RAY_ADDRESS, else on a local Ray instance that `Cluster.stop`
    stops; returns once every replica is ready and the ingress answers `/health/ready`."""
    owns = not os.environ.get("RAY_ADDRESS")
    if owns:
        declared = (settings.max_replicas or settings.replicas or 1) * settings.replica_num_cpus + settings.job_num_cpus
        ray_options = {"num_cpus": max(os.cpu_count() or 1, int(declared + 0.999)), "include_dashboard": False,
                       } | ray_options  # fmt: skip
        # Ray's processes, Serve's among them, inherit the variables; its workers (the engine replicas) run at
        # nice 0 like a single server's engine, not at Ray's default 15, below every other process of the machine
        variables = {"RAY_worker_niceness": "0"} | (SERVE_THROUGHPUT_ENV if settings.serve_throughput_optimized else {})
        with environment(variables):
            ray.init(address="local", **ray_options)
    else:
        ray.init(**ray_options)
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
        url = f"http://{settings.host}:{settings.port}"
        deadline = time.monotonic() + timeout
        while _ready_status(url) != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("the loraplex ingress did not become ready")
            time.sleep(0.2)
        return Cluster(url, owns)
    except BaseException:
        Cluster("", owns).stop()
        raise


@contextmanager
def environment(variables: dict[str, str]):
    """`variables` in this process's environment (those the user set win), as they were again afterwards."""
    added = {k: v for k, v in variables.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _ready_status(url: str) -> int:
    try:
        return httpx.get(f"{url}/health/ready", timeout=5).status_code
    except httpx.HTTPError:
        return 0


def run(settings: Settings) -> None:
    """`loraplex serve --replicas N`: serve until SIGINT or SIGTERM, then stop what was started."""
    cluster = start(settings)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs handlers of its own
        signal.signal(sig, lambda *_: stop.set())
    replicas = settings.replicas or f"{settings.min_replicas}-{settings.max_replicas}"
    print(f"loraplex: serving on {cluster.url} through Ray Serve ({replicas} engine replicas; Ray at "
          f"{ray.get_runtime_context().gcs_address})", flush=True)  # fmt: skip
    try:
        while not stop.wait(0.5):  # a signal may land on one of Ray's threads: the main thread must wake to see it
            pass
    finally:
        cluster.stop()
