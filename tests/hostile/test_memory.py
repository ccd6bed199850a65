"""Memory that does not creep (issue #16, finding 10): the serving allocator policy keeps freed memory for reuse,
and a trim every few seconds gives it back, so the resident set cannot keep a peak (or a fragmented heap) forever.
The soak itself is `benchmarks/soak.py` (RESULTS.md)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.live import REPO

PROGRAM = textwrap.dedent("""
    import time
    import torch
    from adapters.cpu.allocator import _glibc, keep_freed_memory, trim_periodically

    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096

    assert keep_freed_memory()
    start = rss()
    blocks = [torch.ones(1 << 18) for _ in range(400)]  # 400 × 1 MiB, each below the 32 MiB mmap threshold
    keep = torch.ones(1 << 10)  # allocated last: the heap's top stays in use
    del blocks
    kept = rss() - start
    trim_periodically(0.1)
    time.sleep(1.0)
    print(kept >> 20, (rss() - start) >> 20)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_memory_is_kept_then_given_back_by_the_periodic_trim():
    out = subprocess.run([sys.executable, "-c", PROGRAM], cwd=REPO, capture_output=True, text=True, check=True)
    kept, after = map(int, out.stdout.split())
    assert kept > 300, (kept, after)  # keep_freed_memory: nothing went back on its own
    assert after < 100, (kept, after)  # the trim thread gave it back
