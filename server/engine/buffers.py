"""The decode step's inputs in persistent device buffers, filled from one host staging buffer with one copy.

vLLM's model runner keeps its per-token metadata (token ids, positions, slot mapping, LoRA indices) in buffers
allocated once at `max_num_seqs` and fills them every step, so the step never allocates, its buffers keep their
addresses (what a captured CUDA graph reads) and nothing is read back to the host. Here every field is a view into
one byte buffer on the device and one (pinned on CUDA) staging buffer on the host: the engine thread writes a
step's values into the staging views (numpy, no torch call per element), and `upload()` copies the used bytes
with one non-blocking copy. `write()` first waits for the previous copy to have left the staging buffer (on CUDA;
a wait for that small copy only), so it is never rewritten while a copy from it may be in flight.
"""

from __future__ import annotations

import math

import numpy as np
import torch


class StepBuffers:
    """Named fields, each a (host view, device view) pair of the same shape and dtype."""

    def __init__(self, fields: dict[str, tuple[torch.dtype, tuple[int, ...]]], device: torch.device):
        self.device = device
        sizes = {name: math.prod(shape) * torch.empty((), dtype=dt).element_size() for name, (dt, shape) in fields.items()}
        total = sum(-(-n // 8) * 8 for n in sizes.values())  # each field 8-byte aligned
        pin = device.type == "cuda"
        self._staging = torch.zeros(total, dtype=torch.uint8, pin_memory=pin)
        # an inference tensor, as every other input of a step: compiled graphs guard on dispatch keys, and one kind
        # of tensor everywhere keeps them from compiling a variant per kind (so it is only written in inference mode)
        with torch.inference_mode():
            self._device = torch.zeros(total, dtype=torch.uint8, device=device)
        self._host: dict[str, np.ndarray] = {}
        self.dev: dict[str, torch.Tensor] = {}
        self._copied: torch.cuda.Event | None = None
        offset = 0
        for name, (dt, shape) in fields.items():
            span = slice(offset, offset + sizes[name])
            host = self._staging[span].view(dt).view(shape)
            # numpy has no bfloat16: fields are int64 / float32, cast on the device where a step needs another dtype
            self._host[name] = host.numpy()
            self.dev[name] = self._device[span].view(dt).view(shape)
            offset += -(-sizes[name] // 8) * 8

    def write(self) -> dict[str, np.ndarray]:
        """The host views, to stage the next step's values in (once the previous copy has left them)."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None
        return self._host

    def upload(self) -> None:
        """Copy every staged field to the device (one copy; asynchronous from pinned memory on CUDA)."""
        self._device.copy_(self._staging, non_blocking=True)
        if self.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()

    def data_ptrs(self) -> dict[str, int]:
        return {name: t.data_ptr() for name, t in self.dev.items()}
