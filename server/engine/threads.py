"""Torch work outside the engine thread runs in threads that end when it is done.

The OpenMP runtime of torch's CPU builds (libgomp) keeps a team of worker threads for every thread
that ever ran a parallel region, for as long as that thread lives. Once the process holds more
such threads than CPUs, libgomp spins only briefly at its barriers (its "throttled" spin count),
and the engine's decode step, hundreds of small parallel regions, pays a futex wake-up at each:
~50 % slower steps on this 2-core machine with one idle team left over. A pooled thread (asyncio's
`to_thread` executor) would keep its team after validating one upload; a thread of its own takes
its team with it when it ends. So model loading, adapter validation and host-tier reads run here.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def run_in_thread(fn: Callable[..., T], *args: Any, name: str = "loraplex-torch", **kwargs: Any) -> T:
    """fn(*args, **kwargs) in a new thread that ends with it; blocks, returns its result or raises its error."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the caller
            box["error"] = e

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


async def in_thread(fn: Callable[..., T], *args: Any, name: str = "loraplex-torch", **kwargs: Any) -> T:
    """`asyncio.to_thread`, but fn runs in a new thread that ends with the call (see the module docstring);
    the pooled thread only waits for it, touching no torch."""
    return await asyncio.to_thread(run_in_thread, fn, *args, name=name, **kwargs)
