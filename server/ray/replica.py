"""An engine replica of the Ray Serve application: one base model, one engine loop, adapters loaded from the store.

The constructor loads the model, builds and warms the engine and starts its loop before Serve counts the replica as
running, so a replica still loading gets no traffic; `check_health` reports the engine loop. Each `generate` call is
one HTTP request's choices, which join the engine's running batch whatever their adapters (no `@serve.batch`: it
would split batches by model id). Adapters are named by version id (`server.ray.store`). A request's multiplexed
model id is its adapter's version id, or the id of its set for a composition (`set_id`); `@serve.multiplexed` keeps as
many of them loaded as the replica's LoRA pool holds and reports which it holds, so a request goes to a replica
that has its adapter (Ray Serve LLM routes multi-LoRA requests the same way; `server.ray.routing.AdapterAffinityRouter`
also remembers where it placed an adapter until the replica's report arrives).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from ray import serve

from adapters.peft_io import load_peft_adapter
from adapters.tiers.registry import AdapterNotFound, AdapterRegistry
from server.engine.async_engine import AsyncEngine, Overloaded
from server.engine.config import CpuConfig, EngineConfig
from server.engine.engine import Engine
from server.engine.model import BaseModel, load_base_model, pick_device
from server.engine.platform import configure_process
from server.engine.request import AdapterUse, RequestOutput
from server.engine.sampling import SamplingParams
from server.engine.threads import in_thread, run_in_thread
from server.http.engine_client import LocalEngine
from server.ray.store import SharedStore, parse_version_id
from server.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterRef:
    """An adapter version a request applies, and its weight (what the ingress sends instead of weights)."""

    version_id: str
    weight: float = 1.0


def set_id(refs: list[AdapterRef]) -> str:
    """The multiplexed model id of a request's adapters: "" for none (any replica), the version id of one adapter at
    weight 1, else the id of the weighted set (the same set always routes alike)."""
    if not refs:
        return ""
    if len(refs) == 1 and refs[0].weight == 1.0:
        return refs[0].version_id
    key = "+".join(f"{r.version_id}*{r.weight!r}" for r in refs)
    return "set:" + hashlib.sha256(key.encode()).hexdigest()[:24]


@dataclass
class Started:
    """The first message of every `generate` stream: which replica took the request, and whether it already held
    the request's adapters."""

    replica: str
    hit: bool


@dataclass
class Refused:
    """The replica cannot take the request: `status` 503 (overloaded) or 404 (an adapter version is gone)."""

    status: int
    message: str
    name: str | None = None


@dataclass
class ModelCard:
    """What the ingress needs to know of the model, without loading it."""

    model_id: str
    tokenizer: object
    max_model_len: int
    layer_shapes: dict[str, tuple[int, int]]
    max_rank: int
    path: str


class AdapterGone(LookupError):
    """A version the request resolved is no longer in the store (deleted, or replaced twice since)."""


class ReplicaAdapters:
    """The adapter versions this replica has loaded: their host weights by version id (`AdapterRegistry`, with its
    host-memory budget), pinned while a multiplexed id that uses them is loaded."""

    def __init__(self, store: SharedStore, registry: AdapterRegistry, engine: Engine):
        self.store, self.registry, self.engine = store, registry, engine
        self._pins: dict[str, int] = {}
        self._loading: dict[str, asyncio.Lock] = {}

    def holds(self, version_ids: list[str]) -> bool:
        return all(v in self.registry for v in version_ids)

    async def ensure(self, version_ids: list[str]) -> None:
        """Load every version not loaded yet from the shared store (AdapterGone if one is not there)."""
        for vid in version_ids:
            async with self._loading.setdefault(vid, asyncio.Lock()):
                if vid not in self.registry:
                    await in_thread(self._load, vid)
            self._loading.pop(vid, None)

    def _load(self, version_id: str) -> None:
        name, version, digest = parse_version_id(version_id)
        stored = self.store.get(name, version)
        if stored is None or stored.digest != digest:
            raise AdapterGone(name)
        path = self.store.local_copy(stored)
        weights = self.engine.pool.prepare(load_peft_adapter(path))  # validated when it was uploaded
        self.registry.add(version_id, weights, path=path, sha256=stored.sha256, size_bytes=stored.size_bytes,
                          version=version)  # fmt: skip

    def pin(self, version_ids: list[str]) -> None:
        for vid in version_ids:
            self._pins[vid] = self._pins.get(vid, 0) + 1

    def release(self, version_ids: list[str]) -> None:
        """A multiplexed id was unloaded: versions no loaded id uses any more are retired (their pool pages are
        freed once no running request uses them)."""
        for vid in version_ids:
            self._pins[vid] -= 1
            if self._pins[vid] == 0:
                del self._pins[vid]
                try:
                    self.registry.remove(vid)
                except AdapterNotFound:
                    pass
        self.engine.drop_retired()

    async def uses(self, refs: list[AdapterRef]) -> list[AdapterUse]:
        await self.ensure([r.version_id for r in refs])  # a version unloaded meanwhile comes back
        out = []
        for r in refs:
            adapter = self.registry.get(r.version_id)
            weights = adapter.weights if adapter.weights is not None else await in_thread(self.registry.weights_of, adapter)
            out.append(AdapterUse(adapter, r.weight, weights))
        return out


class _LoadedSet:
    """What `@serve.multiplexed` keeps for one model id; Serve calls `__del__` when its LRU unloads it."""

    def __init__(self, adapters: ReplicaAdapters, version_ids: list[str]):
        self.adapters, self.version_ids, self.released = adapters, version_ids, False
        adapters.pin(version_ids)

    def __del__(self) -> None:
        if not self.released:
            self.released = True
            self.adapters.release(self.version_ids)


class EngineReplica:
    """The engine deployment (`server.ray.app` gives it its Serve options)."""

    def __init__(self, settings: Settings, store_uri: str, capacity: int):
        """`capacity`: how many multiplexed ids (adapters or adapter sets) this replica keeps loaded."""
        configure_process(settings.section(CpuConfig), pick_device(settings.device))
        s = settings
        # the torch work of start-up in a thread that ends with it (`server.engine.threads`): Serve's thread that
        # runs this constructor lives on, and an OpenMP team left with it would slow every decode step
        self.base, self.engine = run_in_thread(self._build_engine, s)
        engine = self.engine
        self.max_rank = s.max_lora_rank
        prepare = engine.pool.prepare
        registry = AdapterRegistry(host_bytes=s.host_adapter_bytes, loader=lambda path: prepare(load_peft_adapter(path)))
        self.adapters = ReplicaAdapters(SharedStore(store_uri, s.model_cache_dir / "store"), registry, engine)
        engine.start()
        self.client = LocalEngine(AsyncEngine(engine, s.max_waiting))
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._sets: dict[str, list[str]] = {}

        async def load(model_id: str) -> _LoadedSet:
            version_ids = self._sets.pop(model_id, None) or [model_id]
            await self.adapters.ensure(version_ids)
            return _LoadedSet(self.adapters, version_ids)

        self._load = serve.multiplexed(max_num_models_per_replica=capacity)(load)
        log.info("engine replica %s ready: %s on %s", self.replica, self.base.model_id, self.base.device)

    @staticmethod
    def _build_engine(s: Settings) -> tuple[BaseModel, Engine]:
        """The model loaded, its engine built and warmed (every compiled graph made)."""
        base = load_base_model(s.model, cache_dir=s.model_cache_dir, device=s.device, dtype=s.dtype,
                               max_model_len=s.max_model_len)  # fmt: skip
        engine = Engine(base, s.section(EngineConfig))
        engine.warmup()
        return base, engine

    def describe(self) -> ModelCard:
        return ModelCard(self.base.model_id, self.base.tokenizer, self.engine.max_len, self.engine.layer_shapes(),
                         self.max_rank, str(Path(self.base.path).resolve()) if Path(self.base.path).exists()
                         else self.base.path)  # fmt: skip

    def stats(self) -> dict:
        pool = self.engine.pool
        return {"replica": self.replica, "running": self.engine.num_running, "waiting": self.engine.num_waiting,
                "adapters_resident": pool.resident_count(), "adapter_loads": pool.loads,
                "tokens_generated": self.engine.tokens_generated}  # fmt: skip

    def check_health(self) -> None:
        if not self.engine.alive:
            raise RuntimeError("the engine loop stopped")

    async def generate(self, prompts: list[list[int]], params: list[SamplingParams], refs: list[AdapterRef]):
        """One request's choices: `Started`, then (choice, RequestOutput) as they come; or `Refused`."""
        model_id = serve.get_multiplexed_model_id()
        version_ids = [r.version_id for r in refs]
        hit = self.adapters.holds(version_ids)
        try:
            if model_id:
                self._sets[model_id] = version_ids
                await self._load(model_id)
            uses = await self.adapters.uses(refs)
        except AdapterGone as e:
            yield Refused(404, f"The adapter '{e.args[0]}' does not exist.", e.args[0])
            return
        yield Started(self.replica, hit)
        try:
            async for item in self.client.run(prompts, params, uses):
                yield item
        except Overloaded as e:
            yield Refused(503, str(e))

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()


def failed_outputs(choices: list[int], message: str) -> list[tuple[int, RequestOutput]]:
    """An ending (finish_reason "abort", with `message`) for each of `choices` whose replica failed."""
    return [(i, RequestOutput("", "", [], None, "abort", 0, 0, message)) for i in choices]
