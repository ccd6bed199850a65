"""The adapter catalog: the one way adapters come and go — validate → store → register → retire.

Uploads, the `--adapter-dir` folder read at start-up and finished training jobs all pass through here, so a
trained adapter meets exactly an upload's checks. `add` validates a PEFT directory against the base model (every
problem reported at once, `adapters.peft_io`), writes it into the disk tier by one rename (`adapters.tiers.store`)
and registers it in the host tier (`adapters.tiers.registry`): it is servable when `add` returns. Writes to one
name are serialised, so concurrent uploads cannot leave a mixed state; running requests keep the version they
resolved (an overwrite or delete retires the old version, whose device pages the engine frees once unused).
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
from adapters.tiers.registry import Adapter, AdapterExists, AdapterRegistry
from adapters.tiers.store import AdapterStore, file_sha256
from server.engine.threads import in_thread

log = logging.getLogger(__name__)


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

    # ---- reading ----------------------------------------------------------------------------

    def get(self, name: str) -> Adapter:
        """The current version of `name`; AdapterNotFound if there is none."""
        return self.registry.get(name)

    async def lookup(self, name: str) -> Adapter:
        """`get` for a request on the event loop (a shared catalog may have to read a remote store)."""
        return self.get(name)

    def list(self) -> list[Adapter]:
        return self.registry.list()

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

    async def add(self, name: str, adapter_dir: Path, overwrite: bool, problems: list[str] = ()) -> Adapter:
        """Validate the PEFT directory `adapter_dir` (moved into the store: a scratch directory), store it and
        register it under `name`: servable on return.

        Raises AdapterError with every problem (`problems`, the caller's own findings, first), or AdapterExists
        if the name is taken and not `overwrite`.
        """
        problems = [p for p in [name_problem(name)] if p] + list(problems)
        try:
            weights = await in_thread(self.load, adapter_dir)
        except AdapterError as e:
            raise AdapterError(problems + e.problems) from None
        if problems:
            raise AdapterError(problems)
        async with self._locks.setdefault(name, asyncio.Lock()):
            if not overwrite and self.exists(name):
                raise AdapterExists(name)
            version = self.registry.next_version(name)
            stored = await asyncio.to_thread(self.store.save, name, adapter_dir, version)
            adapter = self.registry.add(name, weights, overwrite=overwrite, path=stored.path, sha256=stored.sha256,
                                        size_bytes=stored.size_bytes, version=version)  # fmt: skip
            await asyncio.to_thread(self.store.prune, name, version)
        self.on_retire()
        return adapter

    async def add_copy(self, name: str, source: Path, overwrite: bool) -> Adapter:
        """`add` for a PEFT directory that stays where it is (a training job's output): its two files are copied."""
        scratch = self.store.scratch_dir()
        try:
            for f in (CONFIG_NAME, WEIGHTS_NAME):
                await asyncio.to_thread(shutil.copyfile, source / f, scratch / f)
            return await self.add(name, scratch, overwrite)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    async def delete(self, name: str) -> None:
        """Unregister and remove `name` (AdapterNotFound if there is none); running requests finish on it."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            self.registry.remove(name)
            await asyncio.to_thread(self.store.delete, name)
        self.on_retire()

    # ---- start-up ---------------------------------------------------------------------------

    def register_stored(self) -> None:
        """Register the adapters kept in the store (validated at upload; weights read on first use)."""
        for s in self.store.load_all():
            rank, alpha, targets = describe_peft_adapter(s.path)
            self.registry.add_stored(s.name, s.version, rank, alpha, targets, path=s.path, sha256=s.sha256,
                                     size_bytes=s.size_bytes, created_at=s.created_at)  # fmt: skip

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
                                  size_bytes=sum(f.stat().st_size for f in files))  # fmt: skip
                log.info("loaded adapter %s (rank %d)", sub.name, weights.rank)
            except AdapterError as e:
                log.error("skipping adapter %s: %s", sub.name, e)
            except AdapterExists:
                log.error("skipping adapter directory %s: an uploaded adapter has that name", sub.name)
