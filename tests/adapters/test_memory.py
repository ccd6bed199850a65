"""adapters.memory: with glibc's mmap threshold fixed, or after a trim, freed tensors leave the resident set."""

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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_tensors_leave_the_resident_set():
    def growth(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", PROGRAM, mode], cwd=REPO, capture_output=True, text=True, check=True)
        return float(out.stdout.split()[-1])

    assert growth("dynamic") > 50  # glibc's default keeps ~99 MiB of freed tensors resident
    assert growth("fixed") < 10
    assert growth("trim") < 10
