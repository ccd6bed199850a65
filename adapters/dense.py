"""The frozen base's dense layers on CPU through oneDNN instead of MKL.

PyTorch sends an fp32 `F.linear` on the CPU to MKL's sgemm. On non-Intel CPUs (this project's
AMD EPYC: AVX-512 with full-width units) MKL takes a generic code path: measured here, 130 GFLOP/s
for a decode batch of 16 rows (576 → 1536) and 215 GFLOP/s at 2048³, where oneDNN's JIT kernels
reach 270-420 and 490 on the same weights. PyTorch already uses oneDNN for bf16 matmuls, and
inductor uses it (`mkldnn._linear_pointwise`) for frozen graphs. Its lowering wants the weight to
be a graph constant, which the engine's one compiled decoder layer, reused with every layer's
weights as inputs, cannot give it. So `onednn_linear` is a custom op: compiled graphs call it as an
opaque kernel, with the weight as an ordinary input. Same values as `F.linear` to fp32 rounding,
with gradients (the trainer's frozen base and its vocabulary projection use it too; oneDNN takes a
transposed view of a weight at full speed, so backward needs no copies).

Which layers use it is decided once, when the engine or the trainer wraps them (`uses_onednn`).

The engine's frozen weights go one step further: `pack_weight` reorders each once into oneDNN's
blocked layout (what inductor's freezing does for a constant weight), and `onednn_linear` takes that
in place of the weight (inference only: a packed weight has no gradient). A decode step streams every
weight from memory; measured here over 30 layers' worth at 16 rows: MKL 48-60 ms, oneDNN on the plain
weights 32 ms, on packed weights 22-26 ms. The packed copy costs the weights' size again in memory, and
must be made anew when a weight changes (a merge).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.library.custom_op("loraplex::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`: x (..., in), weight (out, in) or `pack_weight` of it, bias (out,) or None."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@onednn_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def pack_weight(weight: torch.Tensor, rows: int = 16) -> torch.Tensor:
    """`weight` (out, in) reordered for oneDNN (an opaque mkldnn tensor of the same shape); `rows` is the
    batch size its layout is chosen for (any batch size works)."""
    # always an inference tensor, wherever it is made (a merge repacks on the engine thread, in inference mode):
    # compiled graphs guard on the dispatch keys of their inputs, so a repacked weight must look like the first
    with torch.inference_mode():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x if weight.requires_grad else None, weight)


def _backward(ctx, grad: torch.Tensor):
    x, weight = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = onednn_linear(grad, weight.t(), None)  # grad @ weight
    g2 = grad.reshape(-1, grad.shape[-1])  # (N, out)
    if ctx.needs_input_grad[1]:
        grad_w = onednn_linear(g2.t(), x.reshape(-1, x.shape[-1]).t(), None)  # gradᵀ @ x: (out, in)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = g2.sum(0)
    return grad_x, grad_w, grad_b


onednn_linear.register_autograd(_backward, setup_context=_setup_context)


def _probe() -> bool:
    """True if this torch build has the oneDNN op and it computes F.linear."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*s, generator=g) for s in ((2, 3, 8), (4, 8), (4,)))
        return torch.allclose(onednn_linear(x, w, b), F.linear(x, w, b), atol=1e-5)
    except RuntimeError:
        return False


_AVAILABLE: bool | None = None


def uses_onednn(weight: torch.Tensor) -> bool:
    """Whether a frozen nn.Linear weight (out, in) should go through `onednn_linear`: fp32 on the CPU.

    (bf16 and fp16 matmuls already go to oneDNN in PyTorch; CUDA has its own kernels.)
    """
    global _AVAILABLE
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return False
    if _AVAILABLE is None:
        _AVAILABLE = _probe()
    return _AVAILABLE


def frozen_linear(x: torch.Tensor, layer: torch.nn.Linear, onednn: bool) -> torch.Tensor:
    """`layer(x)` for an nn.Linear, through oneDNN when `onednn` (see `uses_onednn`)."""
    return onednn_linear(x, layer.weight, layer.bias) if onednn else layer(x)


def linear_for(weight: torch.Tensor):
    """`F.linear`, or `onednn_linear` where `uses_onednn(weight)`: the kernel for the matmuls with `weight`."""
    return onednn_linear if uses_onednn(weight) else F.linear
