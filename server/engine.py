"""The engine: continuous batching of many requests, each with its own adapters, on one base model.

It runs in one thread of its own and knows nothing about HTTP. Every iteration it admits
waiting requests into free KV-cache rows (one batched prefill, their adapters made resident in
the LoRA pool), then runs one decode step over every running sequence, whatever adapter each
uses: the multi-LoRA layers add each token's own LoRA term inside the same batched matmuls
(vLLM's continuous batching with per-token adapter indices; S-LoRA's unified pool). Finished or
aborted sequences leave at once and their row is refilled by the last one, so the running
batch always occupies rows 0..n-1 of the cache. A prompt longer than `prefill_chunk` is prefilled
a chunk per iteration in the cache's last row while the others keep decoding (vLLM's chunked
prefill), then joins them.

The forward passes themselves are the ModelRunner's; outputs go back through each request's
`emit` callback, called from the engine thread.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from adapters.peft_io import LoraWeights
from adapters.pool import LoraPool, PoolFull
from adapters.registry import Adapter
from server.merge import AutoMerger
from server.model import BaseModel
from server.runner import AdapterRows, ModelRunner
from server.sampling import SamplingParams, TokenLogprob, sample, token_logprobs
from server.text import TextStream

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    """Engine limits, built by server.settings."""

    max_num_seqs: int = 32
    """Sequences decoded together at most (rows of the KV cache)."""
    max_model_len: int = 2048
    """Prompt plus output tokens of one sequence at most."""
    max_prefill_tokens: int = 4096
    """Padded prompt tokens admitted in one prefill at most (one longer prompt still goes alone)."""
    prefill_chunk: int = 512
    """A prompt longer than this is prefilled this many tokens per engine step, the running batch decoding between
    its chunks (vLLM's chunked prefill; one such prompt at a time, in the last KV-cache row); 0: in one forward.
    At least 3 when on."""
    lora_pages: int = 64
    """Pages in the device LoRA pool, shared by all resident adapters (a rank-16 adapter takes one)."""
    lora_page_size: int = 16
    """Rank rows per page."""
    auto_merge: bool = True
    """Fold an adapter into the base weights while it serves nearly every running sequence."""
    merge_threshold: float = 0.9
    """Share of running sequences one adapter must hold, every step of the window, to be merged."""
    merge_window: int = 8
    """Decode steps the share is observed over, before merging and before unmerging."""
    lora_backend: str = "compiled"
    """'compiled' (decoder layers compiled by torch.compile, LoRA kernels fused in) or 'eager'."""
    lora_dtype: str = "auto"
    """dtype of the LoRA pages: 'auto' (the model's) or float32 / bfloat16 / float16. bf16 pages halve the adapter
    bytes a decode step reads (vLLM's `lora_dtype`); the arithmetic stays in the model's dtype."""
    pack_weights: bool = True
    """fp32 on the CPU: keep a copy of each frozen weight in oneDNN's packed layout (faster decode steps, the
    weights' memory twice); off, oneDNN reads the plain weights (adapters.dense)."""
    keep_freed_memory: bool = True
    """On the CPU: glibc keeps freed memory for reuse instead of handing it back to the OS, so a forward's temporaries
    land on resident pages rather than faulting fresh ones in (process-wide; adapters.memory)."""


@dataclass
class AdapterUse:
    """An adapter a request applies, with its weight (1.0 unless composing) and its host weights."""

    adapter: Adapter
    weight: float = 1.0
    lora: LoraWeights | None = None  # pinned by the request; defaults to the adapter's host copy


@dataclass
class RequestOutput:
    """One increment of a request's output."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[RequestOutput], None]
    adapters: list[AdapterUse] = field(default_factory=list)


@dataclass(eq=False)
class _Sequence:
    req: GenerationRequest
    stream: TextStream
    generator: torch.Generator | None
    lora: list[tuple[AdapterUse, torch.Tensor]] = field(default_factory=list)  # each adapter with its pool pages
    output_ids: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose K/V are in the cache
    acquired: list[Adapter] = field(default_factory=list)


def _adapter_rows(seq: _Sequence) -> AdapterRows:
    return [(use.adapter, pages, use.weight) for use, pages in seq.lora]


def _single_adapter(seq: _Sequence) -> tuple[Adapter, torch.Tensor, LoraWeights] | None:
    """(adapter, pages, weights) of a sequence served by exactly one adapter at weight 1, else None."""
    if len(seq.lora) == 1 and seq.lora[0][0].weight == 1.0:
        use, pages = seq.lora[0]
        return use.adapter, pages, use.lora
    return None


class Engine:
    """Owns the model's forward passes; thread-safe `submit` / `abort` for the outside."""

    def __init__(self, base: BaseModel, config: EngineConfig):
        self.base = base
        self.config = config
        self.runner = ModelRunner(base, config)
        self.max_len = self.runner.max_len
        self.device = base.device
        model = base.model
        gen_eos = getattr(model.generation_config, "eos_token_id", None) if model.generation_config else None
        eos = {base.tokenizer.eos_token_id} | set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        self.eos_ids = sorted(e for e in eos if e is not None)

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._incoming: deque[GenerationRequest] = deque()
        self._aborts: set[str] = set()
        self._drop_retired = False
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._partial: _Sequence | None = None  # a long prompt being prefilled chunk by chunk (_prefill_chunk)
        self._thread: threading.Thread | None = None
        self._stop = False
        self.alive = False
        # counters read by the metrics
        self.tokens_generated = 0
        self.prompt_tokens = 0

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
    def merger(self, merger: AutoMerger | None) -> None:
        self.runner.merger = merger

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

    @property
    def num_waiting(self) -> int:
        return len(self._incoming) + len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running) + (self._partial is not None)

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

    def warmup(self) -> None:
        """Compile and run every kind of forward before traffic (see ModelRunner.warmup)."""
        self.runner.warmup()

    # ---- engine thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        self.alive = True
        self.runner.enter_thread()
        try:
            with torch.inference_mode():
                while True:
                    with self._wake:
                        while not (self._stop or self._incoming or self._aborts or self._waiting or self._running
                                   or self._partial or self._drop_retired):
                            self._wake.wait()
                        if self._stop:
                            break
                        incoming, self._incoming = list(self._incoming), deque()
                        aborts, self._aborts = self._aborts, set()
                        drop, self._drop_retired = self._drop_retired, False
                    if drop:
                        self.pool.drop_unused()
                    for req in incoming:
                        try:
                            self._enqueue(req)
                        except Exception as e:  # a request the engine cannot take still gets an answer
                            log.exception("engine could not take request %s", req.request_id)
                            req.emit(RequestOutput(req.request_id, "", [], None, "error", len(req.prompt_ids), 0, str(e)))
                    try:
                        if aborts:
                            self._apply_aborts(aborts)
                        if self._waiting or self._running or self._partial:
                            self._step()
                    except Exception as e:  # no request without an answer
                        log.exception("engine step failed")
                        self._fail_running(f"internal error in the engine: {e.__class__.__name__}")
        finally:
            self.alive = False
            self._fail_running("the server is shutting down", reason="abort")
            for seq in self._waiting:
                self._finish(seq, "abort", error="the server is shutting down")

    def _enqueue(self, req: GenerationRequest) -> None:
        seed = req.params.seed
        gen = None
        if req.params.temperature > 0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
        self._waiting.append(_Sequence(req=req, stream=TextStream(self.base.tokenizer, req.params.stop), generator=gen))

    def _apply_aborts(self, ids: set[str]) -> None:
        for seq in [s for s in self._waiting if s.req.request_id in ids]:
            self._waiting.remove(seq)
            self._finish(seq, "abort")
        finished = [s for s in self._running if s.req.request_id in ids]
        for seq in finished:
            self._finish(seq, "abort")
        self._compact(finished)
        if self._partial is not None and self._partial.req.request_id in ids:
            self._finish(self._partial, "abort")
            self._partial = None

    def _step(self) -> None:
        new = self._admit()
        if new:
            self._prefill(new)
        if self._partial is not None:
            self._prefill_chunk()
        if self._running:
            self._decode()

    def _admit(self) -> list[_Sequence]:
        """Waiting sequences for this step's prefill, in order; a prompt longer than `prefill_chunk` becomes the
        partial sequence instead, prefilled in the last cache row (the others then have one row fewer)."""
        new: list[_Sequence] = []
        longest = 0
        chunk = self.config.prefill_chunk
        while self._waiting and len(self._running) + len(new) < self.config.max_num_seqs - (self._partial is not None):
            seq = self._waiting[0]
            n = len(seq.req.prompt_ids)
            long = 0 < chunk < n
            if long and self._partial is not None:
                break  # one chunked prompt at a time, in arrival order
            if not long and new and max(longest, n) * (len(new) + 1) > self.config.max_prefill_tokens:
                break
            try:
                self._acquire_adapters(seq)
            except PoolFull as e:
                if self._running or new or self._partial:
                    break  # rows come free as running sequences finish
                self._waiting.popleft()
                self._finish(seq, "error", error=str(e))
                continue
            self._waiting.popleft()
            if long:
                self._partial = seq
                continue
            longest = max(longest, n)
            new.append(seq)
        return new

    def _acquire_adapters(self, seq: _Sequence) -> None:
        uses = seq.req.adapters
        if not uses:
            return
        try:
            for use in uses:
                use.lora = use.lora or use.adapter.weights
                if use.lora is None:
                    raise PoolFull(f"the weights of adapter {use.adapter.name!r} are not in memory")
                pages = self.pool.acquire(use.adapter, use.lora)
                seq.acquired.append(use.adapter)
                seq.lora.append((use, pages))
        except PoolFull:
            self._release_adapters(seq)
            seq.lora = []
            raise

    def _release_adapters(self, seq: _Sequence) -> None:
        for adapter in seq.acquired:
            self.pool.release(adapter)
        seq.acquired = []

    def _prefill(self, new: list[_Sequence]) -> None:
        row0 = len(self._running)
        self._running.extend(new)  # from here on a failure answers them with the running batch
        logits = self.runner.prefill(row0, [s.req.prompt_ids for s in new], [_adapter_rows(s) for s in new])
        for s in new:
            s.num_cached = len(s.req.prompt_ids)
            self.prompt_tokens += s.num_cached
        self._sample_and_emit(new, logits)

    def _prefill_chunk(self) -> None:
        """The partial sequence's next `prefill_chunk` prompt tokens; after the last, it joins the running batch."""
        s, row = self._partial, self.config.max_num_seqs - 1
        left, take = len(s.req.prompt_ids) - s.num_cached, self.config.prefill_chunk
        if left - take == 1:
            take -= 1  # no chunk of one token: it would look like a decode step (another compiled graph)
        ids = s.req.prompt_ids[s.num_cached : s.num_cached + take]
        logits = self.runner.prefill_chunk(row, ids, s.num_cached, _adapter_rows(s))
        s.num_cached += len(ids)
        if s.num_cached < len(s.req.prompt_ids):
            return
        self._partial = None
        if len(self._running) != row:
            self.runner.cache.move_row(row, len(self._running), s.num_cached)
        self._running.append(s)
        self.prompt_tokens += s.num_cached
        self._sample_and_emit([s], logits)

    def _decode(self) -> None:
        seqs = list(self._running)
        if self.merger:
            self.merger.observe([_single_adapter(s) for s in seqs])
        logits = self.runner.decode(
            [s.output_ids[-1] for s in seqs], [s.num_cached for s in seqs], [_adapter_rows(s) for s in seqs]
        )
        for s in seqs:
            s.num_cached += 1
        self._sample_and_emit(seqs, logits)

    def _sample_and_emit(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        dev = logits.device
        temps = torch.tensor([s.req.params.temperature for s in seqs], device=dev)
        top_ps = torch.tensor([s.req.params.top_p for s in seqs], device=dev)
        banned = None
        short = [i for i, s in enumerate(seqs) if len(s.output_ids) < s.req.params.min_tokens]
        if short:
            banned = torch.zeros_like(logits, dtype=torch.bool)
            for i in short:
                banned[i, self.eos_ids + seqs[i].req.params.stop_token_ids] = True
        tokens = sample(logits, temps, top_ps, [s.generator for s in seqs], banned)
        k = max((s.req.params.logprobs for s in seqs if s.req.params.logprobs is not None), default=None)
        lps = token_logprobs(logits, tokens, k) if k is not None else None
        finished = []
        for i, (s, tok) in enumerate(zip(seqs, tokens.tolist())):
            s.output_ids.append(tok)
            self.tokens_generated += 1
            p = s.req.params
            lp = None
            if lps is not None and p.logprobs is not None:
                lp = [TokenLogprob(lps[i].token_id, lps[i].logprob, lps[i].top[: p.logprobs])]
            reason = None
            if (tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids:
                reason = "stop"
            delta, stopped = s.stream.push(s.output_ids)
            if stopped:
                reason = "stop"
            elif reason is None and (len(s.output_ids) >= p.max_tokens or s.num_cached + 1 >= self.max_len):
                reason = "length"
            if reason is not None and not stopped:
                delta += s.stream.flush(s.output_ids)
            s.req.emit(
                RequestOutput(s.req.request_id, delta, [tok], lp, reason, len(s.req.prompt_ids), len(s.output_ids))
            )
            if reason is not None:
                finished.append(s)
                self._release_adapters(s)
        self._compact(finished)

    def _finish(self, seq: _Sequence, reason: str, error: str | None = None) -> None:
        self._release_adapters(seq)
        seq.req.emit(
            RequestOutput(seq.req.request_id, "", [], None, reason, len(seq.req.prompt_ids), len(seq.output_ids), error)
        )

    def _compact(self, finished: list[_Sequence]) -> None:
        """Remove finished sequences, moving the last running row into each hole."""
        if not finished:
            return
        gone = set(map(id, finished))
        rows = sorted((i for i, s in enumerate(self._running) if id(s) in gone), reverse=True)
        for row in rows:
            last = len(self._running) - 1
            if row != last:
                mover = self._running[last]
                self.runner.cache.move_row(last, row, mover.num_cached)
                self._running[row] = mover
            self._running.pop()

    def _fail_running(self, message: str, reason: str = "error") -> None:
        running, self._running = self._running, []
        if self._partial is not None:
            running.append(self._partial)
            self._partial = None
        for seq in running:
            self._finish(seq, reason, error=message)
        self.runner.lora_batch.clear()
