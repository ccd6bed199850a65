"""Adapter archives: safe extraction of an uploaded one (.zip or .tar.gz), and packing one for download.

Only the two PEFT files are accepted, as regular files at the archive's top level (or inside a
single top-level folder). Everything else is refused before a byte is written: absolute paths,
`..`, links and devices, extra members, encrypted or exotically compressed zip members, and a
decompressed size over the cap. The archive is read lazily and bounded as it is read: at most
`MAX_MEMBERS` members are looked at (a tar.gz is never decompressed whole just to list it), a
member whose declared size exceeds what is left of the cap is refused before a byte of it is
decompressed, and the bytes actually written are counted too (zip bombs lie in their headers).
"""

from __future__ import annotations

import io
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from adapters.peft_io import CONFIG_NAME, WEIGHTS_NAME, AdapterError

ALLOWED = {CONFIG_NAME, WEIGHTS_NAME}
MAX_MEMBERS = 16  # the two files, a folder and a little slack (e.g. a README); more is refused unread
_ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
_TOO_LARGE = "the archive decompresses to more than the upload limit"


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
                raise AdapterError([_TOO_LARGE])
            out.write(chunk)


def extract_adapter_archive(archive: Path, dest: Path, max_bytes: int) -> None:
    """Extract the PEFT files of `archive` into `dest`; raises AdapterError listing every problem."""
    try:
        _extract(archive, dest, max_bytes)
    except AdapterError:
        raise
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError, NotImplementedError, RuntimeError,
            ValueError) as e:  # fmt: skip
        raise AdapterError([f"the archive is corrupt ({e.__class__.__name__})"]) from None


def _extract(archive: Path, dest: Path, max_bytes: int) -> None:
    problems: list[str] = []
    budget = [max_bytes]
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            infos = [i for i in z.infolist() if not i.is_dir()]
            if len(infos) > MAX_MEMBERS:
                raise AdapterError([f"the archive holds {len(infos)} files; an adapter archive holds {CONFIG_NAME} "
                                    f"and {WEIGHTS_NAME} (at most {MAX_MEMBERS} members are accepted)"])
            names = {}
            for i in infos:
                if (i.external_attr >> 16) & 0o170000 == 0o120000:
                    problems.append(f"archive member {i.filename!r} is a symbolic link")
                    continue
                if i.flag_bits & 0x1:
                    problems.append(f"archive member {i.filename!r} is encrypted")
                    continue
                if i.compress_type not in _ZIP_METHODS:
                    problems.append(f"archive member {i.filename!r} uses compression method {i.compress_type}; "
                                    f"only {' and '.join(_ZIP_METHODS.values())} are accepted")
                    continue
                n = _member_name(i.filename, problems)
                if n:
                    names[i.filename] = n
            if sum(i.file_size for i in infos if i.filename in names) > max_bytes:
                problems.append(_TOO_LARGE)
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
        names: list[str] = []
        count = 0
        try:
            # members one at a time: each allowed file is extracted as soon as its header is read, so nothing is
            # decompressed twice and nothing past a refusal is decompressed at all
            for m in tar:
                count += 1
                if count > MAX_MEMBERS:
                    problems.append(f"the archive holds more than {MAX_MEMBERS} members; an adapter archive holds "
                                    f"{CONFIG_NAME} and {WEIGHTS_NAME}")
                    break
                if m.isdir():
                    continue
                if not m.isfile():
                    problems.append(f"archive member {m.name!r} is a link or a special file")
                    continue
                n = _member_name(m.name, problems)
                if m.size > budget[0]:
                    problems.append(_TOO_LARGE)
                    break  # skipping it would mean decompressing it
                if n and not problems:
                    names.append(n)
                    if names.count(n) == 1:
                        _copy_capped(tar.extractfile(m), dest / n, budget)
        except (tarfile.TarError, EOFError):
            problems.append("the archive is truncated or corrupt")
        _check_complete(names, problems)


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
