"""The engine loop: continuous batching of many requests, each with its own adapters, on one base model.

It runs in one thread of its own. Every iteration it admits waiting requests into free KV-cache rows (one batched
prefill, their adapters leased in the LoRA pool), prefills the next chunk of a long prompt, then runs one decode
step over every running sequence, whatever adapter each uses: the multi-LoRA layers add each token's own LoRA
term inside the same batched matmuls (vLLM's continuous batching with per-token adapter indices; S-LoRA's
unified pool). Which sequences run where is the `Scheduler`'s; the forward passes are the `ModelRunner`'s; tokens,
stop rules and emission are the `OutputProcessor`'s. Outputs go back through each request's `emit` callback.
"""

from __future__ import annotations

import logging
import random
import threading
from collections import deque
from collections.abc import Callable

import torch

from adapters.tiers.pool import LoraPool
from server.engine.config import EngineConfig
from server.engine.memory import plan_memory
from server.engine.merge import AutoMerger
from server.engine.model import BaseModel
from server.engine.output import OutputProcessor
from server.engine.prefix_cache import BLOCK_SIZE, PrefixCache
from server.engine.request import GenerationRequest, RequestOutput
from server.engine.runner import ModelRunner
from server.engine.scheduler import Scheduler, Sequence
from server.engine.text import TextStream

log = logging.getLogger(__name__)
RESERVED = {"loraplex_k", "loraplex_v", "loraplex_prefix_k", "loraplex_prefix_v", "lora_A", "lora_B"}
"""The preallocated buffers by name (`SlotKVCache`, `PrefixCache`, `MultiLoraLinear`)."""


class Engine:
    """Owns the model's forward passes; thread-safe `submit` / `abort` for the outside."""

    def __init__(self, base: BaseModel, config: EngineConfig):
        self.base = base
        # the memory budget, where one is set, sizes the KV cache and the LoRA pool (server.engine.memory)
        self.memory = plan_memory(config, base.model, min(config.max_model_len, base.max_model_len), base.device)
        if self.memory is not None:
            config = config.model_copy(update={"max_num_seqs": self.memory.kv_rows, "lora_pages": self.memory.lora_pages,
                                               "prefix_cache_tokens": self.memory.prefix_tokens})  # fmt: skip
        self.config = config
        self.runner = ModelRunner(base, config)
        self.max_len = self.runner.max_len
        self.device = base.device
        model = base.model
        gen_eos = getattr(model.generation_config, "eos_token_id", None) if model.generation_config else None
        eos = {base.tokenizer.eos_token_id} | set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        blocks = config.prefix_cache_tokens // BLOCK_SIZE if config.prefix_caching else 0
        self.prefix = PrefixCache(self.runner.cache, blocks, BLOCK_SIZE) if blocks else None
        if config.reserve_memory:
            self.reserve_memory()
        self.scheduler = Scheduler(config, self.runner.pool, self.runner.cache, self.prefix)
        self.outputs = OutputProcessor(sorted(e for e in eos if e is not None), self.max_len, self.runner.buffers)

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._incoming: deque[GenerationRequest] = deque()
        self._aborts: set[str] = set()
        self._drop_retired = False
        self._thread: threading.Thread | None = None
        self._stop = False
        self.alive = False
        self.prompt_tokens = 0  # read by the metrics
        self._warm_progress: Callable[[int, int], None] = lambda done, total: None

    def reserve_memory(self) -> int:
        """Write every byte of the preallocated buffers (KV cache, prefix cache, LoRA pool: zeros that the CPU maps
        in only as they are first written, `adapters.cpu.allocator.lazy_zeros`); their bytes."""
        reserved = [b for name, b in self.base.model.named_buffers() if name.rsplit(".", 1)[-1] in RESERVED]
        for b in reserved:
            b.zero_()
        total = sum(b.numel() * b.element_size() for b in reserved)
        log.info("reserved %.2f GiB: KV cache, prefix cache, LoRA pool", total / 2**30)
        return total

    # ---- outside world (any thread) -------------------------------------------------------

    def layer_shapes(self) -> dict[str, tuple[int, int]]:
        """{module path: (in, out)} of every adaptable layer, for validating adapters."""
        return self.runner.layer_shapes()

    @property
    def pool(self) -> LoraPool:
        return self.runner.pool

    @property
    def merger(self) -> AutoMerger | None:
        return self.runner.merger

    @merger.setter
    def merger(self, merger: AutoMerger | None) -> None:  # benchmarks turn merging on and off between runs
        self.runner.merger = merger

    @property
    def tokens_generated(self) -> int:
        return self.outputs.tokens_generated

    @property
    def num_waiting(self) -> int:
        with self._lock:  # the engine thread moves requests from one queue to the other under it
            return len(self._incoming) + len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    def submit(self, req: GenerationRequest) -> None:
        with self._wake:
            self._incoming.append(req)
            self._wake.notify()

    def drop_retired(self) -> None:
        """Free (at the engine's next turn) the pool pages of deleted or replaced adapters no request uses."""
        with self._wake:
            self._drop_retired = True
            self._wake.notify()

    def abort(self, request_id: str) -> None:
        with self._wake:
            self._aborts.add(request_id)
            self._wake.notify()

    def start(self) -> None:
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="loraplex-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def warmup(self, progress: Callable[[int, int], None] = lambda done, total: None) -> None:
        """Compile and run every kind of forward before traffic (see ModelRunner.warmup); `progress(done, total)`
        after each warm-up forward."""
        self.runner.warmup(progress)

    def warmup_in_background(self, progress: Callable[[int, int], None] = lambda done, total: None) -> None:
        """Serve at once, eagerly, and run the warm-up's forwards in the engine thread whenever no sequence runs
        (each compiles a graph; a request arriving meanwhile waits for that one forward); once they are all done,
        forwards run compiled. Call before `start`."""
        self.runner.start_warmup()
        self._warm_progress = progress

    @property
    def compiling(self) -> bool:
        """Whether a background warm-up still has forwards to run (forwards run eagerly until it ends)."""
        return self.runner.warming

    # ---- engine thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        self.alive = True
        self.runner.enter_thread()
        try:
            with torch.inference_mode():
                while True:
                    with self._wake:
                        while not (self._stop or self._incoming or self._aborts or self._drop_retired
                                   or self.scheduler.has_work() or self.runner.warming):  # fmt: skip
                            self._wake.wait()
                        if self._stop:
                            break
                        # into the scheduler under the lock: `num_waiting` counts every request at every moment
                        while self._incoming:
                            req = self._incoming.popleft()
                            try:
                                self.scheduler.add(self._sequence(req))
                            except Exception as e:  # a request the engine cannot take still gets an answer
                                log.exception("engine could not take request %s", req.request_id)
                                req.emit(RequestOutput(req.request_id, "", [], None, "error", len(req.prompt_ids), 0,
                                                       str(e)))  # fmt: skip
                        aborts, self._aborts = self._aborts, set()
                        drop, self._drop_retired = self._drop_retired, False
                    if drop:
                        self.pool.drop_unused()
                        if self.prefix is not None:
                            self.prefix.drop_retired()
                    try:
                        for seq in self.scheduler.abort(aborts) if aborts else ():
                            self.outputs.finish(seq, "abort")
                        if self.scheduler.has_work():
                            self._step()
                        elif self.runner.warming:  # idle: the next forward of the background warm-up
                            self.runner.warm_next()
                            self._warm_progress(*self.runner.warm_progress)
                    except Exception as e:  # no request without an answer
                        log.exception("engine step failed")
                        self._fail_active(f"internal error in the engine: {e.__class__.__name__}")
        finally:
            self.alive = False
            self._fail_active("the server is shutting down", reason="abort")
            while self.scheduler.waiting:
                self.outputs.finish(self.scheduler.waiting.popleft(), "abort", error="the server is shutting down")

    def _sequence(self, req: GenerationRequest) -> Sequence:
        gen = None
        if req.params.temperature > 0:
            seed = req.params.seed
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed if seed is not None else random.getrandbits(62))
        return Sequence(req=req, stream=TextStream(self.base.tokenizer, req.params.stop), generator=gen)

    def _step(self) -> None:
        new, refused = self.scheduler.admit()
        for seq, error in refused:
            self.outputs.finish(seq, "error", error=error)
        if new:
            self._prefill(new)
        if self.scheduler.partial is not None:
            self._prefill_chunk()
        if self.scheduler.running:
            self._decode()

    def _emit(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Sample, retire the finished sequences from the batch, then emit every output (a client told its
        request is done finds its row free)."""
        finished, outputs = self.outputs.process(seqs, logits)
        self.scheduler.retire(finished)
        self.outputs.emit(seqs, outputs)

    def _prefill(self, new: list[Sequence]) -> None:
        """Prefill the admitted sequences: those from position 0 together, then those after a cached prefix."""
        row0 = self.scheduler.start(new)  # from here on a failure answers them with the running batch
        self.outputs.stage(new)
        cold = [s for s in new if s.num_cached == 0]
        warm = new[len(cold) :]  # the scheduler puts them last, with their cached prefix copied into their rows
        logits = []
        if cold:
            logits.append(self.runner.prefill(row0, [s.req.prompt_ids for s in cold], [s.adapter_pages() for s in cold]))
        if warm:
            logits.append(self.runner.prefill(row0 + len(cold), [s.req.prompt_ids[s.num_cached :] for s in warm],
                                              [s.adapter_pages() for s in warm], [s.num_cached for s in warm]))
        for i, s in enumerate(new):
            s.num_cached = len(s.req.prompt_ids)
            self.prompt_tokens += s.num_cached
            self.scheduler.remember(s, row0 + i)
        self._emit(new, torch.cat(logits) if len(logits) > 1 else logits[0])

    def _prefill_chunk(self) -> None:
        """The partial sequence's next `prefill_chunk` prompt tokens; after the last, it joins the running batch."""
        s = self.scheduler.partial
        left, take = len(s.req.prompt_ids) - s.num_cached, self.config.prefill_chunk
        if left - take == 1:
            take -= 1  # no chunk of one token: it would look like a decode step (another compiled graph)
        ids = s.req.prompt_ids[s.num_cached : s.num_cached + take]
        last = s.num_cached + len(ids) == len(s.req.prompt_ids)
        if last:
            self.outputs.stage([s])
        logits = self.runner.prefill(self.scheduler.chunk_row, [ids], [s.adapter_pages()], [s.num_cached])
        s.num_cached += len(ids)
        if not last:
            return
        self.scheduler.finish_partial()
        self.prompt_tokens += s.num_cached
        self._emit([s], logits)

    def _decode(self) -> None:
        seqs = list(self.scheduler.running)
        if self.merger:
            self.merger.observe([s.single_adapter() for s in seqs])
        self.outputs.stage(seqs)
        logits = self.runner.decode(
            [s.output_ids[-1] for s in seqs], [s.num_cached for s in seqs], [s.adapter_pages() for s in seqs]
        )
        for s in seqs:
            s.num_cached += 1
        self._emit(seqs, logits)

    def _fail_active(self, message: str, reason: str = "error") -> None:
        for seq in self.scheduler.take_active():
            self.outputs.finish(seq, reason, error=message)
        self.runner.lora_mapping.clear()
