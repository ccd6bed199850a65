"""Process-wide choices for the device the engine runs on, made once at start-up before any thread starts.

On the CPU: glibc's allocator keeps freed memory for reuse (adapters.cpu.allocator; it must come before other
threads allocate, since a thread keeps the arena it has), bounded by a trim every `trim_interval` seconds, and
torch's intra-op thread count. Nothing on a GPU.
(Per-layer choices — oneDNN for the frozen fp32 linears — are made when the runner wraps the model.)
"""

from __future__ import annotations

import torch

from adapters.cpu.allocator import keep_freed_memory, trim_periodically
from server.engine.config import CpuConfig


def configure_process(config: CpuConfig, device: torch.device) -> None:
    """Apply the CPU policies of `config` to this process when `device` is the CPU."""
    if device.type != "cpu":
        return
    if config.keep_freed_memory and keep_freed_memory() and config.trim_interval:
        trim_periodically(config.trim_interval)
    if config.threads:
        torch.set_num_threads(config.threads)
