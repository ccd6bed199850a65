"""Adapter archives: safe extraction of an uploaded one (.zip or .tar.gz), and packing one for download.

Only the two PEFT files are accepted, as regular files at the archive's top level (or inside a
single top-level folder). Everything else is refused before a byte is written: absolute paths,
`..`, links and devices, extra members, and a decompressed size over the cap (zip bombs: the
sizes are checked while streaming, not trusted from the headers).
"""

from __future__ import annotations

import io
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from adapters.peft_io import CONFIG_NAME, WEIGHTS_NAME, AdapterError

ALLOWED = {CONFIG_NAME, WEIGHTS_NAME}


def _member_name(raw: str, problems: list[str]) -> str | None:
    p = PurePosixPath(raw.replace("\\", "/"))
    if p.is_absolute() or raw.startswith(("/", "\\")) or (len(raw) > 1 and raw[1] == ":"):
        problems.append(f"archive member {raw!r} has an absolute path")
        return None
    if ".." in p.parts:
        problems.append(f"archive member {raw!r} leaves the archive ('..')")
        return None
    parts = [x for x in p.parts if x not in ("", ".")]
    if len(parts) == 2 and parts[1] in ALLOWED:
        return parts[1]  # one top-level folder, as `tar czf a.tar.gz my-adapter/` makes
    if len(parts) == 1 and parts[0] in ALLOWED:
        return parts[0]
    problems.append(f"unexpected archive member {raw!r} (only {CONFIG_NAME} and {WEIGHTS_NAME})")
    return None


def _copy_capped(src, dest: Path, budget: list[int]) -> None:
    with open(dest, "wb") as out:
        while chunk := src.read(1 << 20):
            budget[0] -= len(chunk)
            if budget[0] < 0:
                raise AdapterError(["the archive decompresses to more than the upload limit"])
            out.write(chunk)


def extract_adapter_archive(archive: Path, dest: Path, max_bytes: int) -> None:
    """Extract the PEFT files of `archive` into `dest`; raises AdapterError listing every problem."""
    try:
        _extract(archive, dest, max_bytes)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise AdapterError([f"the archive is corrupt ({e.__class__.__name__})"]) from None


def _extract(archive: Path, dest: Path, max_bytes: int) -> None:
    problems: list[str] = []
    budget = [max_bytes]
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            infos = [i for i in z.infolist() if not i.is_dir()]
            names = {}
            for i in infos:
                if (i.external_attr >> 16) & 0o170000 == 0o120000:
                    problems.append(f"archive member {i.filename!r} is a symbolic link")
                    continue
                n = _member_name(i.filename, problems)
                if n:
                    names[i.filename] = n
            _check_complete(list(names.values()), problems)
            for i in infos:
                if i.filename in names:
                    with z.open(i) as src:
                        _copy_capped(src, dest / names[i.filename], budget)
        return
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError):
        raise AdapterError(["the archive is neither a valid .zip nor a valid .tar.gz"]) from None
    with tar:
        try:
            members = [m for m in tar.getmembers() if not m.isdir()]
        except (tarfile.TarError, OSError, EOFError):
            raise AdapterError(["the archive is truncated or corrupt"]) from None
        names = {}
        for m in members:
            if not m.isfile():
                problems.append(f"archive member {m.name!r} is a link or a special file")
                continue
            n = _member_name(m.name, problems)
            if n:
                names[m.name] = n
        _check_complete(list(names.values()), problems)
        for m in members:
            if m.name in names:
                src = tar.extractfile(m)
                _copy_capped(src, dest / names[m.name], budget)


def _check_complete(names: list[str], problems: list[str]) -> None:
    for f in sorted(ALLOWED):
        if names.count(f) == 0:
            problems.append(f"the archive lacks {f}")
        elif names.count(f) > 1:
            problems.append(f"the archive holds {f} more than once")
    if problems:
        raise AdapterError(problems)


def pack_adapter_archive(directory: Path, name: str) -> bytes:
    """The two PEFT files of `directory` as a .tar.gz, inside a top-level folder `name` (what extraction takes)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for f in (CONFIG_NAME, WEIGHTS_NAME):
            tar.add(directory / f, arcname=f"{name}/{f}")
    return buf.getvalue()
