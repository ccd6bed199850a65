"""The model runner: batched prefill and decode forwards of the base model with every adapter.

It prepares the HF model once (vLLM's model runner, gpt-fast's setup): the multi-LoRA layers
with their page pool, the automatic merger, the slot KV cache owned by the attention modules,
and — with the compiled backend — one compiled decoder layer reused for every layer (weights,
LoRA pages and KV buffers are its inputs), warmed up at every shape class before traffic. Then
each forward gets token ids, positions and, per sequence, the adapters it applies; it returns
the logits of each sequence's last token. It knows nothing of requests or sampling.

A decode step is graph-safe: its inputs live in persistent device buffers (`StepBuffers`) filled with one copy,
its shapes come from host-side buckets (batch size when padding, key length, LoRA pages), and it reads nothing back
to the host. With `cuda_graphs` each bucket's forward is captured once and replayed (`server.engine.cuda_graphs`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from functools import partial

import numpy as np
import torch

from adapters.cpu.onednn import cpu_linear
from adapters.dtypes import torch_dtype
from adapters.layers import LoraMapping, wrap_multi_lora
from adapters.targets import layer_shape
from adapters.tiers.pool import LoraPool
from adapters.tiers.registry import Adapter
from server.engine.buffers import StepBuffers
from server.engine.config import EngineConfig
from server.engine.cuda_graphs import DecodeGraphs
from server.engine.kv_cache import ATTN_IMPLEMENTATION, SlotKVCache
from server.engine.merge import AutoMerger
from server.engine.model import BaseModel

# what a sequence applies: (adapter, its pool pages, its weight)
AdapterPages = list[tuple[Adapter, tuple[int, ...], float]]
MAX_COMPOSED = 17  # adapters one request may apply: `model` plus a composition of 16 (server.http.protocol)
KV_ALIGN = 16  # key lengths are rounded up to this (aligned rows for the attention kernels)


def _bucket(n: int) -> int:
    """Round up to a power of two, so compiled kernels (and captured graphs) see few distinct shapes."""
    return 1 << max(0, (n - 1).bit_length())


class ModelRunner:
    def __init__(self, base: BaseModel, config: EngineConfig) -> None:
        self.config = config
        self.max_len = min(config.max_model_len, base.max_model_len)
        self.device = base.device
        model = base.model
        model.config._attn_implementation = ATTN_IMPLEMENTATION
        self.backbone = model.base_model
        # transformers renamed `past_key_values` to `cache` (5.2x; the old name is deprecated until 5.40)
        self._cache_kw = "cache" if "cache" in inspect.signature(self.backbone.forward).parameters else "past_key_values"
        # the frozen layers' kernels, chosen once: oneDNN (on packed weights) for fp32 nn.Linear on the CPU
        frozen = partial(cpu_linear, pack=config.pack_weights)
        self.lm_head = frozen(model.get_output_embeddings())
        # which layers an adapter targets is a Python-set test: only eager, uncaptured forwards can make it
        self.lora_mapping = LoraMapping(check_targets=config.lora_backend == "eager" and not config.cuda_graphs)
        lora_dtype = None if config.lora_dtype == "auto" else torch_dtype(config.lora_dtype)
        self.layers = wrap_multi_lora(
            model, self.lora_mapping, config.lora_pages, config.lora_page_size, lora_dtype, base=frozen
        )
        self.pool = LoraPool(self.layers, config.lora_pages, config.lora_page_size, base.device)
        self.merger = (
            AutoMerger(self.layers, self.pool, config.merge_threshold, config.merge_window) if config.auto_merge else None
        )
        self.dtype = next(model.parameters()).dtype
        # rows 0..max_num_seqs-1 for sequences, one more for the padding rows of a bucketed decode batch to write to
        self.scratch_row = config.max_num_seqs
        self.cache = SlotKVCache(config.max_num_seqs + 1, self.max_len, self.dtype, base.device)
        heads = model.config.num_attention_heads
        kv_heads = getattr(model.config, "num_key_value_heads", None) or heads
        for m in model.modules():
            if hasattr(m, "layer_idx") and hasattr(m, "head_dim"):  # the attention modules
                self.cache.attach(m, kv_heads, m.head_dim)
        rows, per_adapter = config.max_num_seqs, -(-config.max_lora_rank // config.lora_page_size)
        self.max_pages = _bucket((MAX_COMPOSED + 1) * per_adapter)  # + the merged adapter's correction
        self.buffers = StepBuffers({
            "ids": (torch.long, (rows,)), "positions": (torch.long, (rows,)), "cache_rows": (torch.long, (rows,)),
            "lengths": (torch.long, (rows,)), "pages": (torch.long, (rows, self.max_pages)),
            "page_weights": (torch.float32, (rows, self.max_pages)),
            "slots": (torch.long, (rows, rows)), "inverse": (torch.long, (rows,)), "order": (torch.long, (rows,)),
            "temperature": (torch.float32, (rows,)), "top_p": (torch.float32, (rows,)),
        }, base.device)  # fmt: skip
        self.pad_batches = config.cuda_graphs  # padding buys nothing without captured graphs
        # decode rows that share pages: one shrink/expand per page set, or per row (see EngineConfig.decode_grouping)
        compiled_cpu = config.lora_backend == "compiled" and base.device.type == "cpu"
        self.group_decode = config.decode_grouping == "on" or (config.decode_grouping == "auto" and not compiled_cpu)
        self.graphs = DecodeGraphs(base.device) if config.cuda_graphs and base.device.type == "cuda" else None
        if config.lora_backend == "compiled":
            self.enter_thread()
            blocks = set(getattr(model, "_no_split_modules", None) or ())
            for m in model.modules():
                if type(m).__name__ in blocks:
                    # dims turn dynamic once they vary (the warmup makes them); the guards on the
                    # wrapped nn.Linear / Conv1D internals are skipped: those never change in place
                    m.compile(dynamic=None, options={"guard_filter_fn": torch.compiler.skip_guard_on_inbuilt_nn_modules_unsafe})
        tok = base.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.stance = "default"  # torch.compile's: "force_eager" while a warm-up is pending
        self._warm: list[Callable[[], None]] = []
        self.warm_progress = (0, 0)

    def enter_thread(self) -> None:
        """Ready the calling thread to run (and, for a shape the warm-up missed, compile) the compiled forwards:
        torch's dynamo config is per thread, and its default recompile limit (8) is below the warm-up's graph count."""
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)

    def layer_shapes(self) -> dict[str, tuple[int, int]]:
        """{module path: (in, out)} of every adaptable layer, for validating adapters."""
        return {name: layer_shape(layer.base_layer) for name, layer in self.layers.items()}

    def warmup(self, progress: Callable[[int, int], None] = lambda done, total: None) -> None:
        """Run every kind of forward (prefill and decode, with and without LoRA pages) at several
        sizes, so that the compiled graphs exist, shape-generic, before traffic; `progress(done, total)` after each."""
        self.start_warmup()
        while self.warm_next():
            progress(*self.warm_progress)

    def start_warmup(self) -> None:
        """Plan the warm-up, to run one forward at a time (`warm_next`); until it is done, forwards run eagerly
        (the compiled backend's graphs do not exist yet: serving need not wait for them)."""
        self._warm = list(self._warm_steps())
        self.warm_progress = (0, len(self._warm))
        self.stance = "force_eager"

    @property
    def warming(self) -> bool:
        return bool(self._warm)

    def warm_next(self) -> bool:
        """Run the next warm-up forward (it compiles its graph, with the compiled backend); whether more remain.
        It writes the cache rows it uses: only call it while no sequence is running."""
        if not self._warm:
            return False
        step = self._warm.pop(0)
        self.stance = "default"
        try:
            with torch.inference_mode():
                step()
        finally:
            self.lora_mapping.clear()
            self.stance = "force_eager" if self._warm else "default"
        self.warm_progress = (self.warm_progress[1] - len(self._warm), self.warm_progress[1])
        return bool(self._warm)

    def _warm_steps(self) -> Iterator[Callable[[], None]]:
        # batch 1 specializes apart from batch >= 2, so each gets two prompt lengths / cache lengths
        batches = sorted({1, min(2, self.config.max_num_seqs), min(3, self.config.max_num_seqs)})
        for pages in (0, 1, 2):
            for n in batches:
                for t in (3, 5):  # prefills: a segment per prompt, and one for all (the same pages, see _lora)
                    for segments in {n, 1} if pages else {n}:
                        yield partial(self._warm_prefill, n, t, pages, segments)
                for kv in self._warm_kv:  # decode steps, every row its own pages
                    yield partial(self._warm_decode, n, kv, ("gathered", pages, 0, 0) if pages else ("none", 0, 0, 0))
                if pages and n > 1 and self.group_decode:  # decode steps of rows on the same pages (_stage_lora)
                    for kv in self._warm_kv:
                        yield partial(self._warm_decode, n, kv, ("segmented", pages, 1, 0))
            for u, m in ((1, 2), (2, 2), (2, 3)) if pages and self.group_decode else ():  # rows sharing their pages,
                for n in (u * m, u * m + 1):  # with and without rows outside the groups
                    if n <= self.config.max_num_seqs:
                        for kv in self._warm_kv:
                            yield partial(self._warm_decode, n, kv, ("grouped", pages, u, m))
            # tokens after cached ones: later chunks of a long prompt (one row), prompts with a cached prefix (several)
            rows = (1, min(2, self.config.max_num_seqs)) if self.config.prefix_caching else (1,)
            for n in rows if self.config.prefill_chunk or self.config.prefix_caching else ():
                for t, start in ((3, 4), (5, 6)):
                    for segments in {n, 1} if pages else {n}:
                        yield partial(self._warm_chunk, n, t, start, pages, segments)

    def _warm_chunk(self, n: int, t: int, start: int, pages: int, segments: int) -> None:
        """n rows, the last ones, each t tokens after `start` cached ones (a chunk, a cached prefix)."""
        row0 = self.config.max_num_seqs - n
        pos = torch.arange(start, start + t, device=self.device)[None].repeat(n, 1)
        self.cache.prepare_extend(row0, pos, start + t)
        self._set_mapping(self._zero_lora(segments, pages), frozenset(), mode="segmented")
        self._forward(torch.full((n, t), self.pad_id, dtype=torch.long, device=self.device), pos)
        self.lora_mapping.clear()

    @property
    def _warm_kv(self) -> list[int]:
        return sorted({min(KV_ALIGN, self.max_len), min(2 * KV_ALIGN, self.max_len)})

    def _warm_decode(self, n: int, kv: int, lora: tuple[str, int, int, int]) -> None:
        """A decode step of rows 0..n-1 at position kv - 1, LoRA operands `lora` on zero pages (page 0 adds
        nothing; groups of rows in order)."""
        host = self.buffers.write()
        host["ids"][:n], host["positions"][:n], host["cache_rows"][:n] = self.pad_id, kv - 1, np.arange(n)
        host["lengths"][:n], host["pages"][:n], host["page_weights"][:n] = kv, 0, 0.0
        mode, _, u, m = lora
        host["slots"][:u, :m], host["inverse"][:n] = np.arange(u * m).reshape(u, m), np.minimum(np.arange(n), u * m)
        if mode == "gathered":
            host["order"][:n] = host["inverse"][:n] = np.arange(n)
        self.buffers.upload()
        self._decode_forward(n, kv, lora, frozenset())

    def _zero_lora(self, segments: int, pages: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`pages` zero pages (page 0 adds nothing) for each of `segments` rows, or None for no LoRA term."""
        if not pages:
            return None
        zeros = torch.zeros(segments, pages, dtype=torch.long, device=self.device)
        return zeros, zeros.to(self.dtype)

    def _warm_prefill(self, n: int, t: int, pages: int, segments: int) -> None:
        self.cache.prepare_prefill(0, n, t)
        self._set_mapping(self._zero_lora(segments, pages), frozenset(), mode="segmented")
        self._forward(torch.full((n, t), self.pad_id, dtype=torch.long, device=self.device),
                      torch.arange(t, device=self.device)[None].expand(n, t))  # fmt: skip
        self.lora_mapping.clear()

    # ---- forwards -------------------------------------------------------------------------------

    def prefill(self, row0: int, prompts: list[list[int]], adapters: list[AdapterPages],
                starts: list[int] | None = None) -> torch.Tensor:  # fmt: skip
        """Prompts into cache rows row0.. (right-padded); returns (n, vocab) float32 last-token logits. With `starts`
        each row already holds its first starts[i] tokens (a cached prefix, earlier chunks of a long prompt) and
        `prompts` are the tokens that follow them (vLLM's chunked prefill and prefix caching)."""
        n, lens = len(prompts), [len(p) for p in prompts]
        t = max(lens)
        ids = np.full((n, t), self.pad_id, dtype=np.int64)
        for i, p in enumerate(prompts):
            ids[i, : lens[i]] = p
        self.buffers.upload()  # the sampling fields staged for these sequences
        self.pool.wait_loaded()  # adapter pages copied on the pool's stream are in place before the step reads them
        if starts is None or not any(starts):  # from position 0: causal attention over the fresh keys only
            positions = torch.arange(t, device=self.device)[None].expand(n, t)
            self.cache.prepare_prefill(row0, n, t)
        else:  # after cached tokens; a padding token's position is clamped into the row (what it writes is unread)
            positions = self._to_device(np.minimum(np.asarray(starts)[:, None] + np.arange(t), self.max_len - 1))
            self.cache.prepare_extend(row0, positions, max(s + k for s, k in zip(starts, lens)))
        lora, keys = self._lora(adapters)
        self._set_mapping(lora, keys, mode="segmented")
        try:
            hidden = self._forward(self._to_device(ids), positions)
        finally:
            self.lora_mapping.clear()
        last = hidden[torch.arange(n, device=self.device), self._to_device(np.array(lens)) - 1]
        return self._logits(last)

    def decode(self, tokens: list[int], positions: list[int], adapters: list[AdapterPages]) -> torch.Tensor:
        """One token for each of cache rows 0..n-1 at `positions`; returns (n, vocab) float32 logits.

        Everything the forward reads is staged on the host and uploaded with one copy; nothing is read back."""
        n = len(tokens)
        b = min(_bucket(n), self.config.max_num_seqs) if self.pad_batches else n
        host = self.buffers.write()
        host["ids"][:n], host["ids"][n:b] = tokens, self.pad_id
        host["positions"][:n], host["positions"][n:b] = positions, 0
        host["cache_rows"][:n], host["cache_rows"][n:b] = np.arange(n), self.scratch_row  # padding writes there
        host["lengths"][:n], host["lengths"][n:b] = np.asarray(positions) + 1, 1
        lora, keys = self._stage_lora(host, adapters, b)
        self.buffers.upload()
        self.pool.wait_loaded()
        kv_len = self._kv_bucket(max(positions) + 1)
        if self.graphs is not None:
            return self.graphs.run((b, kv_len, lora), lambda: self._decode_forward(b, kv_len, lora, keys))[:n]
        return self._decode_forward(b, kv_len, lora, keys)[:n]

    def _decode_forward(self, b: int, kv_len: int, lora: tuple[str, int, int, int], keys: frozenset[int]) -> torch.Tensor:
        """The decode forward of the first b staged rows, attending to kv_len keys, with the staged LoRA operands
        `lora` = (mode, pages per row, groups, rows per group)."""
        d = self.buffers.dev
        positions = d["positions"][:b, None]
        self.cache.prepare_decode(d["cache_rows"][:b], positions, d["lengths"][:b], kv_len)
        mode, k, u, m = lora
        if mode == "gathered":
            self._set_mapping((d["pages"][:b, :k], d["page_weights"][:b, :k]), keys, mode, d["order"][:b],
                              d["inverse"][:b])  # fmt: skip
        elif mode == "segmented":
            self._set_mapping((d["pages"][:1, :k], d["page_weights"][:1, :k]), keys, mode)
        elif mode == "grouped":
            self._set_mapping((d["pages"][:u, :k], d["page_weights"][:u, :k]), keys, mode, d["slots"][:u, :m],
                              d["inverse"][:b])  # fmt: skip
        try:
            return self._logits(self._forward(d["ids"][:b, None], positions)[:, -1])
        finally:
            self.lora_mapping.clear()

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        with torch.compiler.set_stance(self.stance):
            out = self.backbone(input_ids=input_ids, position_ids=position_ids, attention_mask=None, use_cache=True,
                                **{self._cache_kw: self.cache})  # fmt: skip
        return out.last_hidden_state

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        # a copy made here (an inference tensor, as the warm-up's): compiled graphs guard on dispatch keys
        return torch.tensor(array, device=self.device)

    def _kv_bucket(self, n: int) -> int:
        """The key length a decode step attends to: n rounded up (to a power of two with captured graphs)."""
        aligned = -(-n // KV_ALIGN) * KV_ALIGN
        return min(_bucket(aligned) if self.graphs is not None else aligned, self.max_len)

    # ---- adapters ---------------------------------------------------------------------------

    def _rows(self, adapters: list[AdapterPages]) -> list[list[tuple[tuple[int, ...], float]]]:
        """Per sequence, the (pages, weight) it applies on top of the current (possibly merged) base weights."""
        m = self.merger
        return [m.corrected(a) if m else [(p, w) for _, p, w in a] for a in adapters]

    def _keys(self, adapters: list[AdapterPages]) -> frozenset[int]:
        keys = {a.key for seq in adapters for a, _, _ in seq}
        if self.merger and self.merger.merged is not None:
            keys.add(self.merger.merged.key)
        return frozenset(keys)

    @staticmethod
    def _fill(pages: np.ndarray, weights: np.ndarray, rows: list[list[tuple[tuple[int, ...], float]]]) -> None:
        for i, r in enumerate(rows):
            col = 0
            for p, w in r:
                pages[i, col : col + len(p)] = p
                weights[i, col : col + len(p)] = w
                col += len(p)

    def _lora(self, adapters: list[AdapterPages]):
        """(pages, weights) device tensors of a prefill (one row per sequence, or one for all on the same pages),
        or None without a LoRA term; and the adapter keys."""
        rows = self._rows(adapters)
        if not any(rows):
            return None, frozenset()  # base rows only (or only the merged adapter's): no LoRA term at all
        if len(rows) > 1 and all(r == rows[0] for r in rows):
            rows = rows[:1]  # every prompt on the same pages: one segment of all their tokens (two plain GEMMs)
        k = _bucket(max(sum(len(p) for p, _ in r) for r in rows))
        pages, weights = np.zeros((len(rows), k), dtype=np.int64), np.zeros((len(rows), k), dtype=np.float32)
        self._fill(pages, weights, rows)
        return (self._to_device(pages), self._to_device(weights)), self._keys(adapters)

    def _stage_lora(self, host: dict[str, np.ndarray], adapters: list[AdapterPages], b: int
                    ) -> tuple[tuple[str, int, int, int], frozenset[int]]:  # fmt: skip
        """Stage a decode step's LoRA operands for rows 0..b-1, the op chosen by how rows share pages: every row on
        the same pages, one segment (two plain GEMMs); rows sharing pages two or more to a set, grouped (each set
        read once); else, or without `group_decode`, gathered per row, the rows taken in the order of their pages
        (each set's rows together) where several sets are shared two or more rows to a set. Returns (mode, pages per
        row, groups, rows per group) and the keys."""
        rows = self._rows(adapters)
        users = [i for i, r in enumerate(rows) if r]
        if not users:
            return ("none", 0, 0, 0), frozenset()  # base rows only (or only the merged adapter's)
        k = _bucket(max(sum(len(p) for p, _ in rows[i]) for i in users))
        sets: dict[tuple, list[int]] = {}  # rows by the pages they apply
        for i in users:
            sets.setdefault(tuple(rows[i]), []).append(i)
        pad = _bucket if self.graphs is not None else (lambda x: x)
        shared = len(users) >= 2 * len(sets)
        if not self.group_decode or not shared:
            mode, table, u, m = "gathered", rows, 0, 0
            order = list(range(b))  # all different, or all alike: the order changes nothing
            if shared and len(sets) > 1:
                order = [i for members in sets.values() for i in members]
                order += [i for i in range(b) if i >= len(rows) or not rows[i]]  # base rows, then padding
                table = [rows[i] for i in order[: len(rows)]]
            host["order"][:b], host["inverse"][order] = order, np.arange(b)
        elif len(sets) == 1 and len(users) == len(rows) > 1:
            mode, table, u, m = "segmented", [list(next(iter(sets)))], 1, 0
        else:
            mode, table = "grouped", [list(s) for s in sets]
            u, m = pad(len(sets)), pad(max(map(len, sets.values())))
            host["slots"][:u, :m], host["inverse"][:b] = b, u * m  # padding: the zero row in, no term out
            for g, members in enumerate(sets.values()):
                host["slots"][g, : len(members)] = members
                host["inverse"][members] = g * m + np.arange(len(members))
        host["pages"][: max(len(table), u, b), :k], host["page_weights"][: max(len(table), u, b), :k] = 0, 0.0
        self._fill(host["pages"], host["page_weights"], table)
        return (mode, k, u, m), self._keys(adapters)

    def _set_mapping(self, lora, keys: frozenset[int], mode: str, slots: torch.Tensor | None = None,
                     inverse: torch.Tensor | None = None) -> None:  # fmt: skip
        if lora is None:
            self.lora_mapping.clear()
            return
        pages, weights = lora
        g = self.pool.page_size
        weights = weights.to(self.dtype)[:, :, None].expand(-1, -1, g)  # (R, K, G): one weight per page's rows
        self.lora_mapping.set(pages, weights, keys, mode, slots, inverse)
