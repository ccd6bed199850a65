"""The model runner: batched prefill and decode forwards of the base model with every adapter.

It prepares the HF model once (vLLM's model runner, gpt-fast's setup): the multi-LoRA layers
with their page pool, the automatic merger, the slot KV cache owned by the attention modules,
and — with the compiled backend — one compiled decoder layer reused for every layer (weights,
LoRA pages and KV buffers are its inputs), warmed up at every shape class before traffic. Then
each forward gets token ids, positions and, per sequence, the adapters it applies; it returns
the logits of each sequence's last token. It knows nothing of requests or sampling.
"""

from __future__ import annotations

import inspect
from functools import partial

import torch

from adapters.cpu.onednn import cpu_linear
from adapters.dtypes import torch_dtype
from adapters.layers import LoraMapping, wrap_multi_lora
from adapters.targets import layer_shape
from adapters.tiers.pool import LoraPool
from adapters.tiers.registry import Adapter
from server.engine.config import EngineConfig
from server.engine.kv_cache import ATTN_IMPLEMENTATION, SlotKVCache
from server.engine.merge import AutoMerger
from server.engine.model import BaseModel

# what a sequence applies: (adapter, its pool pages, its weight)
AdapterPages = list[tuple[Adapter, torch.Tensor, float]]


def _bucket(n: int) -> int:
    """Round a page count up to a power of two, so compiled kernels see few distinct shapes."""
    return 1 << max(0, (n - 1).bit_length())


def _all_equal(rows: list[list[tuple[torch.Tensor, float]]]) -> bool:
    """Whether every sequence applies the same pages with the same weights."""
    keys = {tuple((tuple(pages.tolist()), w) for pages, w in r) for r in rows}
    return len(keys) == 1


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
        self.lora_mapping = LoraMapping(check_targets=config.lora_backend == "eager")
        lora_dtype = None if config.lora_dtype == "auto" else torch_dtype(config.lora_dtype)
        self.layers = wrap_multi_lora(
            model, self.lora_mapping, config.lora_pages, config.lora_page_size, lora_dtype, base=frozen
        )
        self.pool = LoraPool(self.layers, config.lora_pages, config.lora_page_size, base.device)
        self.merger = (
            AutoMerger(self.layers, self.pool, config.merge_threshold, config.merge_window) if config.auto_merge else None
        )
        self.dtype = next(model.parameters()).dtype
        self.cache = SlotKVCache(config.max_num_seqs, self.max_len, self.dtype, base.device)
        kv_heads = getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads
        for m in model.modules():
            if hasattr(m, "layer_idx") and hasattr(m, "head_dim"):  # the attention modules
                self.cache.attach(m, kv_heads, m.head_dim)
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

    def enter_thread(self) -> None:
        """Ready the calling thread to run (and, for a shape the warm-up missed, compile) the compiled forwards:
        torch's dynamo config is per thread, and its default recompile limit (8) is below the warm-up's graph count."""
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)

    def layer_shapes(self) -> dict[str, tuple[int, int]]:
        """{module path: (in, out)} of every adaptable layer, for validating adapters."""
        return {name: layer_shape(layer.base_layer) for name, layer in self.layers.items()}

    def warmup(self) -> None:
        """Run every kind of forward (prefill and decode, with and without LoRA pages) at several
        sizes, so that the compiled graphs exist, shape-generic, before traffic."""
        # batch 1 specializes apart from batch >= 2, so each gets two prompt lengths / cache lengths
        sizes = [(n, t, kv) for n in sorted({1, min(2, self.config.max_num_seqs), min(3, self.config.max_num_seqs)})
                 for t, kv in ((3, 3), (5, 5), (1, 4), (1, 6))]
        with torch.inference_mode():
            for pages in (None, 1, 2):
                for n, t, kv in sizes:
                    # a prefill of several prompts on the same pages is one segment of LoRA rows (see _set_lora)
                    for segments in {n, 1} if pages and t > 1 else {n}:
                        self._warm(n, t, kv, pages, segments)
                if self.config.prefill_chunk:  # later chunks of a long prompt, in the last row (see prefill_chunk)
                    for t, kv in ((3, 7), (5, 11)):
                        self._warm(1, t, kv, pages, 1, row0=self.config.max_num_seqs - 1)

    def _warm(self, n: int, t: int, kv: int, pages: int | None, segments: int, row0: int | None = None) -> None:
        """One forward of n sequences of t new tokens each, attending to kv, with `pages` zero LoRA pages per segment
        (t > 1: a prefill, or with `row0` a chunk after kv - t cached tokens; t = 1: a decode step)."""
        pos = torch.arange(kv - t, kv, device=self.device)[None].repeat(n, 1)
        if t > 1 and row0 is None:
            self.cache.prepare_prefill(0, n, t)
        else:
            self.cache.prepare_extend(row0 or 0, pos, kv)
        if pages:  # page 0 is zero: a LoRA term that adds nothing
            table = torch.zeros(segments, pages, dtype=torch.long, device=self.device)
            w = torch.zeros(segments, pages, self.pool.page_size, dtype=self.dtype, device=self.device)
            self.lora_mapping.set(table, w, frozenset(), segmented=t > 1)
        ids = torch.full((n, t), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.ones(n, 1, t, kv, dtype=torch.bool, device=self.device).tril(kv - t)
        self._forward(ids, pos, mask)
        self.lora_mapping.clear()

    def prefill(self, row0: int, prompts: list[list[int]], adapters: list[AdapterPages]) -> torch.Tensor:
        """Prompts into cache rows row0.. (right-padded); returns (n, vocab) float32 last-token logits."""
        n, lens = len(prompts), [len(p) for p in prompts]
        t = max(lens)
        ids = torch.full((n, t), self.pad_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : lens[i]] = torch.tensor(p)
        positions = torch.arange(t, device=self.device)[None].expand(n, t)
        mask = torch.ones(t, t, dtype=torch.bool, device=self.device).tril()[None, None].repeat(n, 1, 1, 1)
        self.cache.prepare_prefill(row0, n, t)
        hidden = self._forward_with_lora(ids.to(self.device), positions, mask, adapters, segmented=True)
        last = hidden[torch.arange(n, device=self.device), torch.tensor(lens, device=self.device) - 1]
        return self._logits(last)

    def prefill_chunk(self, row: int, ids: list[int], start: int, adapters: AdapterPages) -> torch.Tensor:
        """The prompt tokens at positions start.. of the sequence in cache row `row`, whose first `start` tokens are
        cached (vLLM's chunked prefill); returns (1, vocab) float32 logits of the last one."""
        if start == 0:
            return self.prefill(row, [ids], [adapters])
        pos = torch.arange(start, start + len(ids), device=self.device)[None]  # (1, t)
        return self._extend(row, [ids], pos, start + len(ids), [adapters], segmented=True)

    def decode(self, tokens: list[int], positions: list[int], adapters: list[AdapterPages]) -> torch.Tensor:
        """One token for each of cache rows 0..B-1 at `positions`; returns (B, vocab) float32 logits."""
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)[:, None]  # (B, 1)
        return self._extend(0, [[t] for t in tokens], pos, max(positions) + 1, adapters, segmented=False)

    def _extend(self, row0: int, ids: list[list[int]], pos: torch.Tensor, kv_len: int, adapters: list[AdapterPages],
                segmented: bool) -> torch.Tensor:  # fmt: skip
        """Tokens `ids` at positions `pos` (n, t) of cache rows row0..row0+n-1, each attending to its cached earlier
        tokens and its own up to its position; returns (n, vocab) float32 logits of each row's last token."""
        mask = (torch.arange(kv_len, device=self.device) <= pos[:, :, None])[:, None]  # (n, 1, t, kv_len)
        self.cache.prepare_extend(row0, pos, kv_len)
        tokens = torch.tensor(ids, dtype=torch.long, device=self.device)
        hidden = self._forward_with_lora(tokens, pos, mask, adapters, segmented)
        return self._logits(hidden[:, -1])

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def _forward_with_lora(self, ids, positions, mask, adapters: list[AdapterPages], segmented: bool) -> torch.Tensor:
        self._set_lora(adapters, segmented)
        try:
            return self._forward(ids, positions, mask)
        finally:
            self.lora_mapping.clear()

    def _set_lora(self, adapters: list[AdapterPages], segmented: bool) -> None:
        """Tell every multi-LoRA layer which pool pages (and weights) each sequence uses."""
        m = self.merger
        rows = [m.corrected(a) if m else [(p, w) for _, p, w in a] for a in adapters]
        if not any(rows):
            return  # base rows only (or only the merged adapter's): no LoRA term at all
        if segmented and len(rows) > 1 and _all_equal(rows):
            rows = rows[:1]  # every prompt on the same pages: one segment of all their tokens (two plain GEMMs)
        k = _bucket(max(sum(p.shape[0] for p, _ in r) for r in rows))
        table = torch.zeros(len(rows), k, dtype=torch.long, device=self.device)
        w = torch.zeros(len(rows), k, self.pool.page_size, dtype=self.dtype, device=self.device)
        for i, r in enumerate(rows):
            col = 0
            for pages, weight in r:
                table[i, col : col + pages.shape[0]] = pages
                w[i, col : col + pages.shape[0]] = weight
                col += pages.shape[0]
        keys = {a.key for seq in adapters for a, _, _ in seq}
        if m and m.merged is not None:
            keys.add(m.merged.key)
        self.lora_mapping.set(table, w, frozenset(keys), segmented)

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.backbone(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True, **{self._cache_kw: self.cache}
        )
        return out.last_hidden_state
