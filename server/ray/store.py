"""The shared adapter store: one tree of versioned adapters that the ingress writes and every engine replica reads.

A directory every node mounts, or an object store through fsspec (`s3://bucket/prefix`, `gs://...`: any fsspec URI
whose filesystem library is installed). The layout is the single-process disk tier's (`adapters.tiers.store`):
`<root>/<name>/<version>/` holds the two PEFT files and `meta.json`, so a data directory moves between the two modes.
A version is complete once its `meta.json` exists, which is written last: by a rename on a filesystem (atomic), as
one object on an object store (which appears whole). A reader never sees half a version.

Every version has a `digest` of its two files, and `name@version.digest` is its version id: the multiplexed model
id replicas load it by. An adapter deleted and uploaded again restarts its version numbers, and the digest keeps the
new one from aliasing a copy a replica kept of the old. The previous version of a name stays beside the current one,
so a request that resolved it just before an overwrite can still be loaded by its replica.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from adapters.peft_io import CONFIG_NAME, WEIGHTS_NAME, describe_peft_adapter
from adapters.tiers.store import file_sha256, write_durably

META = "meta.json"


@dataclass(frozen=True)
class StoredVersion:
    """One complete version of an adapter in the shared store (what its `meta.json` says)."""

    name: str
    version: int
    digest: str
    sha256: str
    size_bytes: int
    created_at: int
    rank: int
    alpha: float
    target_modules: list[str] = field(default_factory=list)
    path: str = ""
    """Where the version lies in the store (not in its meta.json)."""
    owner: str | None = None
    """The tenant that created it (None: the operator's), as `adapters.tiers.store` records it."""
    public: bool = False

    @property
    def version_id(self) -> str:
        return f"{self.name}@{self.version}.{self.digest}"


def parse_version_id(version_id: str) -> tuple[str, int, str]:
    """(name, version, digest) of `name@version.digest`; ValueError if it is not one."""
    name, _, rest = version_id.rpartition("@")
    version, _, digest = rest.partition(".")
    if not name or not version.isdigit() or not digest:
        raise ValueError(f"not an adapter version id: {version_id!r}")
    return name, int(version), digest


def _digest(config: bytes, weights_sha256: str) -> str:
    return hashlib.sha256(config + weights_sha256.encode()).hexdigest()[:16]


def digest_of(directory: Path) -> str:
    """The digest a PEFT directory's two files get in the store."""
    return _digest((directory / CONFIG_NAME).read_bytes(), file_sha256(directory / WEIGHTS_NAME))


class SharedStore:
    """Versioned adapters under one root, local or remote (fsspec); `cache_dir` is this node's own scratch space."""

    def __init__(self, uri: str | Path, cache_dir: Path):
        self.uri = str(uri)
        self.fs, self.root = fsspec.core.url_to_fs(self.uri)
        self.root = self.root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.cache_dir = Path(cache_dir)
        self._described: dict[tuple[str, int, str], StoredVersion] = {}  # versions written without a digest
        if self.is_local:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    def _path(self, *parts: object) -> str:
        return "/".join([self.root, *map(str, parts)])

    def scratch_dir(self) -> Path:
        """A fresh local directory for an upload to be assembled in (on the store's filesystem when local, so the
        final rename is atomic)."""
        base = Path(self._path(".tmp")) if self.is_local else self.cache_dir / "scratch"
        d = base / uuid.uuid4().hex
        d.mkdir(parents=True)
        return d

    # ---- reading ----------------------------------------------------------------------------

    def versions(self, name: str) -> list[int]:
        """The version numbers present for `name` (complete or still being written), ascending."""
        try:
            entries = self.fs.ls(self._path(name), detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(int(p) for p in (e.rstrip("/").rsplit("/", 1)[-1] for e in entries) if p.isdigit())

    def get(self, name: str, version: int) -> StoredVersion | None:
        """That version of `name` if it is complete, else None."""
        try:
            meta = json.loads(self.fs.cat_file(self._path(name, version, META)))
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
            return None
        if "digest" in meta:
            fields = StoredVersion.__dataclass_fields__
            return StoredVersion(**{k: v for k, v in meta.items() if k in fields} | {"path": self._path(name, version)})
        return self._describe(name, version, meta)  # written by the single-process server

    def current(self, name: str) -> StoredVersion | None:
        """The newest complete version of `name`, or None."""
        for version in reversed(self.versions(name)):
            stored = self.get(name, version)
            if stored is not None:
                return stored
        return None

    def list(self) -> list[StoredVersion]:
        """The current version of every name, by name."""
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        names = sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)
        return [s for s in (self.current(n) for n in names if not n.startswith(".")) if s is not None]

    def local_copy(self, stored: StoredVersion) -> Path:
        """A local directory holding the version's two PEFT files (downloaded once per node from a remote store)."""
        if self.is_local:
            return Path(self._path(stored.name, stored.version))
        dest = self.cache_dir / "adapters" / stored.version_id
        if not (dest / WEIGHTS_NAME).exists():
            tmp = dest.with_name(f"{dest.name}.{uuid.uuid4().hex}.part")
            tmp.mkdir(parents=True)
            for f in (CONFIG_NAME, WEIGHTS_NAME):
                self.fs.get_file(self._path(stored.name, stored.version, f), str(tmp / f))
            try:
                tmp.rename(dest)
            except OSError:  # another request of this node downloaded it meanwhile
                shutil.rmtree(tmp, ignore_errors=True)
        return dest

    def _describe(self, name: str, version: int, meta: dict) -> StoredVersion:
        key = (name, version, meta["sha256"])
        if key not in self._described:
            stored = StoredVersion(name, version, "", meta["sha256"], meta["size_bytes"], meta["created_at"], 0, 0.0)
            path = self.local_copy(stored)
            rank, alpha, targets = describe_peft_adapter(path)
            digest = _digest((path / CONFIG_NAME).read_bytes(), meta["sha256"])
            self._described[key] = StoredVersion(name, version, digest, meta["sha256"], meta["size_bytes"],
                                                 meta["created_at"], rank, alpha, targets, self._path(name, version))  # fmt: skip
        owned = {"owner": meta.get("owner"), "public": bool(meta.get("public", False))}  # may change: not cached
        return replace(self._described[key], **owned)

    # ---- writing ----------------------------------------------------------------------------

    def save(self, name: str, src: Path, version: int, owner: str | None = None, public: bool = False
             ) -> StoredVersion:  # fmt: skip
        """Store `src` (a scratch directory holding exactly the two PEFT files, already validated) as `name`
        version `version`, owned by tenant `owner`; complete when this returns."""
        rank, alpha, targets = describe_peft_adapter(src)
        sha = file_sha256(src / WEIGHTS_NAME)
        stored = StoredVersion(
            name=name, version=version, digest=_digest((src / CONFIG_NAME).read_bytes(), sha), sha256=sha,
            size_bytes=sum((src / f).stat().st_size for f in (CONFIG_NAME, WEIGHTS_NAME)), created_at=int(time.time()),
            rank=rank, alpha=alpha, target_modules=targets, path=self._path(name, version), owner=owner, public=public,
        )  # fmt: skip
        meta = json.dumps(asdict(stored) | {"path": None}).encode()  # `path`: as adapters.tiers.store writes it
        final = self._path(name, version)
        if self.is_local:
            (src / META).write_bytes(meta)
            Path(final).parent.mkdir(exist_ok=True)
            src.rename(final)
        else:
            for f in (CONFIG_NAME, WEIGHTS_NAME):
                self.fs.put_file(str(src / f), f"{final}/{f}")
            self.fs.pipe_file(f"{final}/{META}", meta)  # last: the version exists from here on
        return stored

    def set_public(self, stored: StoredVersion, public: bool) -> None:
        """Record a stored version's public flag (its meta.json replaced in one write)."""
        meta = json.loads(self.fs.cat_file(self._path(stored.name, stored.version, META))) | {"public": public}
        if self.is_local:
            write_durably(Path(self._path(stored.name, stored.version, META)), json.dumps(meta))
        else:
            self.fs.pipe_file(self._path(stored.name, stored.version, META), json.dumps(meta).encode())

    def prune(self, name: str, keep: int) -> None:
        """Remove the versions of `name` older than the one before `keep`."""
        for version in self.versions(name):
            if version < keep - 1:
                self._remove_version(name, version)

    def delete(self, name: str) -> None:
        """Remove every version of `name`; it is gone for readers at once."""
        if self.is_local:
            d = Path(self._path(name))
            if d.exists():
                trash = Path(self._path(".tmp", f"deleted-{uuid.uuid4().hex}"))
                trash.parent.mkdir(exist_ok=True)
                d.rename(trash)
                shutil.rmtree(trash, ignore_errors=True)
            return
        for version in self.versions(name):  # the meta files first: then no reader finds any version
            meta = self._path(name, version, META)
            if self.fs.exists(meta):
                self.fs.rm_file(meta)
        if self.fs.exists(self._path(name)):
            self.fs.rm(self._path(name), recursive=True)

    def _remove_version(self, name: str, version: int) -> None:
        path = self._path(name, version)
        if self.is_local:
            shutil.rmtree(path, ignore_errors=True)
        elif self.fs.exists(path):
            self.fs.rm(path, recursive=True)
