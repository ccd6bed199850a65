"""Process memory policy of glibc's allocator: give freed tensors back to the OS (training), or keep them (serving).

glibc serves an allocation of at least M_MMAP_THRESHOLD bytes with its own mmap, returned to the OS when freed,
and anything smaller from its heap. The threshold starts at 128 KiB but is dynamic: each time an mmapped block is
freed it rises to that block's size (up to 32 MiB), so after the first training step nearly every activation comes
from the heap, whose freed pages stay resident and fragment as the next step's tensors differ in size. Fixing the
threshold at 128 KiB keeps the resident set small but makes every activation a fresh mapping whose pages fault in.
So training has two policies:
  - `return_freed_memory()`, the fixed threshold: the least memory, for runs that trade speed for it
    (the trainer applies it with gradient checkpointing);
  - `trim_freed_memory()`, `malloc_trim(0)` between optimizer steps: the heap's free pages go back to the OS once
    a step, at the dynamic threshold's speed; the trainer's default.
Serving wants the opposite: `keep_freed_memory()`, the threshold fixed at glibc's largest (32 MiB), trimming off,
and one arena for all threads, so that a forward pass's temporaries reuse pages that are already resident. (A
thread's own arena lives in 64 MiB heaps that glibc unmaps whenever one empties, whatever the trim threshold: an
engine thread whose temporaries come and go would fault them in again.) Without it, a multi-adapter prefill faults
in hundreds of MB of fresh, kernel-zeroed pages, and so does every automatic merge (benchmarks/RESULTS.md). The
cost: the resident set keeps its peak of temporaries, and more: under mixed traffic one never-trimmed arena
fragments, its free holes (resident, since nothing returns them) growing without a plateau (1.9 → 2.7 GB over
9 minutes of a soak). `trim_periodically()` bounds that: a daemon thread gives the heap's free pages back every
few seconds (`malloc_trim(0)` returns free pages inside the heap too, not only its top), so the resident set
tracks what is in use plus what the last seconds freed, and a forward re-faults its temporaries at most once per
interval. A thread that already has an arena keeps it, so the server applies this once at start, before any
thread (`server.engine.platform`). Training runs in worker processes of its own.

Large buffers that start at zero and fill as they are used (the KV cache, the LoRA page pool) come from
`lazy_zeros`: on the CPU `torch.zeros` writes every byte at once (all of it resident from then on), where calloc
gets the kernel's zero pages, mapped in as they are first written.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import sys
import threading
import time

import numpy as np
import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's mallopt parameter numbers
MMAP_THRESHOLD = 128 * 1024  # glibc's initial value, kept
MMAP_THRESHOLD_MAX = 32 * 2**20  # the largest glibc accepts on 64-bit (HEAP_MAX_SIZE / 2)
NEVER_TRIM = 2**31 - 1  # mallopt takes an int: a free heap top this large is never reached


@functools.cache  # looked up once: the trainer trims after every step
def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold for this process; False where that is not glibc (then nothing changes)."""
    libc = _glibc()
    return bool(libc and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def trim_freed_memory() -> bool:
    """Give the heap's free pages back to the OS now; False where that is not glibc or nothing was freed."""
    libc = _glibc()
    return bool(libc and libc.malloc_trim(0))


def keep_freed_memory() -> bool:
    """Serve allocations below 32 MiB from one heap for all threads and never trim it (see the module docstring);
    False where that is not glibc (then nothing changes)."""
    libc = _glibc()
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX), (M_TRIM_THRESHOLD, NEVER_TRIM), (M_ARENA_MAX, 1))
    return bool(libc) and all(libc.mallopt(param, value) for param, value in settings)


_trimmer: threading.Thread | None = None


def trim_periodically(interval: float) -> threading.Thread | None:
    """Start (once per process) a daemon thread that calls `trim_freed_memory()` every `interval` seconds (the bound
    on `keep_freed_memory`'s resident set, see the module docstring); None where that is not glibc."""
    global _trimmer
    if _glibc() is None or _trimmer is not None:
        return _trimmer

    def loop() -> None:
        while True:
            time.sleep(interval)
            trim_freed_memory()

    _trimmer = threading.Thread(target=loop, name="loraplex-malloc-trim", daemon=True)
    _trimmer.start()
    return _trimmer


ALIGNMENT = 64  # bytes, as PyTorch's CPU allocator gives: no vector load of a row straddles two cache lines


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """`torch.zeros(shape, dtype=dtype, device=device)`; on the CPU from calloc (numpy's zeros, as bytes: numpy has
    no bf16, and zero bits are zero in any dtype), so that pages cost memory and time only once written (see the
    module docstring)."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    raw = np.zeros(nbytes + ALIGNMENT, dtype=np.uint8)  # calloc aligns to 16 bytes only
    start = -raw.ctypes.data % ALIGNMENT
    return torch.from_numpy(raw[start : start + nbytes]).view(dtype).view(shape)
