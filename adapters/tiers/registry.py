"""The adapter registry: every servable adapter by name, with versions, and the host tier.

Thread-safe (HTTP handlers add and remove while the engine thread reads). Each registered
version gets a unique integer `key`; a request holds on to the `Adapter` (and its weights) it
resolved, so an overwrite or delete never changes what a running request computes, and the
device pool frees a retired version's pages once its last request has finished.

Host tier: the LoRA weights of registered adapters are kept in RAM up to `host_bytes`, least
recently used first out; an evicted adapter is read again from its directory on disk when a
request needs it (`weights_of`), so thousands of adapters can be registered in bounded memory.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from adapters.peft_io import LoraWeights, load_peft_adapter


class AdapterExists(KeyError):
    """A name that is already registered, without overwrite."""


class AdapterNotFound(KeyError):
    """A name that is not registered."""


@dataclass(eq=False)
class Adapter:
    """One registered version of an adapter."""

    name: str
    key: int
    version: int
    rank: int
    alpha: float
    target_modules: list[str]
    weights: LoraWeights | None  # None while evicted from the host tier
    path: Path | None = None  # where the PEFT files are, to reload after eviction
    sha256: str | None = None
    size_bytes: int = 0
    created_at: int = field(default_factory=lambda: int(time.time()))
    retired: bool = False  # replaced or deleted: no new request may use it
    owner: str | None = None  # the tenant that created it; None: the operator's (--adapter-dir, older stores)
    public: bool = False  # usable and listed by every tenant, not only its owner


class AdapterRegistry:
    """name → current Adapter version, with the host-memory LRU of their weights."""

    def __init__(self, host_bytes: int | None = None, loader: Callable[[Path], LoraWeights] = load_peft_adapter):
        self._lock = threading.Lock()
        self._by_name: dict[str, Adapter] = {}
        self._keys = itertools.count(1)
        self.host_bytes = host_bytes
        self._loader = loader
        self._resident: OrderedDict[int, Adapter] = OrderedDict()  # host tier, LRU order
        self._resident_bytes = 0
        self.host_loads = 0
        self.host_evictions = 0

    def add(self, name: str, weights: LoraWeights, *, overwrite: bool = False, path: Path | None = None,
            sha256: str | None = None, size_bytes: int = 0, version: int | None = None, owner: str | None = None,
            public: bool = False) -> Adapter:  # fmt: skip
        with self._lock:
            old = self._by_name.get(name)
            if old is not None and not overwrite:
                raise AdapterExists(name)
            adapter = Adapter(
                name=name,
                key=next(self._keys),
                version=version or (old.version + 1 if old else 1),
                rank=weights.rank,
                alpha=weights.alpha,
                target_modules=weights.target_modules,
                weights=weights,
                path=path,
                sha256=sha256,
                size_bytes=size_bytes or weights.nbytes,
                owner=owner,
                public=public,
            )
            self._by_name[name] = adapter
            if old is not None:
                self._retire(old)
            self._hold(adapter)
            return adapter

    def add_stored(self, name: str, version: int, rank: int, alpha: float, target_modules: list[str], *, path: Path,
                   sha256: str | None, size_bytes: int, created_at: int, owner: str | None = None,
                   public: bool = False) -> Adapter:
        """Register an adapter whose weights stay on disk until a request needs them."""
        with self._lock:
            if name in self._by_name:
                raise AdapterExists(name)
            adapter = Adapter(name=name, key=next(self._keys), version=version, rank=rank, alpha=alpha,
                              target_modules=target_modules, weights=None, path=path, sha256=sha256,
                              size_bytes=size_bytes, created_at=created_at, owner=owner, public=public)
            self._by_name[name] = adapter
            return adapter

    def next_version(self, name: str) -> int:
        with self._lock:
            old = self._by_name.get(name)
            return old.version + 1 if old else 1

    def get(self, name: str) -> Adapter:
        with self._lock:
            try:
                return self._by_name[name]
            except KeyError:
                raise AdapterNotFound(name) from None

    def remove(self, name: str) -> Adapter:
        with self._lock:
            try:
                adapter = self._by_name.pop(name)
            except KeyError:
                raise AdapterNotFound(name) from None
            self._retire(adapter)
            return adapter

    def list(self) -> list[Adapter]:
        with self._lock:
            return sorted(self._by_name.values(), key=lambda a: a.name)

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._by_name

    @property
    def resident_bytes(self) -> int:
        return self._resident_bytes

    def weights_of(self, adapter: Adapter) -> LoraWeights:
        """The adapter's weights, read from disk if the host tier evicted them (blocking I/O)."""
        with self._lock:
            w = adapter.weights
            if w is not None:
                if adapter.key in self._resident:
                    self._resident.move_to_end(adapter.key)
                return w
        if adapter.path is None:
            raise AdapterNotFound(adapter.name)
        w = self._loader(adapter.path)
        with self._lock:
            self.host_loads += 1
            if adapter.weights is None:
                adapter.weights = w
                if not adapter.retired:
                    self._hold(adapter)
            return adapter.weights

    # ---- host tier (called with the lock held) -----------------------------------------------

    def _hold(self, adapter: Adapter) -> None:
        self._resident[adapter.key] = adapter
        self._resident_bytes += adapter.weights.nbytes
        if self.host_bytes is None:
            return
        for key in list(self._resident):
            if self._resident_bytes <= self.host_bytes:
                break
            victim = self._resident[key]
            if victim is adapter or victim.path is None:
                continue
            self._drop(victim)
            self.host_evictions += 1

    def _drop(self, adapter: Adapter) -> None:
        if self._resident.pop(adapter.key, None) is not None:
            self._resident_bytes -= adapter.weights.nbytes
        adapter.weights = None if adapter.path is not None else adapter.weights

    def _retire(self, adapter: Adapter) -> None:
        adapter.retired = True
        if self._resident.pop(adapter.key, None) is not None:
            self._resident_bytes -= adapter.weights.nbytes
