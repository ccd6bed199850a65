"""Where `loraplex adapters pull NAME SOURCE` fetches an adapter from, on the user's machine (the server never opens
a URL: API.md, Conventions). The fetched files are then uploaded like `adapters upload`.

- a local folder holding `adapter_config.json` + `adapter_model.safetensors`, or a `.zip` / `.tar.gz` of one;
- `hf://ORG/REPO[/SUBFOLDER][@REVISION]`: a repository of the Hugging Face hub, through `huggingface_hub`
  (its cache, its token, `HF_HUB_OFFLINE`; only the two adapter files are downloaded);
- any `fsspec` URL (`s3://bucket/path`, `gs://…`, `https://…`, …): a folder holding the two files, or one archive
  (fsspec's filesystems for the scheme must be installed, e.g. `s3fs` for `s3://`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz")
_HF = re.compile(r"^hf://(?P<repo>[\w.-]+/[\w.-]+)(?P<sub>(?:/[\w.-]+)*)(?:@(?P<rev>[\w./-]+))?$")


@dataclass(frozen=True)
class Fetched:
    """What to upload: a PEFT `directory` or one `archive` file (exactly one is set)."""

    directory: Path | None = None
    archive: Path | None = None


def fetch(source: str, scratch: Path) -> Fetched:
    """The adapter `source` names, on local disk (fetched into `scratch` when remote); ValueError / OSError with a
    message for the user when it is not there."""
    if source.startswith("hf://"):
        return Fetched(directory=fetch_hub(source, scratch))
    if "://" in source and not source.startswith("file://"):
        return fetch_url(source, scratch)
    path = Path(source.removeprefix("file://")).expanduser()
    if path.is_dir():
        missing = [f for f in ADAPTER_FILES if not (path / f).is_file()]
        if missing:
            raise ValueError(f"{path} is not a PEFT adapter folder: it has no {' and no '.join(missing)}")
        return Fetched(directory=path)
    if path.is_file():
        if not path.name.endswith(ARCHIVE_SUFFIXES):
            raise ValueError(f"{path} is a file but not an archive (.zip, .tar.gz): give the adapter's folder")
        return Fetched(archive=path)
    raise FileNotFoundError(2, "no such file or directory (give a folder, an archive, hf://ORG/REPO or a URL)",
                            str(path))  # fmt: skip


def fetch_hub(source: str, scratch: Path) -> Path:
    """`hf://ORG/REPO[/SUBFOLDER][@REVISION]` through huggingface_hub: its local folder in the hub cache."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    m = _HF.match(source)
    if not m:
        raise ValueError(f"{source!r} is not a hub id: write hf://ORG/REPO, hf://ORG/REPO/SUBFOLDER or hf://ORG/REPO@REVISION")
    sub = m["sub"].strip("/")
    patterns = [f"{sub}/{f}" if sub else f for f in ADAPTER_FILES]
    try:
        # the environment as it is now (huggingface_hub reads it once, when first imported)
        offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        root = Path(snapshot_download(m["repo"], revision=m["rev"], allow_patterns=patterns, local_files_only=offline,
                                      cache_dir=os.environ.get("HF_HUB_CACHE") or None))  # fmt: skip
    except LocalEntryNotFoundError:
        raise ValueError(f"{m['repo']} is not in the local hub cache and the hub cannot be reached "
                         "(offline: HF_HUB_OFFLINE is set, or no network)") from None  # fmt: skip
    except RepositoryNotFoundError:
        raise ValueError(f"no hub repository {m['repo']} (or it is private: set HF_TOKEN)") from None
    except HfHubHTTPError as e:
        raise ValueError(f"the hub refused {m['repo']}: {str(e).splitlines()[0]}") from None
    folder = root / sub if sub else root
    missing = [f for f in ADAPTER_FILES if not (folder / f).is_file()]
    if missing:
        raise ValueError(f"{source} holds no {' and no '.join(missing)}: is it a PEFT LoRA adapter?")
    return folder


def fetch_url(url: str, scratch: Path) -> Fetched:
    """An fsspec URL: one archive, or a folder whose two adapter files are fetched into `scratch`."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise ValueError(f"cannot open {url}: {e}") from None
    if url.rstrip("/").endswith(ARCHIVE_SUFFIXES):
        target = scratch / url.rstrip("/").rsplit("/", 1)[-1]
        _get(fs, path, target, url)
        return Fetched(archive=target)
    folder = scratch / "adapter"
    folder.mkdir()
    for name in ADAPTER_FILES:
        _get(fs, f"{path.rstrip('/')}/{name}", folder / name, f"{url.rstrip('/')}/{name}")
    return Fetched(directory=folder)


def _get(fs, path: str, target: Path, url: str) -> None:
    try:
        fs.get_file(path, str(target))
    except FileNotFoundError:
        raise ValueError(f"{url} does not exist") from None
    except OSError as e:
        raise ValueError(f"cannot fetch {url}: {e}") from None
