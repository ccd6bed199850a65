"""The cluster's one adapter catalog: the shared store itself, read afresh at every lookup.

The ingress keeps no list of which adapters exist: a lookup reads the store, so an upload is visible to every
request once it returns, an overwrite's new version id is what the next request resolves (and routes by), and a
deleted name is a 404 at once. Writes go through `server.catalog.AdapterCatalog` unchanged, with the same validation
as a single-process upload (every problem at once) before the store; `StoreIndex` stands in for its host registry,
since the ingress holds no weights (the replicas load them by version id, `server.ray.replica`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from adapters.archive import pack_adapter_archive
from adapters.names import is_valid_name
from adapters.peft_io import CONFIG_NAME, AdapterError, LoraWeights
from adapters.tiers.registry import Adapter, AdapterNotFound
from server.catalog import AdapterCatalog
from server.ray.store import SharedStore, StoredVersion, digest_of
from server.tenants import OPERATOR, Tenant

log = logging.getLogger(__name__)


@dataclass(eq=False)
class CatalogEntry(Adapter):
    """An adapter version as the ingress sees it: its metadata and version id, no weights."""

    stored: StoredVersion | None = None

    @property
    def version_id(self) -> str:
        return self.stored.version_id


def _entry(stored: StoredVersion) -> CatalogEntry:
    return CatalogEntry(name=stored.name, key=0, version=stored.version, rank=stored.rank, alpha=stored.alpha,
                        target_modules=stored.target_modules, weights=None, sha256=stored.sha256,
                        size_bytes=stored.size_bytes, created_at=stored.created_at, owner=stored.owner,
                        public=stored.public, stored=stored)  # fmt: skip


class StoreIndex:
    """The registry face of the shared store, for `AdapterCatalog`: names → their current versions."""

    def __init__(self, store: SharedStore):
        self.store = store

    def get(self, name: str) -> CatalogEntry:
        stored = self.store.current(name) if is_valid_name(name) else None
        if stored is None:
            raise AdapterNotFound(name)
        return _entry(stored)

    def list(self) -> list[CatalogEntry]:
        return [_entry(s) for s in self.store.list()]

    def __len__(self) -> int:
        return len(self.store.list())

    def __contains__(self, name: str) -> bool:
        return is_valid_name(name) and self.store.current(name) is not None

    def next_version(self, name: str) -> int:
        return max(self.store.versions(name), default=0) + 1

    def add(self, name: str, weights: LoraWeights, *, version: int, **stored_as) -> CatalogEntry:
        """The version `AdapterCatalog.add` has just stored."""
        stored = self.store.get(name, version)
        if stored is None:
            raise AdapterNotFound(name)
        return _entry(stored)

    def remove(self, name: str) -> CatalogEntry:
        """The current version of `name` (AdapterNotFound if none); the catalog then deletes it from the store."""
        return self.get(name)

    def weights_of(self, adapter: Adapter) -> None:
        return None  # the ingress holds no weights


class SharedCatalog(AdapterCatalog):
    """`AdapterCatalog` over the shared store: what the ingress validates, writes, lists and resolves."""

    def __init__(self, store: SharedStore, base_model_id: str, layer_shapes: dict[str, tuple[int, int]], max_rank: int):
        super().__init__(store, StoreIndex(store), base_model_id, layer_shapes, max_rank, on_retire=lambda: None)

    async def lookup(self, name: str, tenant: Tenant = OPERATOR) -> CatalogEntry:
        if self.store.is_local:
            return self.get(name, tenant)
        return await asyncio.to_thread(self.get, name, tenant)  # a round trip to the object store: off the event loop

    async def publish(self, name: str, public: bool, tenant: Tenant = OPERATOR) -> CatalogEntry:
        async with self._locks.setdefault(name, asyncio.Lock()):
            adapter = self.get_owned(name, tenant)
            await asyncio.to_thread(self.store.set_public, adapter.stored, public)
            adapter.public = public
            return adapter

    async def weights(self, adapter: Adapter) -> None:
        return None

    async def archive(self, adapter: CatalogEntry) -> bytes:
        def pack() -> bytes:
            return pack_adapter_archive(self.store.local_copy(adapter.stored), adapter.name)

        return await asyncio.to_thread(pack)

    async def import_directory(self, directory: Path) -> None:
        """Store every subdirectory of `directory` holding a PEFT adapter under its name (`--adapter-dir`), unless
        the store already holds those very files; invalid ones are logged and skipped."""
        for sub in sorted(p for p in directory.iterdir() if p.is_dir() and (p / CONFIG_NAME).exists()):
            if not is_valid_name(sub.name):
                log.error("skipping adapter directory %s: not a valid adapter name", sub.name)
                continue
            current = await asyncio.to_thread(self.store.current, sub.name)
            try:
                if current is None or current.digest != await asyncio.to_thread(digest_of, sub):
                    await self.add_copy(sub.name, sub, overwrite=True)
            except (AdapterError, OSError) as e:
                log.error("skipping adapter %s: %s", sub.name, e)
