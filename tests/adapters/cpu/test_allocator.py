"""adapters.cpu.allocator: with glibc's mmap threshold fixed, or after a trim, freed tensors leave the resident set; with
freed memory kept, a repeated pattern of allocations stops faulting in fresh pages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapters.cpu.allocator import ALIGNMENT, lazy_zeros

REPO = Path(__file__).resolve().parents[3]

# One large free raises glibc's dynamic threshold above 1 MiB; then 100 tensors of 1 MiB come from the heap, and
# with the last one kept the heap cannot shrink when the others are freed. The resident growth that remains is
# printed in MiB.
PROGRAM = """
import sys, torch
from adapters.cpu.allocator import return_freed_memory, trim_freed_memory
if sys.argv[1] == "fixed":
    assert return_freed_memory()
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024
big = torch.ones(2 * 2**20 // 4)
del big
before = rss()
tensors = [torch.ones(2**20 // 4) for _ in range(100)]
last = tensors.pop()
del tensors
if sys.argv[1] == "trim":
    assert trim_freed_memory()
print(rss() - before)
"""


# A forward pass's pattern, each pass on a new thread: temporaries of 1-16 MiB, some freed at once, some kept until the
# pass ends. After five warm-up passes, the MiB of pages faulted in per pass are printed. With the threshold fixed low
# (every temporary a fresh mapping) all of them fault in; glibc's default, or only the threshold fixed high, faults in
# some: each thread's arena unmaps its emptied heaps.
REUSE = """
import resource, sys, threading, torch
from adapters.cpu.allocator import keep_freed_memory, return_freed_memory
assert {"fixed": return_freed_memory, "keep": keep_freed_memory}[sys.argv[1]]()
def forward():
    kept = []
    for mib in (1, 4, 2, 8, 3, 16, 6) * 3:
        kept.append(torch.ones(mib * 2**20 // 4))
        torch.ones(mib * 2**20 // 8)
def in_thread():  # as the engine's thread, which a server stops and starts again
    thread = threading.Thread(target=forward)
    thread.start()
    thread.join()
for _ in range(5):
    in_thread()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    in_thread()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10 * 4096 / 2**20)
"""


def run(program: str, mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", program, mode], cwd=REPO, capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_tensors_leave_the_resident_set():
    assert run(PROGRAM, "dynamic") > 50  # glibc's default keeps ~99 MiB of freed tensors resident
    assert run(PROGRAM, "fixed") < 10
    assert run(PROGRAM, "trim") < 10


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_kept_memory_is_reused_without_faulting_pages_in():
    assert run(REUSE, "fixed") > 100  # ~180 MiB of fresh pages per pass
    assert run(REUSE, "keep") < 5  # none, or a few stray pages (without one arena: 30-40 MiB)


# 256 MiB of zeros, then a write to its first 8 MiB: the resident growth after each, in MiB.
LAZY = """
import sys, torch
from adapters.cpu.allocator import lazy_zeros
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024
before = rss()
t = (torch.zeros if sys.argv[1] == "torch" else lambda *s: lazy_zeros(s, torch.float32, "cpu"))(64, 2**20)
allocated = rss() - before
t[:2] = 1.0
print(allocated, rss() - before)
"""


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool])
def test_lazy_zeros_are_zeros(dtype):
    t = lazy_zeros((3, 5, 7), dtype, "cpu")
    assert (t.shape, t.dtype, t.is_contiguous()) == ((3, 5, 7), dtype, True)
    assert t.data_ptr() % ALIGNMENT == 0 and not t.any()
    t[1, 2] = 1  # writable, and its own memory
    assert t.sum().item() == 7 and not lazy_zeros((3, 5, 7), dtype, "cpu").any()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_lazy_zeros_take_memory_as_they_are_written():
    out = subprocess.run([sys.executable, "-c", LAZY, "lazy"], cwd=REPO, capture_output=True, text=True, check=True)
    allocated, written = map(float, out.stdout.split())
    assert allocated < 8 and 6 < written < 24  # torch.zeros: 256 MiB at once
    out = subprocess.run([sys.executable, "-c", LAZY, "torch"], cwd=REPO, capture_output=True, text=True, check=True)
    assert float(out.stdout.split()[0]) > 200
