"""The disk tier: uploaded adapters, versioned, written atomically.

Layout: `<root>/<name>/<version>/` holds the two PEFT files and `meta.json` (sizes, hash, owner,
public flag). A version is written to a temporary directory, its files and the directory fsynced,
then renamed into place and the parent directory fsynced: a reader never sees half of one, and
once `save` returns the version survives a crash or power loss. The newest complete version of a
name is the current one. Deleting renames the whole name away first, then removes it. A version
whose files are damaged is not fatal: `load_all` skips what it cannot read, and the catalog skips
(and reports) what does not validate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from adapters.peft_io import CONFIG_NAME, WEIGHTS_NAME

log = logging.getLogger(__name__)


@dataclass
class StoredAdapter:
    name: str
    version: int
    sha256: str
    size_bytes: int
    created_at: int
    path: Path
    owner: str | None = None
    """The tenant that created it (None: from before tenants were recorded)."""
    public: bool = False


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's contents (a directory: its entries) to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: str) -> None:
    """Replace `path` with `data` atomically and durably: a temporary file, fsynced, renamed, directory fsynced."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    with open(tmp, "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class AdapterStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._tmp = self.root / ".tmp"
        self._tmp.mkdir(exist_ok=True)
        self.unreadable: dict[str, str] = {}

    def scratch_dir(self) -> Path:
        """A fresh directory on the store's filesystem (so the final rename is atomic)."""
        d = self._tmp / uuid.uuid4().hex
        d.mkdir()
        return d

    def save(self, name: str, src: Path, version: int, owner: str | None = None, public: bool = False) -> StoredAdapter:
        """Move `src` (a scratch directory holding exactly the two PEFT files) in as `name` version `version`;
        durable on return."""
        meta = StoredAdapter(
            name=name,
            version=version,
            sha256=file_sha256(src / WEIGHTS_NAME),
            size_bytes=sum((src / f).stat().st_size for f in (CONFIG_NAME, WEIGHTS_NAME)),
            created_at=int(time.time()),
            path=self.root / name / str(version),
            owner=owner,
            public=public,
        )
        (src / "meta.json").write_text(json.dumps(asdict(meta) | {"path": None}))
        for f in (CONFIG_NAME, WEIGHTS_NAME, "meta.json", "."):
            fsync_path(src / f)
        new_name = not meta.path.parent.exists()
        meta.path.parent.mkdir(exist_ok=True)
        if new_name:
            fsync_path(self.root)
        src.rename(meta.path)
        fsync_path(meta.path.parent)
        return meta

    def set_public(self, path: Path, public: bool) -> None:
        """Record a stored version's public flag (durably, by replacing its meta.json)."""
        meta = json.loads((path / "meta.json").read_text()) | {"public": public}
        write_durably(path / "meta.json", json.dumps(meta))

    def prune(self, name: str, keep: int) -> None:
        """Remove the versions of `name` older than `keep`."""
        for d in (self.root / name).iterdir():
            if d.name.isdigit() and int(d.name) < keep:
                shutil.rmtree(d, ignore_errors=True)

    def delete(self, name: str) -> None:
        d = self.root / name
        if d.exists():
            trash = self._tmp / f"deleted-{uuid.uuid4().hex}"
            d.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)

    def load_all(self) -> list[StoredAdapter]:
        """The current version of every stored name (what survives a restart); a name whose current version cannot
        be read is logged and left in `unreadable` {name: reason}."""
        self.unreadable = {}
        shutil.rmtree(self._tmp, ignore_errors=True)  # leftovers of writes cut short
        self._tmp.mkdir()
        out = []
        for d in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            versions = sorted(int(v.name) for v in d.iterdir() if v.name.isdigit() and (v / "meta.json").exists())
            if versions:
                path = d / str(versions[-1])
                try:
                    meta = json.loads((path / "meta.json").read_text())
                    known = {k: meta[k] for k in StoredAdapter.__dataclass_fields__ if k in meta}  # a newer writer may add
                    out.append(StoredAdapter(**(known | {"path": path})))
                except (OSError, ValueError, TypeError) as e:  # a damaged meta.json
                    log.error("skipping stored adapter %s: its meta.json is unreadable (%s)", d.name, e)
                    self.unreadable[d.name] = f"meta.json is unreadable ({e.__class__.__name__})"
        return out
