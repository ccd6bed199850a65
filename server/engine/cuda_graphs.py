"""CUDA graphs of the decode step (`--cuda-graphs`): each (batch, key length, LoRA pages) bucket's forward is
captured once and replayed, as vLLM captures its decode batches and gpt-fast its `reduce-overhead` step.

What makes the step capturable is the runner's: its inputs sit in persistent buffers (`StepBuffers`) refilled in
place, the KV cache and the LoRA pool are written in place, a merge changes the base weights in place, and
nothing in the forward reads the device from the host. A captured graph reads those same addresses at every
replay; its output tensor is overwritten by the next replay of the same graph, which the engine has consumed by
then (each step ends with the sampled tokens' copy to the host).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class DecodeGraphs:
    def __init__(self, device: torch.device, warmup_runs: int = 2):
        self.device, self.warmup_runs = device, warmup_runs
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def run(self, key: tuple, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        """`forward()`'s output, from the graph captured for `key` (captured now if this is its first step)."""
        if key not in self.graphs:
            self.graphs[key] = self._capture(forward)
        graph, output = self.graphs[key]
        graph.replay()
        return output

    def _capture(self, forward: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # warm up on a side stream first (lazy initialisation, compiled kernels' autotuning stay out of the graph)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup_runs):
                forward()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = forward()
        return graph, output
