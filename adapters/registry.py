"""The adapter registry: every servable adapter by name, with versions.

Thread-safe (HTTP handlers add and remove while the engine thread reads). Each registered
version gets a unique integer `key`; a request holds on to the `Adapter` it resolved, so an
overwrite or delete never changes what a running request computes, and the device pool frees a
retired version's rows once its last request has finished.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field

from adapters.peft_io import LoraWeights


class AdapterExists(KeyError):
    """A name that is already registered, without overwrite."""


class AdapterNotFound(KeyError):
    """A name that is not registered."""


@dataclass(eq=False)
class Adapter:
    """One registered version of an adapter."""

    name: str
    key: int
    weights: LoraWeights
    version: int
    created_at: int = field(default_factory=lambda: int(time.time()))
    sha256: str | None = None
    size_bytes: int = 0
    retired: bool = False  # replaced or deleted: no new request may use it


class AdapterRegistry:
    """name → current Adapter version."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_name: dict[str, Adapter] = {}
        self._keys = itertools.count(1)

    def add(self, name: str, weights: LoraWeights, *, overwrite: bool = False, sha256: str | None = None, size_bytes: int = 0) -> Adapter:
        with self._lock:
            old = self._by_name.get(name)
            if old is not None and not overwrite:
                raise AdapterExists(name)
            adapter = Adapter(
                name=name,
                key=next(self._keys),
                weights=weights,
                version=old.version + 1 if old else 1,
                sha256=sha256,
                size_bytes=size_bytes or weights.nbytes,
            )
            self._by_name[name] = adapter
            if old is not None:
                old.retired = True
            return adapter

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
            adapter.retired = True
            return adapter

    def list(self) -> list[Adapter]:
        with self._lock:
            return sorted(self._by_name.values(), key=lambda a: a.name)

    def __len__(self) -> int:
        return len(self._by_name)
