"""dtype names as configurations spell them (torch-free), and the torch dtypes they stand for."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    import torch

DtypeName = Literal["float32", "bfloat16", "float16"]
DTYPE_NAMES: tuple[str, ...] = get_args(DtypeName)


def torch_dtype(name: DtypeName) -> torch.dtype:
    """The torch dtype named `name` (one of DTYPE_NAMES)."""
    import torch

    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {list(DTYPE_NAMES)}, not {name!r}")
    return getattr(torch, name)
