"""Every fast LoRA op against the plain-loop reference, on random inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adapters.cpu.onednn import onednn_linear
from adapters.ops import lora_gathered, lora_gathered_in_order, lora_grouped, lora_reference, lora_segmented

G = 8  # rows per page in these tests


def make_pool(pages: int, in_f: int, out_f: int, ranks: list[int], seed: int = 0):
    """A pool holding one adapter per rank in `ranks` (⌈r/G⌉ pages each, unused rows zero)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.zeros(pages, G, in_f)
    bt = torch.zeros(pages, G, out_f)
    owned, nxt = [], 1
    for r in ranks:
        n = -(-r // G)
        ps = torch.arange(nxt, nxt + n)
        nxt += n
        rows_a = a[ps].flatten(0, 1)
        rows_b = bt[ps].flatten(0, 1)
        rows_a[:r] = torch.randn(r, in_f, generator=g)
        rows_b[:r] = torch.randn(r, out_f, generator=g) * 0.1
        a[ps] = rows_a.view(n, G, in_f)
        bt[ps] = rows_b.view(n, G, out_f)
        owned.append(ps)
    return a, bt, owned


def token_map(owned: list[torch.Tensor], choice: list[list[tuple[int, float]]]):
    """pages (N, K) and weights (N, K, G) for tokens that each use [(adapter, weight), ...] ([] = base)."""
    k = max(1, max(sum(len(owned[a]) for a, _ in c) for c in choice))
    idx = torch.zeros(len(choice), k, dtype=torch.long)
    w = torch.zeros(len(choice), k, G)
    for i, c in enumerate(choice):
        col = 0
        for a, weight in c:
            n = len(owned[a])
            idx[i, col : col + n] = owned[a]
            w[i, col : col + n] = weight
            col += n
    return idx, w


@pytest.mark.parametrize("rank", [1, 3, 8, 16, 33, 64])
def test_gathered_matches_reference_single_rank(rank):
    a, bt, owned = make_pool(20, 24, 40, [rank, rank])
    choice = [[(0, 1.0)], [(1, 1.0)], [], [(0, 1.0)], [(1, 1.0)]]
    x = torch.randn(len(choice), 24)
    idx, w = token_map(owned, choice)
    ref = lora_reference(x, a, bt, idx, w)
    torch.testing.assert_close(lora_gathered(x, a, bt, idx, w), ref, rtol=1e-4, atol=1e-4)
    assert ref[2].abs().max() == 0  # the base row gets no LoRA term
    assert ref[0].abs().max() > 0


def test_mixed_ranks_base_rows_and_composition():
    a, bt, owned = make_pool(32, 16, 12, [1, 5, 8, 20, 64])
    choice = [[(0, 1.0)], [(4, 1.0)], [], [(1, 1.0)], [(2, 0.5), (3, -1.5)], [(3, 1.0)], [(4, 2.0), (0, 1.0)], []]
    x = torch.randn(len(choice), 16)
    idx, w = token_map(owned, choice)
    ref = lora_reference(x, a, bt, idx, w)
    torch.testing.assert_close(lora_gathered(x, a, bt, idx, w), ref, rtol=1e-4, atol=1e-4)
    # composition is the weighted sum of the single-adapter terms
    i2, w2 = token_map(owned, [[(2, 1.0)], [(3, 1.0)]])
    single = lora_reference(x[4:5].expand(2, -1), a, bt, i2, w2)
    torch.testing.assert_close(ref[4], 0.5 * single[0] - 1.5 * single[1], rtol=1e-4, atol=1e-4)


def test_batched_prefill_matches_reference():
    a, bt, owned = make_pool(16, 16, 12, [4, 12, 8])
    seqs = [[(0, 1.0)], [], [(1, 1.0)], [(2, 0.7), (0, 0.3)]]
    t = 5  # tokens per sequence, as in a padded prefill
    choice = [c for c in seqs for _ in range(t)]
    x = torch.randn(len(choice), 16)
    idx, w = token_map(owned, choice)
    ref = lora_reference(x, a, bt, idx, w)
    seg_pages, seg_w = token_map(owned, seqs)
    torch.testing.assert_close(lora_segmented(x, a, bt, seg_pages, seg_w), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("linear", [F.linear, onednn_linear], ids=["torch", "onednn"])
@pytest.mark.parametrize("seqs", [[[(1, 1.0)]] * 4, [[(2, 0.7), (0, 0.3)]] * 2, [[(0, 1.0)]]], ids=["one", "composed", "alone"])
def test_one_run_of_shared_pages_matches_reference(linear, seqs):
    """A prefill whose requests all use the same pages is one run: two plain GEMMs through `linear`."""
    a, bt, owned = make_pool(16, 16, 12, [4, 12, 8])
    t = 5
    x = torch.randn(len(seqs) * t, 16)
    idx, w = token_map(owned, [c for c in seqs for _ in range(t)])
    ref = lora_reference(x, a, bt, idx, w)
    assert ref.abs().max() > 0
    run_idx, run_w = token_map(owned, seqs[:1])
    torch.testing.assert_close(lora_segmented(x, a, bt, run_idx, run_w, linear), ref, rtol=1e-4, atol=1e-4)


def test_compiled_gathered_matches_reference():
    compiled = torch.compile(lora_gathered, dynamic=True)
    a, bt, owned = make_pool(24, 32, 48, [4, 16, 9])
    for n in (1, 7, 16):
        choice = [[(i % 3, 1.0)] if i % 4 else [] for i in range(n)]
        x = torch.randn(n, 32)
        idx, w = token_map(owned, choice)
        torch.testing.assert_close(compiled(x, a, bt, idx, w), lora_reference(x, a, bt, idx, w), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_narrow_pages_are_widened_as_read(dtype):
    """Pages stored in bf16 / fp16 (the engine's lora_dtype): every op computes in x's dtype, on the stored values."""
    a, bt, owned = make_pool(24, 32, 48, [4, 16, 9])
    a, bt = a.to(dtype), bt.to(dtype)
    seqs = [[(0, 1.0)], [], [(1, 1.0)], [(2, 0.7), (0, 0.3)]]
    x = torch.randn(len(seqs) * 3, 32)
    choice = [c for c in seqs for _ in range(3)]
    idx, w = token_map(owned, choice)
    ref = lora_reference(x, a.float(), bt.float(), idx, w)
    assert ref.dtype == torch.float32
    torch.testing.assert_close(lora_reference(x, a, bt, idx, w), ref)
    torch.testing.assert_close(lora_gathered(x, a, bt, idx, w), ref, rtol=1e-4, atol=1e-4)
    compiled = torch.compile(lora_gathered, dynamic=False)
    torch.testing.assert_close(compiled(x, a, bt, idx, w), ref, rtol=1e-4, atol=1e-4)
    seg_pages, seg_w = token_map(owned, seqs)
    torch.testing.assert_close(lora_segmented(x, a, bt, seg_pages, seg_w), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_op_on_each_device_and_dtype(device, dtype):
    """Activations and pages in `dtype` on `device`: every op against the reference computed in float64."""
    a, bt, owned = make_pool(24, 32, 48, [4, 16, 9])
    seqs = [[(0, 1.0)], [], [(1, 1.0)], [(2, 0.7), (0, -0.3)]]
    t = 3
    x = torch.randn(len(seqs) * t, 32)
    idx, w = token_map(owned, [c for c in seqs for _ in range(t)])
    seg_pages, seg_w = token_map(owned, seqs)
    ref = lora_reference(x.double(), a.to(dtype).double(), bt.to(dtype).double(), idx, w.double())
    on = dict(device=device, dtype=dtype)
    a, bt, x, w, seg_w = a.to(**on), bt.to(**on), x.to(**on), w.to(**on), seg_w.to(**on)
    idx, seg_pages = idx.to(device), seg_pages.to(device)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    for got in (lora_gathered(x, a, bt, idx, w), lora_segmented(x, a, bt, seg_pages, seg_w)):
        assert got.device.type == device.type and got.dtype == dtype
        torch.testing.assert_close(got.double().cpu(), ref, **tol)


def groups_of(owned, choice):
    """lora_grouped's operands for rows choosing [(adapter, weight), ...]: the distinct choices (base rows in no
    group), slots, inverse."""
    distinct = sorted({tuple(c) for c in choice if c})
    members = [[i for i, c in enumerate(choice) if tuple(c) == d] for d in distinct]
    m = max(map(len, members))
    slots = torch.full((len(distinct), m), len(choice), dtype=torch.long)
    inverse = torch.full((len(choice),), len(distinct) * m, dtype=torch.long)
    for g, rows in enumerate(members):
        slots[g, : len(rows)] = torch.tensor(rows)
        for j, row in enumerate(rows):
            inverse[row] = g * m + j
    pages, weights = token_map(owned, [list(d) for d in distinct])
    return pages, weights, slots, inverse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_matches_reference(dtype):
    a, bt, owned = make_pool(24, 32, 48, [4, 16, 9])
    # 4 rows on adapter 0, 2 on a composition, 1 base row, 3 on adapter 2: groups of unequal size
    choice = [[(0, 1.0)], [(2, 1.0)], [(0, 1.0)], [], [(1, 0.5), (2, 0.5)], [(0, 1.0)], [(2, 1.0)],
              [(1, 0.5), (2, 0.5)], [(0, 1.0)], [(2, 1.0)]]  # fmt: skip
    x = torch.randn(len(choice), 32).to(dtype)
    a, bt = a.to(dtype), bt.to(dtype)
    idx, w = token_map(owned, choice)
    ref = lora_reference(x.double(), a.double(), bt.double(), idx, w.double())
    pages, weights, slots, inverse = groups_of(owned, choice)
    weights = weights.to(dtype)
    got = lora_grouped(x, a, bt, pages, weights, slots, inverse)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(got.double(), ref, **tol)
    assert got[3].abs().max() == 0  # the base row is in no group


@pytest.mark.parametrize("compiled", [False, True])
def test_gathered_in_order_matches_reference(compiled):
    """Rows taken adapter by adapter (the order of `ModelRunner._stage_lora`'s gathered decode steps), base rows last;
    the result comes back in the rows' own order."""
    a, bt, owned = make_pool(24, 32, 48, [4, 16, 9])
    choice = [[(0, 1.0)], [(2, 1.0)], [(0, 1.0)], [], [(1, 0.5), (2, 0.5)], [(0, 1.0)], [(2, 1.0)],
              [(1, 0.5), (2, 0.5)], [(0, 1.0)], [(2, 1.0)]]  # fmt: skip
    x = torch.randn(len(choice), 32)
    idx, w = token_map(owned, choice)
    ref = lora_reference(x.double(), a.double(), bt.double(), idx, w.double())
    order = torch.tensor([0, 2, 5, 8, 1, 6, 9, 4, 7, 3])
    inverse = torch.argsort(order)
    op = torch.compile(lora_gathered_in_order, dynamic=False) if compiled else lora_gathered_in_order
    got = op(x, a, bt, idx[order], w[order], order, inverse)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)
    assert got[3].abs().max() == 0
