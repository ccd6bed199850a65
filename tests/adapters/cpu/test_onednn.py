"""The frozen base's oneDNN linear against F.linear, eager and inside a compiled graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adapters.cpu.onednn import OneDnnLinear, cpu_linear, onednn_linear, pack_weight, uses_onednn


@pytest.mark.parametrize("shape", [(7, 64), (3, 1, 64), (2, 5, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_is_f_linear(shape, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    w = torch.randn(96, 64, generator=g)
    b = torch.randn(96, generator=g) if bias else None
    torch.testing.assert_close(onednn_linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 16, 50])
def test_packed_linear_is_f_linear(rows):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(rows, 64, generator=g)
    w, b = torch.randn(96, 64, generator=g), torch.randn(96, generator=g)
    packed = pack_weight(w)
    assert packed.shape == w.shape
    torch.testing.assert_close(onednn_linear(x, packed, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(onednn_linear(x[:, None], packed, None), F.linear(x[:, None], w), rtol=1e-5, atol=1e-5)


def test_compiled_graph_takes_the_weight_as_an_input():
    """One compiled function serves layers of different weights (as the engine's decoder layer does)."""

    def block(x, w1, w2):
        return onednn_linear(torch.relu(onednn_linear(x, w1, None)), w2, None)

    def packed_block(x, p1, p2):
        return onednn_linear(torch.relu(onednn_linear(x, p1, None)), p2, None)

    compiled = torch.compile(block, dynamic=None)
    compiled_packed = torch.compile(packed_block, dynamic=None)
    g = torch.Generator().manual_seed(1)
    for rows in (3, 5, 16):
        x = torch.randn(rows, 1, 32, generator=g)
        w1, w2 = torch.randn(48, 32, generator=g), torch.randn(32, 48, generator=g)
        want = F.linear(torch.relu(F.linear(x, w1)), w2)
        torch.testing.assert_close(compiled(x, w1, w2), want, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(compiled_packed(x, pack_weight(w1), pack_weight(w2)), want, rtol=1e-5, atol=1e-4)


def test_used_for_fp32_cpu_weights_only():
    assert uses_onednn(torch.zeros(4, 4)) == torch.backends.mkldnn.is_available()
    assert not uses_onednn(torch.zeros(4, 4, dtype=torch.bfloat16))  # PyTorch sends these to oneDNN already
    assert not uses_onednn(torch.zeros(4, 4, device="meta"))


@pytest.mark.parametrize("pack", [False, True])
def test_onednn_linear_module_is_the_linear_it_replaces(pack):
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(2, 16)
    fast = cpu_linear(layer, pack)
    assert isinstance(fast, OneDnnLinear) == torch.backends.mkldnn.is_available()
    assert fast.weight is layer.weight and fast.bias is layer.bias  # the same parameters: state dicts keep their keys
    assert list(fast.state_dict()) == list(layer.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fast(x), layer(x), rtol=1e-5, atol=1e-5)
        layer.weight.mul_(2)  # an in-place change (a merge) reaches the packed copy once repacked
        if isinstance(fast, OneDnnLinear):
            fast.repack()
        torch.testing.assert_close(fast(x), layer(x), rtol=1e-5, atol=1e-5)


def test_only_fp32_cpu_linears_are_replaced():
    assert cpu_linear(bf16 := torch.nn.Linear(4, 4).bfloat16()) is bf16
    conv = torch.nn.Conv1d(4, 4, 1)
    assert cpu_linear(conv) is conv


@pytest.mark.parametrize("bias", [True, False])
def test_gradients_are_f_linear_gradients(bias):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 24, generator=g, requires_grad=True)
    w = torch.randn(40, 24, generator=g, requires_grad=True)
    b = torch.randn(40, generator=g, requires_grad=True) if bias else None
    up = torch.randn(2, 5, 40, generator=g)
    inputs = [t for t in (x, w, b) if t is not None]
    ours = torch.autograd.grad((onednn_linear(x, w, b) * up).sum(), inputs)
    want = torch.autograd.grad((F.linear(x, w, b) * up).sum(), inputs)
    for o, e in zip(ours, want, strict=True):
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-4)


def test_frozen_weight_gets_no_gradient_and_input_does():
    w = torch.randn(8, 4)  # frozen: requires_grad False
    x = torch.randn(3, 4, requires_grad=True)
    onednn_linear(x, w, None).sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(3, 4))
    assert w.grad is None
