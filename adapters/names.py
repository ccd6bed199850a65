"""Adapter names: the one pattern every layer checks (API.md, Conventions)."""

from __future__ import annotations

import re

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NAME_RE = re.compile(NAME_PATTERN)


def is_valid_name(name: str) -> bool:
    return bool(_NAME_RE.fullmatch(name)) and name not in (".", "..")


def name_problem(name: str, what: str = "adapter name") -> str | None:
    """Why `name` is not a valid adapter name (None when it is one)."""
    if is_valid_name(name):
        return None
    return f"invalid {what} {name!r}: it must match {NAME_PATTERN}"
