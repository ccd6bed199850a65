"""The engine: continuous batching of many requests, each with its own adapters, on one base model.

It runs in one thread of its own and knows nothing about HTTP. Every iteration it admits
waiting requests into free KV-cache rows (one batched prefill, their adapters made resident in
the LoRA pool), then runs one decode step over every running sequence, whatever adapter each
uses: the multi-LoRA layers add each token's own LoRA term inside the same batched matmuls
(vLLM's continuous batching with per-token adapter indices; S-LoRA's unified pool). Finished or
aborted sequences leave at once and their row is refilled by the last one, so the running
batch always occupies rows 0..n-1 of the cache.

Outputs go back through each request's `emit` callback, called from the engine thread.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from adapters.layers import LoraBatch, inject_multi_lora, layer_shape
from adapters.peft_io import LoraWeights
from adapters.pool import LoraPool, PoolFull
from adapters.registry import Adapter
from server.kv_cache import ATTN_IMPLEMENTATION, SlotKVCache
from server.merge import AutoMerger
from server.model import BaseModel
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


def _bucket(n: int) -> int:
    """Round a page count up to a power of two, so compiled kernels see few distinct shapes."""
    return 1 << max(0, (n - 1).bit_length())


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
        self.max_len = min(config.max_model_len, base.max_model_len)
        model = base.model
        model.config._attn_implementation = ATTN_IMPLEMENTATION
        self.backbone = model.base_model
        self.lm_head = model.get_output_embeddings()
        if config.lora_backend not in ("compiled", "eager"):
            raise ValueError(f"lora_backend must be 'compiled' or 'eager', not {config.lora_backend!r}")
        self.lora_batch = LoraBatch(check_targets=config.lora_backend == "eager")
        self.layers = inject_multi_lora(model, self.lora_batch, config.lora_pages, config.lora_page_size)
        self.pool = LoraPool(self.layers, config.lora_pages, config.lora_page_size, base.device)
        self.merger = AutoMerger(self.layers, self.pool, config.merge_threshold, config.merge_window) if config.auto_merge else None
        self.device = base.device
        self.cache = SlotKVCache(config.max_num_seqs, self.max_len, next(model.parameters()).dtype, base.device)
        kv_heads = getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads
        for m in model.modules():
            if hasattr(m, "layer_idx") and hasattr(m, "head_dim"):  # the attention modules
                self.cache.attach(m, kv_heads, m.head_dim)
        if config.lora_backend == "compiled":
            # regional compilation: every decoder layer runs the same compiled code (weights, LoRA
            # pages and KV buffers are its inputs), fusing the LoRA kernels with their neighbours
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
            blocks = set(getattr(model, "_no_split_modules", None) or ())
            for m in model.modules():
                if type(m).__name__ in blocks:
                    # dims turn dynamic once they vary (the warmup makes them); the guards on the
                    # wrapped nn.Linear / Conv1D internals are skipped: those never change in place
                    m.compile(dynamic=None, options={"guard_filter_fn": torch.compiler.skip_guard_on_inbuilt_nn_modules_unsafe})
        gen_eos = getattr(model.generation_config, "eos_token_id", None) if model.generation_config else None
        eos = {base.tokenizer.eos_token_id} | set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        self.eos_ids = sorted(e for e in eos if e is not None)
        self.pad_id = base.tokenizer.pad_token_id if base.tokenizer.pad_token_id is not None else (self.eos_ids or [0])[0]

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._incoming: deque[GenerationRequest] = deque()
        self._aborts: set[str] = set()
        self._drop_retired = False
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._thread: threading.Thread | None = None
        self._stop = False
        self.alive = False
        # counters read by the metrics
        self.tokens_generated = 0
        self.prompt_tokens = 0
        self.steps = 0

    # ---- outside world (any thread) -------------------------------------------------------

    def layer_shapes(self) -> dict[str, tuple[int, int]]:
        """{module path: (in, out)} of every adaptable layer, for validating adapters."""
        return {name: layer_shape(layer.base_layer) for name, layer in self.layers.items()}

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
        return len(self._running)

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
        """Run every kind of forward (prefill and decode, with and without LoRA pages) at several
        sizes, so that the compiled graphs exist, shape-generic, before traffic."""
        # batch 1 specializes apart from batch >= 2, so each gets two prompt lengths / cache lengths
        sizes = [(n, t, kv) for n in sorted({1, min(2, self.config.max_num_seqs), min(3, self.config.max_num_seqs)})
                 for t, kv in ((3, 3), (5, 5), (1, 4), (1, 6))]
        with torch.inference_mode():
            for pages in (None, 1, 2):
                for n, t, kv in sizes:
                    if t > 1:
                        self.cache.prepare_prefill(0, n, t)
                    else:
                        self.cache.prepare_decode(torch.full((n,), kv - 1, dtype=torch.long, device=self.device), kv)
                    if pages:  # page 0 is zero: a LoRA term that adds nothing
                        idx = torch.zeros(n, pages, dtype=torch.long, device=self.device)
                        w = torch.zeros(n, pages, self.pool.page_size, dtype=self.cache.dtype, device=self.device)
                        self.lora_batch.set(idx, w, frozenset(), per_request=t > 1)
                    ids = torch.full((n, t), self.pad_id, dtype=torch.long, device=self.device)
                    pos = torch.arange(kv - t, kv, device=self.device)[None].repeat(n, 1)
                    mask = torch.ones(n, 1, t, kv, dtype=torch.bool, device=self.device).tril(kv - t)
                    self._forward(ids, pos, mask)
                    self.lora_batch.clear()

    # ---- engine thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        self.alive = True
        try:
            with torch.inference_mode():
                while True:
                    with self._wake:
                        while not (self._stop or self._incoming or self._aborts or self._waiting or self._running
                                   or self._drop_retired):
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
                        if self._waiting or self._running:
                            self._step()
                    except Exception as e:  # no request without an answer
                        log.exception("engine step failed")
                        self._fail_running(f"internal error in the engine: {e.__class__.__name__}")
        finally:
            self.alive = False
            self._fail_running("the server is shutting down")
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

    def _step(self) -> None:
        new = self._admit()
        if new:
            self._prefill(new)
        if self._running:
            self._decode()
        self.steps += 1

    def _admit(self) -> list[_Sequence]:
        new: list[_Sequence] = []
        longest = 0
        while self._waiting and len(self._running) + len(new) < self.config.max_num_seqs:
            seq = self._waiting[0]
            n = len(seq.req.prompt_ids)
            if new and max(longest, n) * (len(new) + 1) > self.config.max_prefill_tokens:
                break
            try:
                self._acquire_adapters(seq)
            except PoolFull as e:
                if self._running or new:
                    break  # rows come free as running sequences finish
                self._waiting.popleft()
                self._finish(seq, "error", error=str(e))
                continue
            self._waiting.popleft()
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

    def _set_lora(self, seqs: list[_Sequence], per_request: bool) -> None:
        """Tell every multi-LoRA layer which pool pages (and weights) each sequence of this forward uses."""
        rows = []
        for s in seqs:
            uses = [(u.adapter, p, u.weight) for u, p in s.lora]
            rows.append(self.merger.corrected(uses) if self.merger else [(p, w) for _, p, w in uses])
        if not any(rows):
            self.lora_batch.clear()  # base rows only (or only the merged adapter's): no LoRA term at all
            return
        k = _bucket(max(sum(p.shape[0] for p, _ in r) for r in rows))
        idx = torch.zeros(len(seqs), k, dtype=torch.long, device=self.device)
        w = torch.zeros(len(seqs), k, self.pool.page_size, dtype=self.cache.dtype, device=self.device)
        for i, r in enumerate(rows):
            col = 0
            for pages, weight in r:
                idx[i, col : col + pages.shape[0]] = pages
                w[i, col : col + pages.shape[0]] = weight
                col += pages.shape[0]
        keys = frozenset(a.key for s in seqs for a in s.acquired)
        if self.merger and self.merger.merged is not None:
            keys |= {self.merger.merged.key}
        self.lora_batch.set(idx, w, keys, per_request)

    def _causal_mask(self, n: int, t: int) -> torch.Tensor:
        return torch.ones(t, t, dtype=torch.bool, device=self.device).tril()[None, None].repeat(n, 1, 1, 1)

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.backbone(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids, past_key_values=self.cache, use_cache=True
        )
        return out.last_hidden_state

    def _prefill(self, new: list[_Sequence]) -> None:
        n = len(new)
        lens = [len(s.req.prompt_ids) for s in new]
        t = max(lens)
        ids = torch.full((n, t), self.pad_id, dtype=torch.long)
        for i, s in enumerate(new):
            ids[i, : lens[i]] = torch.tensor(s.req.prompt_ids)
        ids = ids.to(self.device)
        positions = torch.arange(t, device=self.device)[None].expand(n, t)
        self.cache.prepare_prefill(len(self._running), n, t)
        self._running.extend(new)  # from here on a failure answers them with the running batch
        self._set_lora(new, per_request=True)
        try:
            hidden = self._forward(ids, positions, self._causal_mask(n, t))
        finally:
            self.lora_batch.clear()
        last = hidden[torch.arange(n, device=self.device), torch.tensor(lens, device=self.device) - 1]
        for s in new:
            s.num_cached = len(s.req.prompt_ids)
            self.prompt_tokens += s.num_cached
        self._sample_and_emit(new, self.lm_head(last).float())

    def _decode(self) -> None:
        seqs = self._running
        if self.merger:
            self.merger.observe([_single_adapter(s) for s in seqs])
        ids = torch.tensor([[s.output_ids[-1]] for s in seqs], dtype=torch.long, device=self.device)
        positions = torch.tensor([s.num_cached for s in seqs], dtype=torch.long, device=self.device)
        kv_len = int(positions.max()) + 1
        mask = (torch.arange(kv_len, device=self.device)[None] <= positions[:, None])[:, None, None, :]
        self.cache.prepare_decode(positions, kv_len)
        self._set_lora(seqs, per_request=False)
        try:
            hidden = self._forward(ids, positions[:, None], mask)
        finally:
            self.lora_batch.clear()
        for s in seqs:
            s.num_cached += 1
        self._sample_and_emit(list(seqs), self.lm_head(hidden[:, -1]).float())

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
                self.cache.move_row(last, row, mover.num_cached)
                self._running[row] = mover
            self._running.pop()

    def _fail_running(self, message: str) -> None:
        running, self._running = self._running, []
        for seq in running:
            self._finish(seq, "error", error=message)
        self.lora_batch.clear()
