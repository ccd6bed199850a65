"""SwitchLoRA: switches keep the function, frozen counterparts, per-vector Adam steps, schedule, export, resume."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from adapters.targets import select_targets
from adapters.training.switchlora import (
    StepAdamW,
    SwitchLoraLinear,
    SwitchScheduler,
    export_switchlora,
    init_bounds,
    inject_switchlora,
    switchlora_param_groups,
)


def make_layer(kind: str, in_features: int = 24, out_features: int = 16, r: int = 4, alpha: float = 8, seed: int = 0):
    torch.manual_seed(seed)
    base = nn.Linear(in_features, out_features) if kind == "linear" else Conv1D(out_features, in_features)
    with torch.no_grad():
        base.weight.normal_(0, 0.1)
    return SwitchLoraLinear(base, r, alpha, torch.Generator().manual_seed(seed))


class Tiny(nn.Module):
    """Two nn.Linear and a GPT-2 Conv1D (weight stored (in, out)); fc2 has only 2 spare candidates."""

    def __init__(self):
        super().__init__()
        self.fc1, self.proj, self.fc2 = nn.Linear(12, 20), Conv1D(12, 20), nn.Linear(12, 6)

    def forward(self, x):
        return self.fc2(torch.tanh(self.proj(torch.tanh(self.fc1(x)))))


def batch(t: int):
    g = torch.Generator().manual_seed(1000 + t)
    return torch.randn(16, 12, generator=g), torch.randn(16, 6, generator=g)


def setup(model_seed=0, lora_seed=0, sched_seed=3, total_steps=40, **sched):
    torch.manual_seed(model_seed)
    model = Tiny()
    layers = inject_switchlora(model, select_targets(model, ["fc1", "proj", "fc2"]), r=4, alpha=8, seed=lora_seed)
    opt = StepAdamW(switchlora_param_groups(layers, weight_decay=0.01), lr=1e-2)
    defaults = dict(interval0=4, ratio=0.5, warm_steps=2, seed=sched_seed)
    return model, layers, opt, SwitchScheduler(layers, opt, total_steps, **(defaults | sched))


def train(model, opt, sched, steps):
    switched = 0
    for t in steps:
        x, y = batch(t)
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        switched += sched.step(t)
        opt.step()
        opt.zero_grad()
    return switched


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_init_follows_the_paper(kind):
    layer = make_layer(kind, in_features=24, out_features=16, r=4)
    c, r = 16, 4
    assert layer.cand_A.shape == (c, 24) and layer.cand_B.shape == (c, 16)
    assert layer.lora_A.shape == (4, 24) and layer.lora_B.shape == (16, 4)
    bound_a, bound_b = init_bounds(24, 16, 4)
    assert layer.cand_A.abs().max() <= bound_a and layer.cand_B.abs().max() <= bound_b
    assert layer.cand_A.std() > 0.5 * bound_a / math.sqrt(3)  # uniform, not zero
    # A starts from the last r candidates, B from the same ones shifted by r/2
    assert torch.equal(layer.lora_A, layer.cand_A[c - r :])
    assert torch.equal(layer.lora_B.T, layer.cand_B[c - r :].roll(r // 2, dims=0))
    assert not layer.base_layer.weight.requires_grad and layer.lora_A.requires_grad
    # W absorbed −scaling·B·A: the wrapped layer starts as the plain one (the authors' layer2lora)
    torch.manual_seed(0)
    plain = nn.Linear(24, 16) if kind == "linear" else Conv1D(16, 24)
    with torch.no_grad():
        plain.weight.normal_(0, 0.1)
    x = torch.randn(3, 24)
    torch.testing.assert_close(layer(x), plain(x), atol=1e-5, rtol=0)
    assert (layer.scaling * layer.lora_B @ layer.lora_A).abs().max() > 0.05  # and the LoRA term is not zero
    with pytest.raises(ValueError, match="r must be"):
        make_layer(kind, in_features=24, out_features=16, r=17)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_switching_keeps_the_function(kind):
    layer = make_layer(kind, in_features=40, out_features=24, r=16)
    opt = StepAdamW(switchlora_param_groups({"l": layer}))
    # interval ≈ 2: about r/2 = 8 vectors per side and step, as many as the cap allows
    sched = SwitchScheduler({"l": layer}, opt, total_steps=10**6, interval0=2, warm_steps=1)
    x = torch.randn(5, 3, 40)
    for t in range(6):
        before, w = layer(x), layer.weight_oi().clone()
        a, b, cand_a = layer.lora_A.detach().clone(), layer.lora_B.detach().clone(), layer.cand_A.clone()
        switched = sched.step(t)
        assert switched >= 10
        torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=0)
        rows = (a != layer.lora_A).any(1).nonzero().flatten()
        assert len(rows) == switched // 2 and (b != layer.lora_B).any(0).sum() == switched // 2
        # the trained rows went back into the bank, the new rows came out of it
        assert all((layer.cand_A == a[i]).all(1).any() for i in rows)
        assert all((cand_a == layer.lora_A[i]).all(1).any() for i in rows)
        assert (layer.weight_oi() - w).abs().max() > 1e-2  # W absorbed the switched directions


def test_counterpart_is_frozen_then_trains_again():
    torch.manual_seed(0)
    layer = make_layer("linear", r=4)
    opt = StepAdamW(switchlora_param_groups({"l": layer}), lr=1e-2)
    warm, switch_at = 3, 4
    sched = SwitchScheduler({"l": layer}, opt, total_steps=100, interval0=2 * warm, warm_steps=warm)
    sched.interval = lambda t: 2.0 if t == switch_at else math.inf  # switch r/2 = 2 vectors per side at one step
    x, y = torch.randn(32, 24), torch.randn(32, 16)
    for t in range(switch_at + warm + 1):
        ((layer(x) - y) ** 2).mean().backward()
        assert sched.step(t) == (4 if t == switch_at else 0)
        if t == switch_at:
            cols = (sched.frozen_b["l"] > 0).nonzero().flatten()  # B columns of the switched A rows
            rows = (sched.frozen_a["l"] > 0).nonzero().flatten()  # A rows of the switched B columns
            assert len(cols) == 2 and len(rows) == 2 and set(cols.tolist()).isdisjoint(rows.tolist())
            st_a, st_b = opt.state[layer.lora_A], opt.state[layer.lora_B]
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert (st_b[key][:, cols] == 0).all() and (st_a[key][rows] == 0).all()
            others = torch.ones(4, dtype=torch.bool)
            others[cols] = False
            assert (st_b["exp_avg"][:, others] != 0).all() and (st_b["step"][:, others] == switch_at).all()
        frozen = switch_at <= t < switch_at + warm
        if t >= switch_at:
            b, a = layer.lora_B.detach().clone(), layer.lora_A.detach().clone()
            grad_zero = (layer.lora_B.grad[:, cols] == 0).all() and (layer.lora_A.grad[rows] == 0).all()
            assert grad_zero == frozen
        opt.step()
        opt.zero_grad()
        if t >= switch_at:
            unchanged = torch.equal(layer.lora_B[:, cols], b[:, cols]) and torch.equal(layer.lora_A[rows], a[rows])
            assert unchanged == frozen
    # per-vector steps: the reset vectors count from the switch, the others from the start
    steps_b = opt.state[layer.lora_B]["step"].flatten()
    assert steps_b[cols].tolist() == [warm + 1] * 2
    assert sorted(set(steps_b.tolist())) == [warm + 1, switch_at + warm + 1]


def test_reset_vector_restarts_its_adam():
    g = torch.Generator().manual_seed(0)
    a, b = nn.Parameter(torch.randn(5, 7, generator=g)), nn.Parameter(torch.randn(7, 5, generator=g))
    opt = StepAdamW([{"params": [a], "vector_dim": 0}, {"params": [b], "vector_dim": 1}], lr=0.1, weight_decay=0.1)
    opt.reset_vectors(a, torch.tensor([1]), 0)  # no state yet: a no-op
    for _ in range(3):
        a.grad, b.grad = torch.randn(5, 7, generator=g), torch.randn(7, 5, generator=g)
        opt.step()
    opt.reset_vectors(a, torch.tensor([1]), 0)
    opt.reset_vectors(b, torch.tensor([2]), 1)
    assert (opt.state[a]["exp_avg"][1] == 0).all() and (opt.state[b]["exp_avg_sq"][:, 2] == 0).all()
    # from here row 1 of a evolves exactly like a fresh AdamW on that row alone
    row = nn.Parameter(a[1].detach().clone())
    ref = torch.optim.AdamW([row], lr=0.1, weight_decay=0.1)
    for _ in range(4):
        a.grad, b.grad = torch.randn(5, 7, generator=g), torch.randn(7, 5, generator=g)
        row.grad = a.grad[1].clone()
        opt.step()
        ref.step()
        torch.testing.assert_close(a[1], row, atol=1e-6, rtol=1e-5)
    assert opt.state[a]["step"].flatten().tolist() == [7, 4, 7, 7, 7]
    assert opt.state[b]["step"].flatten().tolist() == [7, 7, 4, 7, 7]
    with pytest.raises(ValueError, match="vector_dim"):
        opt.reset_vectors(a, torch.tensor([1]), 1)


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_step_adamw_without_resets_is_adamw(weight_decay):
    g = torch.Generator().manual_seed(1)
    shapes = [(5, 7), (7, 5), (3,), (4, 4)]
    ours = [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    kw = dict(lr=3e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=weight_decay)
    groups = [{"params": [ours[0]], "vector_dim": 0}, {"params": [ours[1]], "vector_dim": 1}, {"params": ours[2:]}]
    opt, ref = StepAdamW(groups, **kw), torch.optim.AdamW(theirs, **kw)
    for _ in range(25):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_interval_schedule_and_switch_counts():
    layers = {f"l{i}": make_layer("linear", 64, 64, r=8, seed=i) for i in range(8)}
    opt = StepAdamW(switchlora_param_groups(layers))
    total = 400
    sched = SwitchScheduler(layers, opt, total_steps=total, interval0=10, ratio=0.25, warm_steps=2)
    assert sched.interval(-1) == 10
    assert sched.interval(0) == pytest.approx(10 / 0.3 ** (1 / 100))
    assert sched.interval(99) == pytest.approx(10 / 0.3)  # one third of the rate at t + 1 = ratio·T
    assert sched.interval(199) == pytest.approx(10 / 0.09)
    counts = [sched.step(t) for t in range(total)]
    for name in layers:  # lock-step: one cursor per layer, k per side
        assert sched.cursor[name] > 0
    assert sum(sched.cursor.values()) * 2 == sum(counts)
    expected = sum(8 * 8 / sched.interval(t) for t in range(total))  # 8 layers, r = 8, per side
    assert sum(counts) / 2 == pytest.approx(expected, rel=0.12)  # ±3.5σ of the stochastic rounding
    assert sum(counts[:100]) > 2 * sum(counts[100:200]) > 0

    with pytest.raises(ValueError, match="interval0"):
        SwitchScheduler(layers, opt, total_steps=total, interval0=9, warm_steps=5)


def test_cap_never_freezes_both_sides_of_a_pair():
    layer = make_layer("linear", 40, 40, r=7)
    opt = StepAdamW(switchlora_param_groups({"l": layer}))
    sched = SwitchScheduler({"l": layer}, opt, total_steps=10**6, interval0=6, warm_steps=3)
    sched.interval = lambda t: 1.0  # ask for r vectors per step: only the cap limits
    for t in range(60):
        before_a, before_b = sched.frozen_a["l"].clone(), sched.frozen_b["l"].clone()
        a, b = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
        assert sched.step(t) > 0 or (before_a > 0).any()
        switched_a, switched_b = (a != layer.lora_A).any(1), (b != layer.lora_B).any(0)
        assert not (switched_a & (before_a > 0)).any() and not (switched_b & (before_b > 0)).any()
        assert not ((sched.frozen_a["l"] > 0) & (sched.frozen_b["l"] > 0)).any()


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_export_low_rank_delta_is_exact(kind):
    layer = make_layer(kind, 24, 16, r=3)
    w0 = layer.base_layer.weight.detach().clone()  # stored orientation: (in, out) for Conv1D
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a rank-2 change of W; with B·A (r = 3) ΔW has rank ≤ 5
        layer.weight_oi().add_(torch.randn(16, 2, generator=g) @ torch.randn(2, 24, generator=g))
    delta = layer.delta_weight(torch.float64) - (w0.T if kind == "conv1d" else w0).double()
    exported, energy = export_switchlora({"l": layer}, {"l": w0}, export_rank=5)
    lora_A, lora_B = exported["l"]
    assert lora_A.shape == (5, 24) and lora_B.shape == (16, 5) and lora_A.dtype == torch.float32
    assert energy == pytest.approx(1.0, abs=1e-9)
    torch.testing.assert_close((lora_B @ lora_A).double(), delta, atol=1e-5, rtol=0)
    # σ split as sqrt: B's columns and A's rows have equal norms
    torch.testing.assert_close(lora_B.norm(dim=0), lora_A.norm(dim=1))

    exported, _ = export_switchlora({"l": layer}, {"l": w0}, export_rank=20)  # > min(in, out): zero-padded
    assert exported["l"][0].shape == (20, 24) and (exported["l"][0][16:] == 0).all()


def test_export_truncates_and_reports_energy():
    layers = {"a": make_layer("linear", 24, 16, r=4, seed=1), "b": make_layer("conv1d", 12, 20, r=4, seed=2)}
    w0 = {name: layer.base_layer.weight.detach().clone() for name, layer in layers.items()}
    with torch.no_grad():
        for layer in layers.values():
            layer.base_layer.weight.add_(torch.randn_like(layer.base_layer.weight) * 0.1)  # full-rank ΔW
    exported, energy = export_switchlora(layers, w0, export_rank=2)
    kept = total = 0.0
    for name, layer in layers.items():
        delta = layer.delta_weight(torch.float64) - (w0[name].T if name == "b" else w0[name]).double()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        kept, total = kept + float((s[:2] ** 2).sum()), total + float((s**2).sum())
        lora_A, lora_B = exported[name]
        torch.testing.assert_close((lora_B @ lora_A).double(), (u[:, :2] * s[:2]) @ vh[:2], atol=1e-6, rtol=0)
    assert 0 < energy < 1 and energy == pytest.approx(kept / total, rel=1e-9)

    zero = make_layer("linear", 8, 8, r=2)
    with torch.no_grad():
        zero.lora_B.zero_()
    exported, energy = export_switchlora({"z": zero}, {"z": zero.base_layer.weight.detach().clone()}, 2)
    assert energy == 1.0 and all((t == 0).all() for t in exported["z"])


def test_resume_is_bit_exact():
    model, layers, opt, sched = setup()
    switched = train(model, opt, sched, range(30))
    assert switched > 0

    model2, _, opt2, sched2 = setup()
    train(model2, opt2, sched2, range(12))
    buf = io.BytesIO()
    torch.save({"model": model2.state_dict(), "opt": opt2.state_dict(), "sched": sched2.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)  # weights_only: tensors, dicts and ints only

    model3, _, opt3, sched3 = setup(model_seed=7, lora_seed=8, sched_seed=9)  # everything comes from the checkpoint
    model3.load_state_dict(ckpt["model"])
    opt3.load_state_dict(ckpt["opt"])
    sched3.load_state_dict(ckpt["sched"])
    assert train(model3, opt3, sched3, range(12, 30)) > 0
    expected, got = model.state_dict(), model3.state_dict()
    assert expected.keys() == got.keys() and any(k.endswith("cand_A") for k in got)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert sched.cursor == sched3.cursor


def test_tiny_llama_trains_with_switching(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).train()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    layers = inject_switchlora(model, select_targets(model, targets), r=8, alpha=8, seed=0)
    assert len(layers) == 14 and "model.layers.0.self_attn.q_proj" in layers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{s}" for n in layers for s in "AB"}
    w0 = {name: layer.base_layer.weight.detach().clone() for name, layer in layers.items()}
    opt = StepAdamW(switchlora_param_groups(layers), lr=1e-2)
    steps = 30
    sched = SwitchScheduler(layers, opt, total_steps=steps, interval0=10, ratio=1.0, warm_steps=2, seed=0)
    tokens = torch.randint(0, model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
    losses, switched = [], 0
    for t in range(steps):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        if t % 10 == 5:  # the switch itself leaves the logits unchanged
            with torch.no_grad():
                before = model(input_ids=tokens).logits
                switched += sched.step(t)
                torch.testing.assert_close(model(input_ids=tokens).logits, before, atol=5e-4, rtol=0)
        else:
            switched += sched.step(t)
        opt.step()
        opt.zero_grad()
    assert switched > 100
    assert losses[-1] < losses[0] - 1.0, losses
    assert all((layer.weight_oi() - w0[name]).abs().max() > 1e-3 for name, layer in layers.items())
    exported, energy = export_switchlora(layers, w0, export_rank=8)
    assert set(exported) == set(layers) and 0 < energy < 1


def test_lora_init_starts_at_b_zero_and_still_switches():
    """init="lora" (the authors' origin_lora): A Kaiming-uniform, B and its bank zero; switching fills B's bank with
    trained columns and keeps the function."""
    torch.manual_seed(0)
    base = nn.Linear(40, 24)
    w0 = base.weight.detach().clone()
    layer = SwitchLoraLinear(base, 8, 8, torch.Generator().manual_seed(0), init="lora")
    assert torch.equal(layer.base_layer.weight, w0)  # B·A = 0: nothing to absorb
    assert layer.lora_B.abs().max() == 0 and layer.cand_B.abs().max() == 0
    bound_a, _ = init_bounds(40, 24, 8, "lora")
    assert 0 < layer.lora_A.abs().max() <= bound_a
    opt = StepAdamW(switchlora_param_groups({"l": layer}), lr=1e-2)
    sched = SwitchScheduler({"l": layer}, opt, total_steps=10**6, interval0=2, warm_steps=1)
    x = torch.randn(16, 40)
    for t in range(8):
        layer(x).pow(2).mean().backward()
        before = layer(x).detach()
        sched.step(t)
        torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=0)
        opt.step()
        opt.zero_grad()
    assert layer.cand_B.abs().max() > 0  # trained columns went back into the bank
    with pytest.raises(ValueError, match="init must be"):
        init_bounds(40, 24, 8, "orthogonal")
