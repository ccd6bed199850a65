"""The disk tier: uploaded adapters, versioned, written atomically.

Layout: `<root>/<name>/<version>/` holds the two PEFT files and `meta.json`. A version is
written to a temporary directory and renamed into place, so a reader never sees half of one;
the newest complete version of a name is the current one. Deleting renames the whole name
away first, then removes it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from adapters.peft_io import CONFIG_NAME, WEIGHTS_NAME


@dataclass
class StoredAdapter:
    name: str
    version: int
    sha256: str
    size_bytes: int
    created_at: int
    path: Path


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

    def scratch_dir(self) -> Path:
        """A fresh directory on the store's filesystem (so the final rename is atomic)."""
        d = self._tmp / uuid.uuid4().hex
        d.mkdir()
        return d

    def save(self, name: str, src: Path, version: int) -> StoredAdapter:
        """Move `src` (a scratch directory holding exactly the two PEFT files) in as `name` version `version`."""
        meta = StoredAdapter(
            name=name,
            version=version,
            sha256=file_sha256(src / WEIGHTS_NAME),
            size_bytes=sum((src / f).stat().st_size for f in (CONFIG_NAME, WEIGHTS_NAME)),
            created_at=int(time.time()),
            path=self.root / name / str(version),
        )
        (src / "meta.json").write_text(json.dumps(asdict(meta) | {"path": None}))
        meta.path.parent.mkdir(exist_ok=True)
        src.rename(meta.path)
        return meta

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
        """The current version of every stored name (what survives a restart)."""
        shutil.rmtree(self._tmp, ignore_errors=True)  # leftovers of writes cut short
        self._tmp.mkdir()
        out = []
        for d in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            versions = sorted(int(v.name) for v in d.iterdir() if v.name.isdigit() and (v / "meta.json").exists())
            if versions:
                meta = json.loads((d / str(versions[-1]) / "meta.json").read_text())
                known = {k: meta[k] for k in StoredAdapter.__dataclass_fields__ if k in meta}  # a newer writer may add
                out.append(StoredAdapter(**(known | {"path": d / str(versions[-1])})))
        return out
