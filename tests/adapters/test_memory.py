"""adapters.memory: with glibc's mmap threshold fixed, or after a trim, freed tensors leave the resident set; with
freed memory kept, a repeated pattern of allocations stops faulting in fresh pages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# One large free raises glibc's dynamic threshold above 1 MiB; then 100 tensors of 1 MiB come from the heap, and
# with the last one kept the heap cannot shrink when the others are freed. The resident growth that remains is
# printed in MiB.
PROGRAM = """
import sys, torch
from adapters.memory import return_freed_memory, trim_freed_memory
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
from adapters.memory import keep_freed_memory, return_freed_memory
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
