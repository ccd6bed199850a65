"""Prometheus metrics of one app (its own registry, so tests can build many apps)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from server.jobs.store import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED

# beyond this many distinct adapter names the `adapter` label folds into "other"
MAX_ADAPTER_LABELS = 100
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("loraplex_requests", "Finished generation requests", ["endpoint", "status"], registry=r)
        self.adapter_requests = Counter("loraplex_adapter_requests", "Generation requests by adapter", ["adapter"], registry=r)
        self.prompt_tokens = Counter("loraplex_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("loraplex_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("loraplex_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("loraplex_inter_token_latency_seconds", "Time between tokens", buckets=_LATENCY_BUCKETS, registry=r)
        self.waiting = Gauge("loraplex_queue_depth", "Requests waiting for a batch row", registry=r)
        self.running = Gauge("loraplex_running_requests", "Sequences in the running batch", registry=r)
        self.adapters_registered = Gauge("loraplex_adapters_registered", "Adapters registered", registry=r)
        self.adapters_resident = Gauge("loraplex_adapters_loaded", "Adapters resident in the device LoRA pool", registry=r)
        self.adapter_loads = Gauge("loraplex_adapter_loads_total", "Adapter loads into the device pool", registry=r)
        self.adapter_evictions = Gauge("loraplex_adapter_evictions_total", "Adapter evictions from the device pool", registry=r)
        self.merged = Gauge("loraplex_adapter_merged", "1 while an adapter is merged into the base weights", registry=r)
        self.merges = Gauge("loraplex_adapter_merges_total", "Automatic merges of a dominant adapter", registry=r)
        self.unmerges = Gauge("loraplex_adapter_unmerges_total", "Automatic unmerges", registry=r)
        self.jobs = Gauge("loraplex_training_jobs", "Training jobs by status", ["status"], registry=r)
        self.replica_retries = Counter("loraplex_replica_retries", "Requests sent again to another engine replica "
                                       "(Ray Serve) after theirs stopped before the first token", registry=r)
        self.kv_cache_rows = Gauge("loraplex_kv_cache_rows", "KV-cache rows: sequences decoded together at most", registry=r)
        self.lora_pool_pages = Gauge("loraplex_lora_pool_pages", "Pages of the device LoRA pool", registry=r)
        self.prefix_queried = Gauge("loraplex_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache",
                                    registry=r)  # fmt: skip
        self.prefix_hits = Gauge("loraplex_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache",
                                 registry=r)  # fmt: skip
        self.prefix_blocks = Gauge("loraplex_prefix_cache_blocks", "Blocks held by the prefix cache", registry=r)
        self._labels: set[str] = set()

    def adapter_label(self, name: str) -> str:
        if name in self._labels or len(self._labels) < MAX_ADAPTER_LABELS:
            self._labels.add(name)
            return name
        return "other"

    def bind_jobs(self, counts: Callable[[], dict[str, int]]) -> None:
        """Read the training jobs by status from the job store at scrape time."""
        for status in (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED):
            self.jobs.labels(status=status).set_function(lambda s=status: counts().get(s, 0))

    def bind(self, **sources: Callable[[], float]) -> None:
        """Read gauges from live objects at scrape time: bind(waiting=lambda: engine.num_waiting, ...)."""
        for name, fn in sources.items():
            getattr(self, name).set_function(fn)
