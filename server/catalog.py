"""The adapter catalog: the one way adapters come and go — validate → store → register → retire.

Uploads, the `--adapter-dir` folder read at start-up and finished training jobs all pass through here, so a
trained adapter meets exactly an upload's checks. `add` validates a PEFT directory against the base model (every
problem reported at once, `adapters.peft_io`), writes it into the disk tier by one rename (`adapters.tiers.store`)
and registers it in the host tier (`adapters.tiers.registry`): it is servable when `add` returns. Writes to one
name are serialised, so concurrent uploads cannot leave a mixed state; running requests keep the version they
resolved (an overwrite or delete retires the old version, whose device pages the engine frees once unused).
Every version records the tenant that created it and whether it is published (`server.tenants`); only its owner
(or an admin) may replace it. A stored adapter that no longer reads or validates is skipped at start-up, logged and
listed in `skipped`, never fatal.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from adapters.archive import pack_adapter_archive
from adapters.names import is_valid_name, name_problem
from adapters.peft_io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterError,
    LoraWeights,
    describe_peft_adapter,
    load_peft_adapter,
)
from adapters.tiers.registry import Adapter, AdapterExists, AdapterNotFound, AdapterRegistry
from adapters.tiers.store import AdapterStore, file_sha256
from server.engine.threads import in_thread
from server.tenants import OPERATOR, Tenant

log = logging.getLogger(__name__)


class AdapterNotOwned(PermissionError):
    """An adapter of another tenant that this one may see but not change."""


class AdapterCatalog:
    """Every servable adapter of one base model, on disk and in memory."""

    def __init__(self, store: AdapterStore, registry: AdapterRegistry, base_model_id: str,
                 layer_shapes: dict[str, tuple[int, int]], max_rank: int, on_retire: Callable[[], None],
                 prepare: Callable[[LoraWeights], LoraWeights] = lambda weights: weights):  # fmt: skip
        """`layer_shapes`: {module path: (in, out)} of the base model's adaptable layers; `on_retire()` tells the
        engine that a version was replaced or deleted (its pool pages can go once unused); `prepare` turns validated
        weights into what the host tier keeps (the device pool's `prepare`: pre-cast, pre-scaled, pinned)."""
        self.store, self.registry = store, registry
        self.base_model_id, self.layer_shapes, self.max_rank = base_model_id, layer_shapes, max_rank
        self.on_retire, self.prepare = on_retire, prepare
        self._locks: dict[str, asyncio.Lock] = {}
        self.skipped: dict[str, str] = {}  # adapters not registered at start-up: {name: why}

    # ---- reading ----------------------------------------------------------------------------

    def get(self, name: str, tenant: Tenant = OPERATOR) -> Adapter:
        """The current version of `name` as `tenant` sees it; AdapterNotFound if there is none (or it may not see
        it: another tenant's private adapter is not there for it)."""
        adapter = self.registry.get(name)
        if not tenant.sees(adapter.owner, adapter.public):
            raise AdapterNotFound(name)
        return adapter

    def get_owned(self, name: str, tenant: Tenant) -> Adapter:
        """`get`, for changing it: AdapterNotOwned if `tenant` may see it but does not own it."""
        adapter = self.get(name, tenant)
        if not tenant.owns(adapter.owner):
            raise AdapterNotOwned(name)
        return adapter

    async def lookup(self, name: str, tenant: Tenant = OPERATOR) -> Adapter:
        """`get` for a request on the event loop (a shared catalog may have to read a remote store)."""
        return self.get(name, tenant)

    def list(self, tenant: Tenant = OPERATOR) -> list[Adapter]:
        return [a for a in self.registry.list() if tenant.sees(a.owner, a.public)]

    def exists(self, name: str) -> bool:
        return name in self.registry

    async def weights(self, adapter: Adapter) -> LoraWeights:
        """The adapter's host weights: a dictionary touch when resident (keeping the LRU order), else a disk read
        off the event loop."""
        if adapter.weights is not None:
            return self.registry.weights_of(adapter)
        return await in_thread(self.registry.weights_of, adapter)

    async def archive(self, adapter: Adapter) -> bytes:
        """The adapter's PEFT files as a .tar.gz."""
        return await asyncio.to_thread(pack_adapter_archive, adapter.path, adapter.name)

    def scratch_dir(self) -> Path:
        """A fresh directory on the store's filesystem, for an upload to be assembled in."""
        return self.store.scratch_dir()

    def load(self, directory: Path) -> LoraWeights:
        """Read and validate a PEFT directory against the base model (AdapterError), prepared for the host tier."""
        return self.prepare(load_peft_adapter(directory, self.layer_shapes, self.max_rank))

    # ---- writing ----------------------------------------------------------------------------

    async def add(self, name: str, adapter_dir: Path, overwrite: bool, problems: list[str] = (),
                  tenant: Tenant = OPERATOR, public: bool | None = None) -> Adapter:  # fmt: skip
        """Validate the PEFT directory `adapter_dir` (moved into the store: a scratch directory), store it and
        register it under `name`, owned by `tenant` (published with `public`; None: as the version it replaces):
        servable on return.

        Raises AdapterError with every problem (`problems`, the caller's own findings, first), AdapterExists if
        the name is taken and not `overwrite`, AdapterNotOwned if it belongs to another tenant.
        """
        problems = [p for p in [self.name_problem(name)] if p] + list(problems)
        try:
            weights = await in_thread(self.load, adapter_dir)
        except AdapterError as e:
            raise AdapterError(problems + e.problems) from None
        if problems:
            raise AdapterError(problems)
        async with self._locks.setdefault(name, asyncio.Lock()):
            old = self.registry.get(name) if self.exists(name) else None
            if old is not None and not overwrite:
                raise AdapterExists(name)
            if old is not None and not tenant.owns(old.owner):
                raise AdapterNotOwned(name)
            owner = old.owner if old is not None and tenant.admin else tenant.id  # an admin's overwrite keeps it
            public = (old.public if old is not None else False) if public is None else public
            version = self.registry.next_version(name)
            stored = await asyncio.to_thread(self.store.save, name, adapter_dir, version, owner, public)
            adapter = self.registry.add(name, weights, overwrite=overwrite, path=stored.path, sha256=stored.sha256,
                                        size_bytes=stored.size_bytes, version=version, owner=owner,
                                        public=public)  # fmt: skip
            await asyncio.to_thread(self.store.prune, name, version)
        log.info("adapter %s %s: version %d, rank %d, %d modules, %d bytes, tenant %s%s", name,
                 "replaced" if old is not None else "added", version, weights.rank, len(weights.modules),
                 stored.size_bytes, owner or "system", ", public" if public else "")  # fmt: skip
        self.on_retire()
        return adapter

    async def add_copy(self, name: str, source: Path, overwrite: bool, tenant: Tenant = OPERATOR) -> Adapter:
        """`add` for a PEFT directory that stays where it is (a training job's output): its two files are copied."""
        scratch = self.store.scratch_dir()
        try:
            for f in (CONFIG_NAME, WEIGHTS_NAME):
                await asyncio.to_thread(shutil.copyfile, source / f, scratch / f)
            return await self.add(name, scratch, overwrite, tenant=tenant)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    async def delete(self, name: str, tenant: Tenant = OPERATOR) -> None:
        """Unregister and remove `name` (AdapterNotFound if there is none for `tenant`, AdapterNotOwned if it is
        another tenant's); running requests finish on it."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            self.get_owned(name, tenant)
            self.registry.remove(name)
            await asyncio.to_thread(self.store.delete, name)
        log.info("adapter %s deleted (by tenant %s); running requests finish on it", name, tenant.id or "system")
        self.on_retire()

    async def publish(self, name: str, public: bool, tenant: Tenant = OPERATOR) -> Adapter:
        """Set whether `name` is usable by every tenant (its owner's or an admin's decision)."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            adapter = self.get_owned(name, tenant)
            if adapter.path is not None and adapter.path.parent.parent == self.store.root:
                await asyncio.to_thread(self.store.set_public, adapter.path, public)
            adapter.public = public
        log.info("adapter %s %s", name, "published" if public else "withdrawn (private)")
        return adapter

    def name_problem(self, name: str) -> str | None:
        """Why `name` cannot name an adapter here: not a valid name, or the base model's id."""
        if name == self.base_model_id:
            return f"invalid adapter name {name!r}: it is the base model's id"
        return name_problem(name)

    # ---- start-up ---------------------------------------------------------------------------

    def register_stored(self) -> None:
        """Register the adapters kept in the store (validated at upload; weights read on first use). One whose files
        are damaged (truncated weights, an unreadable config) is skipped: logged and kept in `skipped`."""
        stored = self.store.load_all()
        self.skipped.update(self.store.unreadable)
        for s in stored:
            try:
                rank, alpha, targets = describe_peft_adapter(s.path)
                with open(s.path / WEIGHTS_NAME, "rb") as f:  # a truncated file: the header promises more bytes
                    if f.seek(0, 2) != s.size_bytes - (s.path / CONFIG_NAME).stat().st_size:
                        raise AdapterError([f"{WEIGHTS_NAME} is not the size it was stored with"])
            except (AdapterError, OSError) as e:
                log.error("skipping stored adapter %s (version %d): %s", s.name, s.version, e)
                self.skipped[s.name] = str(e)
                continue
            public = s.public if s.owner is not None else True  # the operator's (older stores): as before owners
            self.registry.add_stored(s.name, s.version, rank, alpha, targets, path=s.path, sha256=s.sha256,
                                     size_bytes=s.size_bytes, created_at=s.created_at, owner=s.owner,
                                     public=public)  # fmt: skip

    def register_directory(self, directory: Path) -> None:
        """Register every subdirectory of `directory` that holds a PEFT adapter, under its name, in place."""
        for sub in sorted(p for p in directory.iterdir() if p.is_dir()):
            if not (sub / CONFIG_NAME).exists():
                continue
            if not is_valid_name(sub.name):
                log.error("skipping adapter directory %s: not a valid adapter name", sub.name)
                continue
            try:
                weights = self.load(sub)
                files = [sub / CONFIG_NAME, sub / WEIGHTS_NAME]
                self.registry.add(sub.name, weights, path=sub, sha256=file_sha256(files[1]),
                                  size_bytes=sum(f.stat().st_size for f in files), public=True)  # fmt: skip
                log.info("loaded adapter %s (rank %d)", sub.name, weights.rank)
            except AdapterError as e:
                log.error("skipping adapter %s: %s", sub.name, e)
                self.skipped[sub.name] = str(e)
            except AdapterExists:
                log.error("skipping adapter directory %s: an uploaded adapter has that name", sub.name)
